"""Evaluation protocols against hand-ranked lists, with a recommender that returns fixed scores.

Three examples over 6 items; ranks worked out by hand in the comments. They cover: a seen item that
would outrank the target if it were not excluded (A, C), a target the user had already seen
(re-consumption, B: it must stay in the ranking), and candidate vs full ranks that differ (A).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from recalign.evaluation.protocols import (
    candidate_ranks,
    evaluate_candidates,
    evaluate_full,
    full_ranks,
)

SCORES = np.array(
    [
        [9.0, 8.0, 5.0, 7.0, 1.0, 0.0],  # user 0
        [1.0, 2.0, 6.0, 4.0, 3.0, 5.0],  # user 1
        [5.0, 3.0, 1.0, 0.0, 9.0, 0.0],  # user 2
    ]
)


def examples() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "stage": "test",
            "user": [0, 1, 2],
            "position": [2, 2, 1],
            # A: candidates {2: 5, 4: 1, 5: 0} -> rank 1; full: 0 and 1 seen, 3 (7) beats 2 (5) -> rank 2
            # B: candidates {5: 5, 3: 4, 0: 1} -> rank 2; full: 2 seen (6), target 3 kept, 5 (5) beats -> rank 2
            # C: candidates {1: 3, 0: 5, 2: 1} -> rank 1; full: 4 (9) seen and excluded -> rank 1
            "target": [2, 3, 0],
            "history": [np.array([0, 1]), np.array([3, 2]), np.array([4])],
            "candidates": [np.array([2, 4, 5]), np.array([5, 3, 0]), np.array([1, 0, 2])],
        }
    )


class FixedScores:
    """A recommender whose scores are a fixed row per user; counts calls to check batching."""

    name = "fixed"

    def __init__(self, scores: np.ndarray) -> None:
        self.scores = scores
        self.calls = 0

    def fit(self, dataset, split):
        return self

    def score_all(self, ex: pd.DataFrame) -> np.ndarray:
        self.calls += 1
        return self.scores[ex["user"].to_numpy()].copy()

    def score_candidates(self, ex: pd.DataFrame) -> np.ndarray:
        self.calls += 1
        cands = np.stack(ex["candidates"].to_numpy())
        return np.take_along_axis(self.scores[ex["user"].to_numpy()], cands, axis=1)


def test_candidate_ranks_by_hand():
    ex = examples()
    assert candidate_ranks(FixedScores(SCORES).score_candidates(ex), ex).tolist() == [1, 2, 1]


def test_full_ranks_exclude_seen_items_but_never_the_target():
    ex = examples()
    assert full_ranks(SCORES, ex).tolist() == [2, 2, 1]
    # without exclusion A and C would rank 4 and 2, and excluding B's target would sink it to 6
    raw = (SCORES[np.arange(3), ex["target"]][:, None] <= SCORES).sum(1)
    assert raw.tolist() == [4, 3, 2]


def test_full_ranks_do_not_modify_the_scores():
    before = SCORES.copy()
    full_ranks(SCORES, examples())
    np.testing.assert_array_equal(SCORES, before)


def test_evaluate_candidates_metrics_by_hand():
    m = evaluate_candidates(FixedScores(SCORES), examples(), ks=(1, 2))
    assert m["HR@1"] == pytest.approx(2 / 3)
    assert m["HR@2"] == pytest.approx(1.0)
    assert m["NDCG@2"] == pytest.approx((1 + 1 / math.log2(3) + 1) / 3)
    assert m["MRR@2"] == pytest.approx((1 + 0.5 + 1) / 3)
    # AUC with 3 candidates: (3 - rank) / 2 averaged over ranks 1, 2, 1
    assert m["AUC"] == pytest.approx((1 + 0.5 + 1) / 3)


def test_evaluate_candidates_drops_cutoffs_longer_than_the_list():
    m = evaluate_candidates(FixedScores(SCORES), examples(), ks=(1, 3, 5))
    assert "HR@3" in m and "HR@5" not in m and "NDCG@5" not in m


def test_evaluate_full_metrics_by_hand():
    m = evaluate_full(FixedScores(SCORES), examples(), ks=(1, 2))
    assert m["HR@1"] == pytest.approx(1 / 3)
    assert m["HR@2"] == pytest.approx(1.0)
    assert m["NDCG@2"] == pytest.approx((2 / math.log2(3) + 1) / 3)
    assert m["MRR@2"] == pytest.approx((0.5 + 0.5 + 1) / 3)
    assert "AUC" not in m


@pytest.mark.parametrize("evaluate", [evaluate_candidates, evaluate_full])
def test_batching_does_not_change_metrics(evaluate):
    one = FixedScores(SCORES)
    per_row = evaluate(one, examples(), ks=(1, 2), batch_size=1)
    assert one.calls == 3
    together = evaluate(FixedScores(SCORES), examples(), ks=(1, 2), batch_size=512)
    assert per_row == together


def test_ties_count_against_the_target_in_both_protocols():
    constant = FixedScores(np.ones_like(SCORES))
    assert evaluate_candidates(constant, examples(), ks=(1,))["HR@1"] == 0.0
    assert evaluate_full(constant, examples(), ks=(1,))["HR@1"] == 0.0
