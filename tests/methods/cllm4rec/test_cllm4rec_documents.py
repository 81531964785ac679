"""Documents: masking of the fine-tuning history, collaborative/content documents, the hold-out split."""

import numpy as np
import pytest

from recalign.methods.cllm4rec.documents import (
    chunk_sizes,
    collab_documents,
    collate_lm,
    content_corpus,
    content_documents,
    mask_history,
    pack_rows,
    rec_documents,
)
from recalign.methods.cllm4rec.vocab import item_token


@pytest.mark.parametrize("n", [2, 3, 5, 10, 11, 50, 97])
def test_mask_history_ratio_at_least_one_and_disjoint(n):
    items = np.arange(100, 100 + n)
    kept, held = mask_history(items, 0.2, np.random.default_rng(0))
    assert len(held) == max(1, round(0.2 * n)) and len(kept) >= 1
    assert len(kept) + len(held) == n
    assert set(kept) | set(held) == set(items) and not set(kept) & set(held)


def test_mask_history_is_deterministic_by_seed():
    items = np.arange(40)
    a = mask_history(items, 0.2, np.random.default_rng([7, 1]))
    b = mask_history(items, 0.2, np.random.default_rng([7, 1]))
    c = mask_history(items, 0.2, np.random.default_rng([8, 1]))
    assert np.array_equal(a[1], b[1]) and np.array_equal(a[0], b[0])
    assert not np.array_equal(np.sort(a[1]), np.sort(c[1]))


def test_rec_documents_targets_are_exactly_the_masked_items(make_model, dataset, split):
    _, tok = make_model()
    seqs = split.train_sequences(dataset)
    docs = rec_documents(tok, seqs, max_items=10, mask_ratio=0.2, seed=3, epoch=0)
    assert len(docs) == sum(1 for s in seqs if len(s) >= 2)
    again = rec_documents(tok, seqs, max_items=10, mask_ratio=0.2, seed=3, epoch=0)
    assert [d.targets for d in docs] == [d.targets for d in again]  # deterministic by seed
    other_epoch = rec_documents(tok, seqs, max_items=10, mask_ratio=0.2, seed=3, epoch=1)
    assert [d.targets for d in docs] != [d.targets for d in other_epoch]  # fresh masks every epoch
    for d in docs:
        text = tok.decode(d.prompt)
        prompt_items = [i for i in d.items if item_token(i) in text]
        assert set(prompt_items) | set(d.targets) == set(d.items)  # sub-history = prompt + held out
        assert not set(prompt_items) & set(d.targets)  # a target never appears in the prompt
        assert set(d.items) <= set(seqs[d.user].tolist())  # only the user's training items
        assert len(d.targets) == max(1, round(0.2 * len(d.items)))
        assert text.startswith(f"<user_{d.user}> has interacted with")
        assert text.endswith("; the user will interact with:")


def test_collab_documents_shuffle_and_truncate(make_model, dataset, split):
    _, tok = make_model()
    seqs = split.train_sequences(dataset)
    e0 = collab_documents(tok, seqs, max_items=6, seed=0, epoch=0)
    e1 = collab_documents(tok, seqs, max_items=6, seed=0, epoch=1)
    assert {d.user for d in e0} == {u for u, s in enumerate(seqs) if len(s)}
    for d in e0:
        u = d.user
        assert 1 <= len(d.targets) <= 6 and set(d.targets) <= set(seqs[u].tolist())
        assert tok.decode(d.prompt + d.main) == f"<user_{u}> has interacted with " + " ".join(
            item_token(i) for i in d.targets
        )
    assert [d.targets for d in e0] != [d.targets for d in e1]  # re-shuffled per epoch


@pytest.mark.parametrize("max_items", [0, 3, 6, 8, 100])
def test_each_pretraining_epoch_covers_every_interaction_once(make_model, dataset, split, max_items):
    """Long histories are cut into consecutive chunks of the epoch's shuffle, not one random sub-list:
    every (user, item) of the training data is a target exactly once per epoch."""
    _, tok = make_model()
    seqs = split.train_sequences(dataset)
    assert max(len(s) for s in seqs) > 6  # some users need several chunks
    for epoch in (0, 1):
        docs = collab_documents(tok, seqs, max_items=max_items, seed=0, epoch=epoch)
        pairs = [(d.user, i) for d in docs for i in d.targets]
        assert len(pairs) == len(set(pairs))  # once
        assert set(pairs) == {(u, int(i)) for u, s in enumerate(seqs) for i in s}  # every interaction
        if max_items:
            assert max(len(d.targets) for d in docs) <= max_items
            per_user = {}
            for d in docs:
                per_user.setdefault(d.user, []).append(len(d.targets))
            assert all(max(v) - min(v) <= 1 for v in per_user.values())  # balanced chunks, no stubs


