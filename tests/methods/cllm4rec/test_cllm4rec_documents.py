"""Documents: masking of the fine-tuning history, collaborative/content documents, the hold-out split."""

import numpy as np
import pytest

from recalign.methods.cllm4rec.documents import (
    collab_documents,
    content_corpus,
    content_documents,
    mask_history,
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
    e0 = {d.user: d for d in collab_documents(tok, seqs, max_items=6, seed=0, epoch=0)}
    e1 = {d.user: d for d in collab_documents(tok, seqs, max_items=6, seed=0, epoch=1)}
    assert set(e0) == {u for u, s in enumerate(seqs) if len(s)}
    for u, d in e0.items():
        assert len(d.targets) == min(6, len(seqs[u])) and set(d.targets) <= set(seqs[u].tolist())
        assert tok.decode(d.prompt + d.main) == f"<user_{u}> has interacted with " + " ".join(
            item_token(i) for i in d.targets
        )
    assert any(e0[u].targets != e1[u].targets for u in e0)  # re-sampled and re-shuffled per epoch


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
