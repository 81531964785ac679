import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from recalign.evaluation.metrics import (
    multi_target_metrics,
    multi_target_per_user,
    single_target_metrics,
    target_ranks,
)


def test_ranks_are_pessimistic_on_ties():
    scores = np.array([[0.1, 0.5, 0.3], [1.0, 1.0, 1.0], [3.0, 2.0, 1.0]])
    assert target_ranks(scores, np.array([2, 0, 0])).tolist() == [2, 3, 1]


def test_single_target_metrics_hand_ranked():
    # ranks 1, 2, 4: worked out by hand
    m = single_target_metrics(np.array([1, 2, 4]), ks=(1, 3), n_candidates=5)
    assert m["HR@1"] == pytest.approx(1 / 3)
    assert m["HR@3"] == pytest.approx(2 / 3)
    assert m["NDCG@3"] == pytest.approx((1 + 1 / math.log2(3)) / 3)
    assert m["MRR@3"] == pytest.approx((1 + 0.5) / 3)
    assert m["AUC"] == pytest.approx(((5 - 1) / 4 + (5 - 2) / 4 + (5 - 4) / 4) / 3)


def test_multi_target_recall_is_truncated_and_ndcg_normalised():
    # user 1: targets {2, 9}; list [1, 2, 3, 4] -> hit at rank 2
    # user 2: targets {1, 2, 3, 4, 5}; list [1, 7, 2, 8] -> hits at ranks 1, 3; K=2 caps the denominator
    m = multi_target_metrics([[1, 2, 3, 4], [1, 7, 2, 8]], [[2, 9], [1, 2, 3, 4, 5]], ks=(2, 4))
    assert m["Recall@2"] == pytest.approx((1 / 2 + 1 / 2) / 2)
    assert m["Recall@4"] == pytest.approx((1 / 2 + 2 / 4) / 2)
    idcg2 = 1 + 1 / math.log2(3)
    assert m["NDCG@2"] == pytest.approx(((1 / math.log2(3)) / idcg2 + 1 / idcg2) / 2)


def test_multi_target_per_user_values_by_hand():
    # the lists above, plus a user without targets (skipped: no value for them)
    v = multi_target_per_user(
        [[1, 2, 3, 4], [5, 6, 7, 8], [1, 7, 2, 8]], [[2, 9], [], [1, 2, 3, 4, 5]], ks=(1, 4)
    )
    assert v["Recall@1"].tolist() == [0.0, 1.0]  # rank-1 items: 1 (miss), 1 (hit)
    assert v["Recall@4"].tolist() == [1 / 2, 2 / 4]
    assert v["HR@4"].tolist() == [1.0, 1.0]
    assert v["NDCG@1"].tolist() == [0.0, 1.0]
    m = multi_target_metrics(
        [[1, 2, 3, 4], [5, 6, 7, 8], [1, 7, 2, 8]], [[2, 9], [], [1, 2, 3, 4, 5]], ks=(1, 4)
    )
    assert m == {k: pytest.approx(x.mean()) for k, x in v.items()}  # the record's means are these means


def test_paired_difference_takes_the_spread_between_users_out():
    from recalign.evaluation.metrics import paired_difference

    # per-user values 0.9, 0.1, 0.5 vs 0.8, 0.0, 0.4: every difference is 0.1, so its SE is 0,
    # while the two means (0.5 vs 0.4) each have an SE of 0.23 (sd 0.4 / sqrt(3))
    d = paired_difference([0.9, 0.1, 0.5], [0.8, 0.0, 0.4])
    assert d["diff"] == pytest.approx(0.1) and d["se"] == pytest.approx(0.0, abs=1e-12) and d["n"] == 3
    with pytest.raises(ValueError, match="at least 2"):
        paired_difference([0.5, 0.2], [0.1])


# ---------------------------------------------------------------------- numerical edge cases (issue #20)
NAN, INF = float("nan"), float("inf")


def test_nan_target_ranks_last_and_scores_nothing():
    # the repro: `scores >= nan` is all False, so the target used to get rank 0 → HR@1 = 1,
    # NDCG@1 = inf, AUC 1.33. A NaN target beats nothing: rank C = 4.
    ranks = target_ranks(np.array([[NAN, 0.1, 0.2, 0.3]]), np.array([0]))
    assert ranks.tolist() == [4]
    m = single_target_metrics(ranks, ks=(1, 4), n_candidates=4)
    assert m["HR@1"] == 0.0 and m["NDCG@1"] == 0.0 and m["MRR@1"] == 0.0 and m["AUC"] == 0.0
    assert m["HR@4"] == 1.0 and m["MRR@4"] == pytest.approx(1 / 4)


def test_non_finite_scores_rank_pessimistically():
    scores = np.array(
        [
            [NAN, NAN, NAN],  # all NaN (a diverged model): last, like a constant scorer
            [0.5, NAN, 0.1],  # a NaN competitor cannot be beaten: counted against the target
            [INF, 0.1, 0.2],  # +∞ is overflow, not confidence: a non-finite target ranks last
            [0.3, INF, 0.2],  # a +∞ competitor is above the target
            [0.3, -INF, 0.2],  # −∞ marks an excluded item: below any finite target (rank 1 here)
            [-INF, -INF, 0.2],  # a −∞ target is last (unchanged)
            [-INF, NAN, 0.2],
            [0.3, NAN, -INF],
        ]
    )
    assert target_ranks(scores, np.zeros(len(scores), np.int64)).tolist() == [3, 2, 3, 2, 1, 3, 3, 2]


