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


# ---------------------------------------------------------------------- RecommendSession (recommend / explain API)
@pytest.fixture
def session(tiny_dataset, tiny_model, tiny_tokenizer):
    from recalign.lm.recommend import RecommendSession

    return RecommendSession(tiny_model, tiny_tokenizer, tiny_dataset(), max_history=3)


def test_session_exact_top_k_equals_exhaustive(session):
    """The default (fast, exact) whole-catalogue ranking is the exhaustive ranking: items, order, scores."""
    from recalign.cli.cmd_recommend import recommend

    hist = ["Toy Story (1995)", "fargo (1996)", "Heat (1995)"]
    fast = session.recommend(hist, k=10)
    assert session.last_stats["method"] == "exact" and session.last_stats["nodes"] > 0
    slow = session.recommend(hist, k=10, method="exhaustive")
    assert [r.item_idx for r in fast] == [r.item_idx for r in slow]
    np.testing.assert_allclose([r.score for r in fast], [r.score for r in slow], atol=1e-4)
    assert [r.rank for r in fast] == list(range(1, 11))
    assert not {"Toy Story (1995)", "Fargo (1996)", "Heat (1995)"} & {r.title for r in fast}
    # the exhaustive scores are the naive log-probs of the open prompt
    hist_idx = [0, 6, 1]
    prompt = build_open_prompt(session.dataset, hist_idx, seed=0, user=0, position=3, max_history=3)
    titles = display_titles(session.dataset)
    with torch.no_grad():
        ref = naive_answer_logprobs(
            session.model, [encode_prompt(session.tokenizer, prompt)],
            [[encode_answer(session.tokenizer, titles[r.item_idx]) for r in slow]],
        )  # fmt: skip
    np.testing.assert_allclose([r.score for r in slow], ref.sum[0].numpy(), atol=1e-4)
    # the one-call API gives the same answer
    one = recommend(
        session.model, session.tokenizer, session.dataset, hist, k=10, max_history=3, progress=False
    )
    assert [r.item_idx for r in one] == [r.item_idx for r in fast]


def test_session_candidates_sample_and_errors(session):
    from recalign.errors import RecalignInputError

    recs = session.recommend(["Heat (1995)"], candidates=["Alien (1979)", "Babe (1995)", "alien (1979)"], k=5)
    assert sorted(r.title for r in recs) == ["Alien (1979)", "Babe (1995)"]  # a title given twice: once
    assert session.last_stats["method"] == "candidates"
    sampled = session.recommend(["Heat (1995)"], sample=4, k=10)
    assert len(sampled) == 4 and "Heat (1995)" not in {r.title for r in sampled}
    with pytest.raises(RecalignInputError, match=r"unknown history title 'Toy Stroy \(1995\)'.*Toy Story"):
        session.recommend(["Toy Stroy (1995)"])
    with pytest.raises(RecalignInputError, match="field 'history': needs at least one title"):
        session.recommend([])
    for bad in (0, 10_000, True):
        with pytest.raises(RecalignInputError, match="field 'k'"):
            session.recommend(["Heat (1995)"], k=bad)
    with pytest.raises(RecalignInputError, match="needs a retriever"):
        session.recommend(["Heat (1995)"], method="two-stage")
    with pytest.raises(RecalignInputError, match="field 'method'"):
        session.recommend(["Heat (1995)"], method="fastest")


def test_session_two_stage_reranks_the_retrievers_top_n(session):
    """A classical model retrieves N unseen items; the LM ranks exactly those with the candidate prompt."""
    from recalign.errors import RecalignInputError

    session.fit_retriever("pop")
    session.retrieve = 6
    hist = ["Toy Story (1995)", "Heat (1995)"]
    pool = session._retrieve([0, 1], 6)
    assert len(pool) == 6 and not {0, 1} & set(pool)
    recs = session.recommend(hist, k=4, method="two-stage")
    assert session.last_stats == {
        **session.last_stats,
        "method": "two-stage",
        "retriever": "pop",
        "retrieved": 6,
    }
    listed = session.recommend(hist, k=4, candidates=[session.titles[j] for j in pool])
    assert [r.item_idx for r in recs] == [r.item_idx for r in listed]
    with pytest.raises(RecalignInputError, match="at most the 6 retrieved"):
        session.recommend(hist, k=7, method="two-stage")
    with pytest.raises(RecalignInputError, match="unknown retriever 'bprmf'"):
        session.fit_retriever("bprmf")


def test_session_explains(session):
    """Explanations are generated text, one line each; recommend(explain=True) adds one per item."""
    text = session.explain(["Toy Story (1995)", "Babe (1995)"], "jumanji (1995)")
    assert isinstance(text, str) and "\n" not in text
    prompt = session.explain_prompt([0, 10], 11)
    assert "Toy Story (1995)" in prompt and '"Jumanji (1995)"' in prompt
    recs = session.recommend(["Toy Story (1995)"], k=2, explain=True)
    assert all(isinstance(r.explanation, str) for r in recs)
    assert "explanation" in recs[0].to_dict()
    assert "explanation" not in session.recommend(["Toy Story (1995)"], k=1)[0].to_dict()


def test_session_hybrid_prompts_fast_equals_exhaustive(tiny_dataset, tiny_model, tiny_tokenizer):
    """A model with soft item tokens (LLaRA-style projector) gets hybrid prompts, and the exact search
    still equals exhaustive scoring."""
    import copy

    from recalign.lm.hybrid import attach_item_tokens, new_item_tokens
    from recalign.lm.recommend import RecommendSession

    ds = tiny_dataset()
    model = copy.deepcopy(tiny_model)
    torch.manual_seed(0)
    attach_item_tokens(model, new_item_tokens(model, torch.randn(ds.n_items, 8) * 0.1, hidden=16))
    session = RecommendSession(model, tiny_tokenizer, ds, max_history=3)
    assert session._item_tokens() and min(session._open_prompt_ids([0, 1])) < 0  # soft tokens in the prompt
    hist = ["Toy Story (1995)", "Heat (1995)"]
    fast = session.recommend(hist, k=6)
    slow = session.recommend(hist, k=6, method="exhaustive")
    assert [r.item_idx for r in fast] == [r.item_idx for r in slow]
    np.testing.assert_allclose([r.score for r in fast], [r.score for r in slow], atol=1e-4)
    plain = RecommendSession(tiny_model, tiny_tokenizer, ds, max_history=3).recommend(hist, k=6)
    assert [r.score for r in plain] != [r.score for r in fast]  # the soft tokens change the scores
