"""Ranking metrics, with the formulas stated (libraries disagree; see DESIGN.md section 6).

Everything is computed from the **1-based rank** of each target. Ties are counted *against* the target
(pessimistic): a target tied with another candidate is ranked below it. This makes a constant scorer
score HR@1 = 0 rather than 1, so a degenerate model can never look good.

- HR@K = 1[rank <= K]
- NDCG@K = 1[rank <= K] / log2(rank + 1) (RecBole's gain; with one target IDCG = 1). For several targets
  (full ranking with held-out sets) DCG sums 1/log2(rank+1) over hit targets and IDCG over the first
  min(K, |targets|) positions.
- MRR@K = 1[rank <= K] / rank
- Recall@K = hits@K / min(K, |targets|) (truncated, as in CLLM4Rec / Liang et al.'s VAE-CF)
- AUC (one target among C candidates) = (C - rank) / (C - 1): the fraction of negatives ranked below it.
- ValidRatio: fraction of generated answers that name exactly one candidate (see ``generation``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np


def target_ranks(scores: np.ndarray, target_col: np.ndarray) -> np.ndarray:
    """1-based pessimistic rank of ``scores[i, target_col[i]]`` within row ``i``.

    Args:
        scores: ``[n, C]`` higher is better. ``-inf`` marks excluded items (never above the target
            unless the target itself is ``-inf``).
        target_col: ``[n]`` column of the target in each row.
    """
    scores = np.asarray(scores, dtype=np.float64)
    target_col = np.asarray(target_col, dtype=np.int64)
    t = scores[np.arange(len(scores)), target_col][:, None]
    greater_or_equal = (scores >= t).sum(axis=1)  # includes the target itself
    return greater_or_equal.astype(np.int64)


def hit_rate(ranks: np.ndarray, k: int) -> float:
    ranks = np.asarray(ranks)
    return float((ranks <= k).mean()) if len(ranks) else float("nan")


def ndcg(ranks: np.ndarray, k: int) -> float:
    ranks = np.asarray(ranks, dtype=np.float64)
    if not len(ranks):
        return float("nan")
    return float(np.where(ranks <= k, 1.0 / np.log2(ranks + 1.0), 0.0).mean())


def mrr(ranks: np.ndarray, k: int) -> float:
    ranks = np.asarray(ranks, dtype=np.float64)
    if not len(ranks):
        return float("nan")
    return float(np.where(ranks <= k, 1.0 / ranks, 0.0).mean())


def auc(ranks: np.ndarray, n_candidates: int) -> float:
    ranks = np.asarray(ranks, dtype=np.float64)
    if not len(ranks):
        return float("nan")
    return float(((n_candidates - ranks) / (n_candidates - 1)).mean())


def single_target_metrics(
    ranks: np.ndarray, ks: Sequence[int] = (1, 5, 10, 20), n_candidates: int | None = None
) -> dict[str, float]:
    """HR/NDCG/MRR at every K (and AUC when the list length is known)."""
    out: dict[str, float] = {}
    for k in ks:
        out[f"HR@{k}"] = hit_rate(ranks, k)
        out[f"NDCG@{k}"] = ndcg(ranks, k)
        out[f"MRR@{k}"] = mrr(ranks, k)
    if n_candidates is not None and n_candidates > 1:
        out["AUC"] = auc(ranks, n_candidates)
    return out


def multi_target_metrics(
    ranked_lists: Iterable[Sequence[int]], targets: Iterable[Iterable[int]], ks: Sequence[int] = (20, 40, 100)
) -> dict[str, float]:
    """Recall@K (truncated), NDCG@K and HR@K for users with *sets* of held-out items.

    Args:
        ranked_lists: per user, item ids best first (at least ``max(ks)`` long, seen items removed).
        targets: per user, the held-out items.
    """
    recalls: dict[int, list[float]] = {k: [] for k in ks}
    ndcgs: dict[int, list[float]] = {k: [] for k in ks}
    hits: dict[int, list[float]] = {k: [] for k in ks}
    for ranked, tgt in zip(ranked_lists, targets):
        tset = set(int(t) for t in tgt)
        if not tset:
            continue
        ranked = [int(x) for x in ranked]
        for k in ks:
            top = ranked[:k]
            rel = np.array([1.0 if it in tset else 0.0 for it in top])
            n_hit = rel.sum()
            recalls[k].append(n_hit / min(k, len(tset)))
            discounts = 1.0 / np.log2(np.arange(2, len(top) + 2))
            dcg = float((rel * discounts).sum())
            idcg = float((1.0 / np.log2(np.arange(2, min(k, len(tset)) + 2))).sum())
            ndcgs[k].append(dcg / idcg)
            hits[k].append(1.0 if n_hit > 0 else 0.0)
    out: dict[str, float] = {}
    for k in ks:
        out[f"Recall@{k}"] = float(np.mean(recalls[k])) if recalls[k] else float("nan")
        out[f"NDCG@{k}"] = float(np.mean(ndcgs[k])) if ndcgs[k] else float("nan")
        out[f"HR@{k}"] = float(np.mean(hits[k])) if hits[k] else float("nan")
    return out


def rmse(pred: np.ndarray, true: np.ndarray) -> float:
    pred, true = np.asarray(pred, float), np.asarray(true, float)
    return float(np.sqrt(np.mean((pred - true) ** 2)))


def mae(pred: np.ndarray, true: np.ndarray) -> float:
    pred, true = np.asarray(pred, float), np.asarray(true, float)
    return float(np.mean(np.abs(pred - true)))