def test_target_ranks_validates_its_input():
    with pytest.raises(ValueError, match=r"\[n, C\]"):
        target_ranks(np.zeros(3), np.array([0]))
    with pytest.raises(ValueError, match="one target column per row"):
        target_ranks(np.zeros((2, 3)), np.array([0]))
    with pytest.raises(ValueError, match="out of range"):
        target_ranks(np.zeros((2, 3)), np.array([0, 3]))
    with pytest.raises(ValueError, match="out of range"):
        target_ranks(np.zeros((1, 3)), np.array([-1]))
    assert target_ranks(np.zeros((0, 3)), np.zeros(0, np.int64)).tolist() == []


@pytest.mark.parametrize("bad", [[0], [1, 0], [-1], [NAN], [2, INF]])
def test_rank_metrics_refuse_ranks_below_one(bad):
    # a 0-based rank (or a NaN one) would give NDCG = inf, MRR = inf; refuse rather than report > 1
    with pytest.raises(ValueError, match="1-based"):
        single_target_metrics(np.array(bad, dtype=np.float64), ks=(1,))


def test_auc_refuses_ranks_beyond_the_list():
    with pytest.raises(ValueError, match="n_candidates"):
        single_target_metrics(np.array([1, 6]), ks=(1,), n_candidates=5)


def test_auc_counts_ties_as_losses():
    # target 0.5 vs negatives [0.5, 0.5, 0.1, 0.9]: beats 1 of 4 strictly, ties 2 → pessimistic rank 4,
    # AUC = (5 − 4)/4 = 0.25 (sklearn's half-credit rule would give (1 + ½·2)/4 = 0.5)
    ranks = target_ranks(np.array([[0.5, 0.5, 0.5, 0.1, 0.9]]), np.array([0]))
    assert ranks.tolist() == [4]
    assert single_target_metrics(ranks, ks=(1,), n_candidates=5)["AUC"] == pytest.approx(0.25)
    # a constant scorer gets AUC 0, not chance (0.5): a degenerate model can never look good
    const = target_ranks(np.ones((3, 5)), np.array([0, 2, 4]))
    assert single_target_metrics(const, ks=(1,), n_candidates=5)["AUC"] == 0.0


def test_multi_target_refuses_duplicates_in_a_ranked_list():
    # the repro: ranked [1, 1, 1, 2, 3], targets {1, 9} used to give Recall@3 = 1.5
    with pytest.raises(ValueError, match="item 1 twice"):
        multi_target_metrics([[1, 1, 1, 2, 3]], [[1, 9]], ks=(3,))
    # the duplicate is reported wherever it sits in the list (user 1, beyond the cut-off)
    with pytest.raises(ValueError, match="user 1"):
        multi_target_metrics([[1, 2, 3], [4, 5, 6, 4]], [[1], [4]], ks=(2,))


def test_multi_target_refuses_k_below_one():
    with pytest.raises(ValueError, match="ks"):
        multi_target_metrics([[1, 2]], [[1]], ks=(0,))


def test_multi_target_recall_stays_truncated_not_hits_over_targets():
    # 3 targets, K = 2, both top items relevant: truncated Recall@2 = 2/min(2, 3) = 1;
    # ranx / pytrec_eval's recall would be 2/3
    m = multi_target_metrics([[1, 2, 7, 8]], [[1, 2, 3]], ks=(2, 4))
    assert m["Recall@2"] == 1.0
    assert m["Recall@4"] == pytest.approx(2 / 3)
    assert m["NDCG@2"] == 1.0


# ---------------------------------------------------------------------- properties

_score = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([NAN, INF, -INF, 0.0, 1.0, -1.0]),  # make ties and non-finite values common
)


@st.composite
def _scored_rows(draw):
    n = draw(st.integers(1, 6))
    c = draw(st.integers(1, 8))
    scores = draw(hnp.arrays(np.float64, (n, c), elements=_score))
    target_col = draw(hnp.arrays(np.int64, (n,), elements=st.integers(0, c - 1)))
    ks = draw(st.lists(st.integers(1, 10), min_size=1, max_size=4, unique=True))
    return scores, target_col, ks


@settings(max_examples=300, deadline=None)
@given(_scored_rows())
def test_ranks_in_range_and_metrics_in_unit_interval(case):
    scores, target_col, ks = case
    n, c = scores.shape
    ranks = target_ranks(scores, target_col)
    assert ranks.dtype == np.int64 and ranks.shape == (n,)
    assert ((ranks >= 1) & (ranks <= c)).all()
    # a non-finite target never ranks above anything
    assert (ranks[~np.isfinite(scores[np.arange(n), target_col])] == c).all()
    m = single_target_metrics(ranks, ks, n_candidates=c)
    for name, v in m.items():
        assert 0.0 <= v <= 1.0, (name, v)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.lists(st.integers(0, 30), max_size=15),  # duplicates allowed: they must be refused
            st.lists(st.integers(0, 30), max_size=8),
        ),
        min_size=1,
        max_size=5,
    ),
    st.lists(st.integers(1, 20), min_size=1, max_size=3, unique=True),
)
def test_multi_target_metrics_in_unit_interval_or_refused(users, ks):
    ranked, targets = zip(*users)
    if any(len(set(r)) < len(r) for r in ranked):
        with pytest.raises(ValueError, match="twice"):
            multi_target_metrics(ranked, targets, ks)
        return
    m = multi_target_metrics(ranked, targets, ks)
    for name, v in m.items():
        assert np.isnan(v) or 0.0 <= v <= 1.0, (name, v)
    # NaN only when no user has a target (nothing to average)
    assert any(targets) != all(np.isnan(v) for v in m.values())