def test_chunk_sizes():
    assert chunk_sizes(0, 30) == [] and chunk_sizes(5, 0) == [5] and chunk_sizes(30, 30) == [30]
    assert chunk_sizes(31, 30) == [16, 15] and chunk_sizes(61, 30) == [21, 20, 20]
    assert all(sum(chunk_sizes(n, m)) == n for n in range(1, 80) for m in range(1, 12))


def test_rec_documents_use_the_whole_history_by_default(make_model, dataset, split):
    _, tok = make_model()
    seqs = split.train_sequences(dataset)
    docs = rec_documents(tok, seqs, max_items=0, mask_ratio=0.2, seed=0, epoch=0)
    for d in docs:
        assert sorted(d.items) == sorted(set(seqs[d.user].tolist()))


def test_packing_is_exact_and_packs_short_documents(make_model, dataset, split):
    import torch

    model, tok = make_model()
    seqs = split.train_sequences(dataset)
    for docs, loss in (
        (collab_documents(tok, seqs, 6, seed=0, epoch=0)[:6], model.collab_lm_loss),
        (content_documents(tok, content_corpus(dataset), 40, seed=0, epoch=0)[:8], model.content_lm_loss),
    ):
        plain, packed = collate_lm(docs, tok.pad_id), collate_lm(docs, tok.pad_id, pack=96)
        assert packed["input_ids"].shape[0] < plain["input_ids"].shape[0]  # fewer rows
        assert packed["attention_mask"].sum() == plain["attention_mask"].sum()  # same tokens
        assert packed["input_ids"].shape[1] <= 96
        assert torch.equal(plain["targets"].sort().values, packed["targets"].sort().values)
        assert torch.allclose(loss(plain), loss(packed), atol=1e-5)
    assert pack_rows([5, 3, 4, 2, 9], 9) == [[4], [0, 2], [1, 3]]  # first fit, longest first


def test_content_documents_describe_items_without_reviews(make_model, dataset):
    _, tok = make_model()
    corpus = content_corpus(dataset)
    assert len(corpus) == dataset.n_items and all(u is None for u, _, _ in corpus)
    docs = content_documents(tok, corpus, max_text_tokens=100, seed=0, epoch=0)
    d = next(d for d in docs if d.items == [6])
    assert tok.decode(d.prompt + d.main) == "<item_6> is titled Movie number 6 (1986); genres: Drama, Comedy"
    assert d.targets == d.main and all(t < tok.vocab_size for t in d.targets)  # word loss on text only


def test_reviews_are_restricted_to_training_pairs(dataset, split):
    import pandas as pd

    seqs = split.train_sequences(dataset)
    test_row = split.stage("test").iloc[0]
    u, train_item, test_item = (
        int(test_row["user"]),
        int(seqs[int(test_row["user"])][0]),
        int(test_row["target"]),
    )
    ds = type(dataset)(**{**dataset.__dict__})
    ds.reviews = pd.DataFrame(
        {"user_idx": [u, u], "item_idx": [train_item, test_item], "text": ["good", "leak"]}
    )
    corpus = content_corpus(ds, seqs)
    assert corpus == [(u, train_item, " good")]  # the review of the held-out item never reaches training


def test_holdout_split_keeps_the_last_fifth(dataset, split):
    seqs = dataset.sequences()
    train = split.train_sequences(dataset)
    test = split.stage("test")
    assert len(test) == dataset.n_users
    for _, row in test.iterrows():
        s, u = seqs[row["user"]], row["user"]
        n_hold = max(1, round(0.2 * len(s)))
        assert np.array_equal(train[u], s[: len(s) - n_hold])
        assert np.array_equal(row["history"], train[u])
        assert set(row["targets"].tolist()) == set(s[len(s) - n_hold :].tolist())
        assert row["target"] == s[len(s) - n_hold] and row["target"] in row["candidates"]


def test_holdout_split_validation_stage_sits_just_before_the_test_part(dataset):
    from recalign.methods.cllm4rec.protocol import holdout_split

    plain = holdout_split(dataset, 0.2, seed=0, n_candidates=5)
    split = holdout_split(dataset, 0.2, seed=0, n_candidates=5, valid_ratio=0.1)
    seqs, train = dataset.sequences(), split.train_sequences(dataset)
    valid, test = split.stage("valid"), split.stage("test")
    assert len(valid) == len(test) == dataset.n_users
    for (_, v), (_, t), (_, t0) in zip(valid.iterrows(), test.iterrows(), plain.stage("test").iterrows()):
        s, u = seqs[v["user"]], v["user"]
        n_val = max(1, round(0.1 * len(s)))
        assert np.array_equal(train[u], s[: t["position"] - n_val])  # nothing of valid/test is trained on
        assert np.array_equal(v["history"], train[u])
        assert set(v["targets"].tolist()) == set(s[t["position"] - n_val : t["position"]].tolist()) - set(
            train[u].tolist()
        )
        # the test example is the one without a validation stage: same history, same targets
        assert np.array_equal(t["history"], t0["history"]) and np.array_equal(t["targets"], t0["targets"])
