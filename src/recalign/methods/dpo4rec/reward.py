"""The reward of a summary: how well the augmented recommender re-ranks the candidates given it.

For one user, one summary and the user's candidate list (the true next item plus distractors), the
knowledge-augmented recommender scores every candidate, and the reward measures the true item:

- ``logprob`` (the default): the log-probability of the true item under a softmax over the candidates'
  scores (:func:`logprob_rewards`, ``<= 0``). Continuous: every summary that moves the true item's score
  relative to the others earns a different reward, even when its rank does not change, so the best and
  worst of N samples almost never tie and nearly every user yields a DPO pair.
- ``rr``: the reciprocal rank 1/rank of the true item (:func:`reciprocal_rank_rewards`, in (0, 1]). It
  resolves every rank, not only the first K, but two summaries that leave the true item at the same rank
  still tie.
- ``ndcg``: NDCG@K of the true item, ``1 / log2(rank + 1)`` if ``rank <= K`` else 0 (K = ``reward_k``,
  RecBole's formula with IDCG = 1). Coarse: it is 0 for every summary that leaves the true item below
  rank K, and with 4 samples it tied for 123-127 of 150 ML-100K users (README), leaving ~25 pairs per round.

Ranks are 1-based with ties counted *against* the true item
(:func:`recalign.evaluation.metrics.target_ranks`, the pessimistic rule of every evaluation in recalign).
The reward depends on the summary only through its embedding, so two identical texts always earn the
same reward.
"""

from __future__ import annotations

import numpy as np

from recalign.evaluation.metrics import target_ranks


def ndcg_rewards(scores: np.ndarray, target_col: np.ndarray, k: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Per-row NDCG@k of the target and its pessimistic 1-based rank.

    Args:
        scores: ``[n, C]`` candidate scores, higher is better.
        target_col: ``[n]`` column of the true item in each row.
        k: cut-off; ranks beyond it earn 0.

    Returns:
        ``(rewards [n] float64, ranks [n] int64)``.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2:
        raise ValueError(f"scores must be [n, C], got shape {scores.shape}")
    ranks = target_ranks(scores, np.asarray(target_col, dtype=np.int64))
    rewards = np.where(ranks <= k, 1.0 / np.log2(ranks + 1.0), 0.0)
    return rewards, ranks


def target_columns(candidates: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Column of each row's target in its candidate list (the split guarantees it is present)."""
    candidates = np.asarray(candidates)
    targets = np.asarray(targets)
    hit = candidates == targets[:, None]
    if not bool(hit.any(axis=1).all()):
        bad = int(np.flatnonzero(~hit.any(axis=1))[0])
        raise ValueError(f"row {bad}: target {targets[bad]} is not among its candidates")
    return hit.argmax(axis=1)


def logprob_rewards(scores: np.ndarray, target_col: np.ndarray) -> np.ndarray:
    """Per-row log-softmax of the target's score over the candidates (``<= 0``; higher is better)."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2:
        raise ValueError(f"scores must be [n, C], got shape {scores.shape}")
    m = scores.max(axis=1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(scores - m).sum(axis=1))
    return scores[np.arange(len(scores)), np.asarray(target_col, dtype=np.int64)] - lse


def reciprocal_rank_rewards(scores: np.ndarray, target_col: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-row 1 / rank of the target (pessimistic ranks) and the rank."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2:
        raise ValueError(f"scores must be [n, C], got shape {scores.shape}")
    ranks = target_ranks(scores, np.asarray(target_col, dtype=np.int64))
    return 1.0 / ranks.astype(np.float64), ranks
