"""The reward of a summary: how well the augmented recommender re-ranks the candidates given it.

For one user, one summary and the user's candidate list (the true next item plus distractors), the
knowledge-augmented recommender scores every candidate; the reward is the NDCG@K of the true item:

    reward = 1 / log2(rank + 1)   if rank <= K,   else 0

with ``rank`` the 1-based rank of the true item among the candidates, ties counted *against* it
(:func:`recalign.evaluation.metrics.target_ranks`, the same pessimistic rule every evaluation in
recalign uses) and one relevant item, so IDCG = 1 (RecBole's formula). K = 5 by default
(``reward_k``). A summary that moves the true item from rank 3 to rank 1 earns 1 − 1/log2(4) = 0.5 more.

The reward depends on the summary only through its embedding, so two identical texts always earn the
same reward, and it is bounded in [0, 1] whatever the candidate count.

NDCG@K is coarse: it changes only when a summary moves the true item across another candidate, and it
is 0 for every summary when the true item stays below rank K. With few samples per user many users
therefore tie (and yield no DPO pair). :func:`logprob_rewards` is a continuous alternative
(``reward: logprob``): the log-probability of the true item under a softmax over the candidates' scores,
which rewards every step towards the top, not only rank changes.
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
