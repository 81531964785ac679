"""LMRecommender: candidate and catalogue scores are the answer log-probs of the right titles."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recalign.data.splits import build_split
from recalign.evaluation.protocols import evaluate_candidates, evaluate_full
from recalign.lm.loading import build_tiny_llama
from recalign.lm.prompts import (
    build_open_prompt,
    display_titles,
    encode_answer,
    encode_prompt,
    examples_to_prompts,
)
from recalign.lm.recommender import LMRecommender
from recalign.lm.scoring import answer_logprobs, naive_answer_logprobs
from recalign.recommender import Recommender


@pytest.fixture
def setup(tiny_dataset, tiny_model, tiny_tokenizer):
    ds = tiny_dataset()
    split = build_split(ds, "loo", n_candidates=5)
    return ds, split, tiny_model, tiny_tokenizer


def test_candidate_scores_are_naive_logprobs_of_candidate_titles(setup):
    ds, split, model, tok = setup
    test = split.stage("test")
    rec = LMRecommender(model, tok, ds, seed=3, batch_size=4, max_history=3, progress=False)
    assert isinstance(rec, Recommender)
    assert rec.fit(ds, split) is rec
    scores = rec.score_candidates(test)
    assert scores.shape == (len(test), 5) and np.isfinite(scores).all()
    exs = examples_to_prompts(ds, test, seed=3, max_history=3)
    titles = display_titles(ds)
    with torch.no_grad():
        ref = naive_answer_logprobs(
            model,
            [encode_prompt(tok, e.prompt) for e in exs],
            [[encode_answer(tok, titles[i]) for i in c] for c in test["candidates"]],
        )
    np.testing.assert_allclose(scores, ref.sum.numpy(), atol=1e-4)
    # a different seed gives different phrasings, hence different scores
    assert not np.allclose(
        scores, LMRecommender(model, tok, ds, seed=4, progress=False).score_candidates(test)
    )


def test_options_do_not_change_what_is_scored(setup):
    ds, split, model, tok = setup
    test = split.stage("test")
    base = LMRecommender(model, tok, ds, batch_size=4, max_history=3, progress=False).score_candidates(test)
    one = LMRecommender(
        model, tok, ds, batch_size=1, impl="kv", max_history=3, progress=False
    ).score_candidates(test)
    np.testing.assert_allclose(base, one, atol=1e-4)
    norm = LMRecommender(
        model, tok, ds, length_normalize=True, max_history=3, progress=False
    ).score_candidates(test)
    titles = display_titles(ds)
    n_tok = np.array([[len(encode_answer(tok, titles[i])) for i in c] for c in test["candidates"]])
    np.testing.assert_allclose(norm, base / n_tok, atol=1e-5)


def test_training_mode_is_restored(setup):
    ds, split, model, tok = setup
    model.train()
    try:
        LMRecommender(model, tok, ds, max_history=2, progress=False).score_candidates(
            split.stage("test").iloc[:2]
        )
        assert model.training
    finally:
        model.eval()


def test_score_all_scores_every_title_against_open_prompt(setup):
    ds, split, model, tok = setup
    test = split.stage("test").iloc[:2]
    rec = LMRecommender(model, tok, ds, all_chunk_size=7, max_history=3, progress=False)
    scores = rec.score_all(test)
    assert scores.shape == (2, ds.n_items)
    titles = display_titles(ds)
    row = test.iloc[1]
    prompt = build_open_prompt(
        ds, row["history"], seed=0, user=row["user"], position=row["position"], max_history=3
    )
    assert "Answer:" in prompt and titles[int(row["target"])] not in prompt.split("\n")[-2:]
    with torch.no_grad():
        ref = naive_answer_logprobs(
            model, [encode_prompt(tok, prompt)], [[encode_answer(tok, t) for t in titles]]
        )
    np.testing.assert_allclose(scores[1], ref.sum[0].numpy(), atol=1e-4)
    metrics = evaluate_full(rec, test, ks=(1, 5))
    assert set(metrics) >= {"HR@1", "NDCG@5"}


def test_overfitted_model_ranks_and_generates_targets(tiny_dataset, tiny_tokenizer):
    """End to end: a tiny model trained on the test prompts must rank and generate their targets."""
    from recalign.lm.generation import evaluate_generation

    ds = tiny_dataset()
    test = build_split(ds, "loo", n_candidates=5).stage("test").iloc[:3]
    tok = tiny_tokenizer
    model = build_tiny_llama(tok, hidden_size=32, num_layers=1, num_heads=2, seed=1)
    exs = examples_to_prompts(ds, test, seed=0, max_history=2)
    prompts = [encode_prompt(tok, e.prompt) for e in exs]
    answers = [[encode_answer(tok, e.target)] for e in exs]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(40):
        loss = -answer_logprobs(model, prompts, answers).sum.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    rec = LMRecommender(model, tok, ds, max_history=2, progress=False)
    assert evaluate_candidates(rec, test)["HR@1"] == 1.0
    untrained = LMRecommender(
        build_tiny_llama(tok, hidden_size=32, num_layers=1, num_heads=2, seed=1), tok, ds
    )
    assert evaluate_candidates(untrained, test)["HR@1"] < 1.0
    gen = evaluate_generation(model, tok, ds, test, max_history=2, max_new_tokens=16, progress=False)
    assert gen.answers == [e.target for e in exs]
    assert gen.metrics == {"HR@1 (all)": 1.0, "HR@1 (valid)": 1.0, "ValidRatio": 1.0}
