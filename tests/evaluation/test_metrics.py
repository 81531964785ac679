import math

import numpy as np
import pytest

from recalign.evaluation.metrics import multi_target_metrics, single_target_metrics, target_ranks


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
