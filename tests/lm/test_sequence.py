"""Sequence SFT: windows never hold a held-out target, every training item is a target once, the loss is
the token NLL of a plain full forward, and the history-only prompt is exactly a document's prefix."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recalign.data.splits import build_split
from recalign.lm.scoring import naive_answer_logprobs
from recalign.lm.sequence import (
    SequenceCodec,
    SequenceLMRecommender,
    SequenceObjective,
    Window,
    sequence_examples,
    sequence_windows,
    split_windows,
)


def test_every_item_after_the_context_is_a_target_exactly_once():
    seqs = [np.arange(50), np.arange(100, 103), np.arange(200, 205), np.arange(300, 323)]
    wins = sequence_windows(seqs, window=10, min_context=3)
    for u, seq in enumerate(seqs):
        mine = [w for w in wins if w.user == u]
        targets = [int(x) for w in mine for x in w.items[w.first_target :]]
        assert targets == [int(x) for x in seq[3:]]  # each once, in order
        for w in mine:
            assert len(w.items) <= 10 and np.array_equal(w.items, seq[w.start : w.start + len(w.items)])
    assert not [w for w in wins if w.user == 1]  # 3 items = context only: no window
    with pytest.raises(ValueError, match="min_context"):
        sequence_windows(seqs, window=3, min_context=3)


@pytest.mark.parametrize("split_name", ["llara", "loo"])
def test_windows_never_contain_a_held_out_target(tiny_dataset, split_name):
    ds = tiny_dataset()
    split = build_split(ds, split_name, n_candidates=5, seed=0)
    held = split.examples[split.examples["stage"] != "train"]
    first_held = held.groupby("user")["position"].min().to_dict()
    wins = split_windows(split, ds, window=5, min_context=2)
    assert wins
    seqs = ds.sequences()
    for w in wins:
        end = w.start + len(w.items)
        assert end <= first_held.get(w.user, len(seqs[w.user]))  # only positions before any held-out one
        assert np.array_equal(w.items, seqs[w.user][w.start : end])


def test_prompt_is_a_prefix_of_the_document(tiny_dataset, tiny_tokenizer):
    ds = tiny_dataset()
    codec = SequenceCodec(tiny_tokenizer, ds)
    items = np.array([3, 7, 1, 12, 5])
    doc = codec.document(Window(user=0, start=0, items=items, first_target=2))
    assert len(doc["targets"]) == 3
    for k, (start, end) in zip(range(2, 5), doc["targets"]):
        prompt = codec.prompt(items[:k])
        assert doc["tokens"][: len(prompt)] == prompt and start == len(prompt)
        assert doc["tokens"][start:end] == codec.lines[int(items[k])]
        assert tiny_tokenizer.decode(doc["tokens"][start:end]).strip() == ds.items["title"].iloc[items[k]]


def test_objective_is_the_token_nll_of_a_plain_forward(tiny_dataset, tiny_tokenizer, tiny_model):
    ds = tiny_dataset()
    wins = [
        Window(user=0, start=0, items=np.array([1, 2, 3, 4, 5]), first_target=2),
        Window(user=1, start=0, items=np.array([9, 8, 7]), first_target=1),
    ]
    batch = {k: [e[k] for e in sequence_examples(tiny_tokenizer, ds, wins)] for k in ("tokens", "targets")}
    model = tiny_model
    loss, logs = SequenceObjective()(model, batch)
    total, n = 0.0, 0
    for ids, spans in zip(batch["tokens"], batch["targets"]):
        logits = model(input_ids=torch.tensor([ids])).logits[0]
        for start, end in spans:
            tgt = torch.tensor(ids[start:end])
            total += torch.nn.functional.cross_entropy(
                logits[start - 1 : end - 1], tgt, reduction="sum"
            ).item()
            n += end - start
    assert loss.item() == pytest.approx(total / n, rel=1e-5)
    assert SequenceObjective.loss_items(batch) == n
    assert logs["targets"] == pytest.approx((3 + 2) / 2)
    model.zero_grad()
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    model.zero_grad()


def test_candidate_scores_equal_the_naive_path(tiny_dataset, tiny_tokenizer, tiny_model):
    ds = tiny_dataset()
    split = build_split(ds, "llara", n_candidates=5, seed=0)
    ex = split.stage("test").head(4)
    rec = SequenceLMRecommender(tiny_model, tiny_tokenizer, ds, max_history=3, batch_size=2, progress=False)
    got = rec.score_candidates(ex)
    codec = SequenceCodec(tiny_tokenizer, ds)
    prompts = [codec.prompt(np.asarray(h)[-3:]) for h in ex["history"]]
    answers = [[codec.lines[int(c)] for c in cands] for cands in ex["candidates"]]
    with torch.no_grad():
        want = naive_answer_logprobs(tiny_model, prompts, answers).sum.numpy()
    np.testing.assert_allclose(got, want, atol=1e-4)
    full = rec.score_all(ex.head(1))
    cands = np.asarray(ex["candidates"].iloc[0])
    np.testing.assert_allclose(full[0, cands], got[0], atol=1e-4)
