"""Rewards (log-probability, reciprocal rank, NDCG@K of the true item among the candidates) and best/worst
pair selection."""

import math

import numpy as np
import pytest

from recalign.methods.dpo4rec.pairs import ScoredSummary, select_pairs
from recalign.methods.dpo4rec.reward import (
    logprob_rewards,
    ndcg_rewards,
    reciprocal_rank_rewards,
    target_columns,
)


def test_ndcg_reward_on_a_hand_built_case():
    # 4 candidates; target column given per row.
    scores = np.array(
        [
            [0.9, 0.1, 0.2, 0.3],  # target col 0 -> rank 1 -> 1
            [0.9, 0.8, 0.7, 0.1],  # target col 2 -> rank 3 -> 1/log2(4) = 0.5
            [0.1, 0.2, 0.3, 0.4],  # target col 0 -> rank 4 -> beyond K=3 -> 0
            [0.5, 0.5, 0.1, 0.0],  # target col 1, tied with col 0 -> pessimistic rank 2 -> 1/log2(3)
        ]
    )
    rewards, ranks = ndcg_rewards(scores, np.array([0, 2, 0, 1]), k=3)
    assert ranks.tolist() == [1, 3, 4, 2]
    assert rewards[0] == 1.0
    assert rewards[1] == pytest.approx(0.5)
    assert rewards[2] == 0.0
    assert rewards[3] == pytest.approx(1.0 / math.log2(3))
    # a larger K turns the rank-4 row into 1/log2(5)
    rewards5, _ = ndcg_rewards(scores, np.array([0, 2, 0, 1]), k=5)
    assert rewards5[2] == pytest.approx(1.0 / math.log2(5))


def test_ndcg_reward_rejects_bad_input():
    with pytest.raises(ValueError):
        ndcg_rewards(np.zeros((2, 3)), np.array([0, 1]), k=0)
    with pytest.raises(ValueError):
        ndcg_rewards(np.zeros(3), np.array([0]), k=1)


def test_target_columns_finds_the_target_and_rejects_a_missing_one():
    cands = np.array([[5, 7, 9], [1, 2, 3]])
    assert target_columns(cands, np.array([9, 1])).tolist() == [2, 0]
    with pytest.raises(ValueError, match="row 1"):
        target_columns(cands, np.array([9, 4]))


def _s(user, sample, reward, text=None):
    return ScoredSummary(
        user=user, sample=sample, text=text or f"u{user}s{sample}", reward=reward, prompt=f"p{user}"
    )


def test_best_and_worst_are_selected_per_user():
    scored = [_s(1, 0, 0.5), _s(1, 1, 1.0), _s(1, 2, 0.0), _s(1, 3, 0.63)]
    pairs, stats = select_pairs(scored)
    assert len(pairs) == 1
    p = pairs[0]
    assert (p.chosen, p.rejected) == ("u1s1", "u1s2")
    assert (p.chosen_reward, p.rejected_reward) == (1.0, 0.0)
    assert p.prompt == "p1"
    assert stats.pairs == 1 and stats.ties == 0 and stats.mean_gap == 1.0


def test_ties_are_skipped_and_counted_and_partial_ties_pick_the_lowest_sample():
    scored = [
        # user 1: all equal -> tie, no pair
        _s(1, 0, 0.0), _s(1, 1, 0.0), _s(1, 2, 0.0),
        # user 2: identical texts -> tie, counted as identical
        _s(2, 0, 0.5, "same"), _s(2, 1, 0.5, "same"),
        # user 3: two samples share the best and two share the worst -> lowest sample index wins
        _s(3, 3, 1.0), _s(3, 1, 1.0), _s(3, 0, 0.0), _s(3, 2, 0.0),
        # user 4: a single sample cannot form a pair
        _s(4, 0, 1.0),
    ]  # fmt: skip
    pairs, stats = select_pairs(scored)
    assert [p.user for p in pairs] == [3]
    assert (pairs[0].chosen_sample, pairs[0].rejected_sample) == (1, 0)
    assert stats.users == 4
    assert stats.ties == 2 and stats.tied_users == [1, 2]
    assert stats.identical_texts == 1
    assert stats.too_few == 1
    assert stats.pairs == 1


def test_logprob_reward_is_the_log_softmax_of_the_target():
    from recalign.methods.dpo4rec.reward import logprob_rewards

    scores = np.array([[0.0, math.log(3.0)], [1000.0, 0.0]])  # probabilities 1/4, 3/4; the second row is huge
    r = logprob_rewards(scores, np.array([0, 0]))
    assert r[0] == pytest.approx(math.log(0.25))
    assert r[1] == pytest.approx(0.0)  # stable for large scores (no overflow)
    # continuous: a small score change that does not change the rank still changes the reward
    r2 = logprob_rewards(scores + np.array([[0.1, 0.0], [0.0, 0.0]]), np.array([0, 0]))
    assert r2[0] > r[0]


def test_rewards_distinguish_samples_that_rank_the_true_item_differently():
    """Five samples of one user: the true item (column 0) at ranks 2, 3, 7, 8 and 8 (a lower score).
    NDCG@5 gives the last three the same 0 (a tie DPO cannot use); the reciprocal rank separates every
    rank; the log-probability separates every sample, including two at the same rank."""
    from recalign.config import load_config
    from recalign.methods.dpo4rec.config import DPO4RecConfig
    from recalign.methods.dpo4rec.stages import compute_rewards

    others = np.linspace(3.0, -3.0, 9)  # nine distractors, descending

    def row(target_score):
        return np.concatenate([[target_score], others])

    scores = np.stack([row(2.5), row(1.8), row(-1.0), row(-1.9), row(-2.0)])
    col = np.zeros(5, dtype=np.int64)
    nd, ranks = ndcg_rewards(scores, col, k=5)
    assert ranks.tolist() == [2, 3, 7, 8, 8]
    assert nd[2] == nd[3] == nd[4] == 0.0  # NDCG@5 ties three of five samples
    rr, _ = reciprocal_rank_rewards(scores, col)
    assert rr.tolist() == pytest.approx([1 / 2, 1 / 3, 1 / 7, 1 / 8, 1 / 8])
    lp = logprob_rewards(scores, col)
    assert np.all(np.diff(lp) < 0)  # strictly ordered like the samples' target scores
    assert lp[3] > lp[4]  # same rank, different reward
    # the run's default reward is the log-probability: its best/worst pair exists for this user
    cfg = load_config(DPO4RecConfig, None, {})
    rewards, _ = compute_rewards(cfg, scores, col)
    assert rewards.tolist() == pytest.approx(lp.tolist())
    scored = [ScoredSummary(user=1, sample=i, text=f"s{i}", reward=float(r)) for i, r in enumerate(rewards)]
    pairs, stats = select_pairs(scored)
    assert stats.pairs == 1 and pairs[0].chosen == "s0" and pairs[0].rejected == "s4"
    # NDCG@5 on the three low samples alone: a tie, no pair
    tied = [ScoredSummary(user=1, sample=i, text=f"s{i}", reward=float(nd[i])) for i in (2, 3, 4)]
    assert select_pairs(tied)[1].ties == 1
