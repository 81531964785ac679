"""Evaluation protocols over any :class:`~recalign.recommender.Recommender`.

- ``evaluate_candidates``: score the materialised candidate list of every example (target included),
  rank, compute HR/NDCG/MRR@K and AUC.
- ``evaluate_full``: score the whole catalogue, exclude items the user has already seen (everything in
  the example's history; the target is kept even if the user saw it before), rank the target.

Both take the examples frame of a :class:`~recalign.data.splits.Split` stage so that every method is
scored on exactly the same examples and the same candidates.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from recalign.evaluation.metrics import single_target_metrics, target_ranks


def candidate_ranks(scores: np.ndarray, examples: pd.DataFrame) -> np.ndarray:
    cands = np.stack(examples["candidates"].to_numpy())
    target_col = (cands == examples["target"].to_numpy()[:, None]).argmax(axis=1)
    return target_ranks(scores, target_col)


def evaluate_candidates(
    model, examples: pd.DataFrame, ks: Sequence[int] = (1, 5, 10, 20), batch_size: int = 512
) -> dict[str, float]:
    """Candidate-ranking metrics of ``model.score_candidates`` on ``examples``."""
    scores = []
    for start in range(0, len(examples), batch_size):
        chunk = examples.iloc[start : start + batch_size]
        scores.append(np.asarray(model.score_candidates(chunk), dtype=np.float64))
    s = np.concatenate(scores) if scores else np.zeros((0, 0))
    ranks = candidate_ranks(s, examples)
    n_c = len(examples["candidates"].iloc[0]) if len(examples) else None
    return single_target_metrics(ranks, [k for k in ks if n_c is None or k <= n_c], n_candidates=n_c)


def full_ranks(scores: np.ndarray, examples: pd.DataFrame) -> np.ndarray:
    """Rank of each target among all items, items in the history excluded (set to -inf).

    The target itself is never excluded, even when the user interacted with it before (re-consumption).
    """
    scores = np.array(scores, dtype=np.float64, copy=True)
    targets = examples["target"].to_numpy()
    rows = np.arange(len(scores))
    keep = scores[rows, targets].copy()
    for i, h in enumerate(examples["history"]):
        if len(h):
            scores[i, h] = -np.inf
    scores[rows, targets] = keep
    return target_ranks(scores, targets)


def evaluate_full(
    model, examples: pd.DataFrame, ks: Sequence[int] = (1, 5, 10, 20), batch_size: int = 256
) -> dict[str, float]:
    """Full-ranking metrics of ``model.score_all`` on ``examples`` (seen items excluded)."""
    ranks = []
    for start in range(0, len(examples), batch_size):
        chunk = examples.iloc[start : start + batch_size]
        ranks.append(full_ranks(model.score_all(chunk), chunk))
    r = np.concatenate(ranks) if ranks else np.zeros(0, np.int64)
    return single_target_metrics(r, ks)
