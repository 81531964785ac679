"""CLLM4Rec's evaluation protocol: a held-out *set* per user, ranked against the whole catalogue.

Zhu et al. follow the VAE-CF convention: hold out ~20% of every user's interactions and report
Recall@20/40 and NDCG@100 of a full ranking (seen items excluded). recalign holds out the **last**
20% by time (at least one item) rather than a random 20%: a random hold-out would put future items
in the training data of the sequential baselines (SASRec) and make the comparison unfair, while the
time-ordered hold-out is the same test for every method.

:func:`holdout_split` expresses it as an ordinary :class:`~recalign.data.splits.Split`, so every
recommender (baselines included) is fitted through the usual ``fit(dataset, split)``:

- ``train`` examples: every position before the cut (``Split.train_sequences`` is then exactly the
  first 80% of each user's sequence);
- one ``test`` example per user: ``history`` = the training part, ``target`` = the first held-out item
  (so the single-target protocols still run), ``candidates`` drawn exactly like the shared splits, and
  an extra ``targets`` column with the whole held-out set (minus items already in the history, which a
  full ranking that excludes seen items could never return).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from recalign.data.dataset import RecDataset
from recalign.data.splits import Split, sample_candidates
from recalign.evaluation.metrics import multi_target_metrics

HOLDOUT_SPLIT = "holdout"


def holdout_cut(n: int, ratio: float) -> int:
    """Index of the first held-out item of an ``n``-item sequence (>= 1 item held out and kept)."""
    n_hold = int(min(n - 1, max(1, round(ratio * n))))
    return n - n_hold


def holdout_split(dataset: RecDataset, ratio: float = 0.2, seed: int = 0, n_candidates: int = 20) -> Split:
    """Time-ordered per-user hold-out of ``ratio`` of the interactions (users with < 2 items: train only)."""
    seqs = dataset.sequences()
    ts_by_user = _timestamps(dataset)
    rows = []
    short = 0
    for u, s in enumerate(seqs):
        n = len(s)
        if n < 2:
            short += 1
            continue
        cut = holdout_cut(n, ratio)
        seen_sorted = np.unique(s)
        for p in range(1, cut):
            rows.append(
                {
                    "stage": "train",
                    "user": u,
                    "position": p,
                    "target": int(s[p]),
                    "timestamp": int(ts_by_user[u][p]),
                }
            )
        history = s[:cut]
        targets = np.setdiff1d(np.unique(s[cut:]), history)
        rows.append(
            {
                "stage": "test",
                "user": u,
                "position": cut,
                "target": int(s[cut]),
                "timestamp": int(ts_by_user[u][cut]),
                "targets": targets.astype(np.int64),
                "candidates": sample_candidates(
                    u, cut, int(s[cut]), seen_sorted, dataset.n_items, n_candidates, seed
                ),
            }
        )
    ex = pd.DataFrame(rows)
    ex["history"] = [seqs[u][:p] for u, p in zip(ex["user"], ex["position"])]
    ex["candidates"] = [c if isinstance(c, np.ndarray) else np.zeros(0, np.int64) for c in ex["candidates"]]
    ex["targets"] = [t if isinstance(t, np.ndarray) else np.zeros(0, np.int64) for t in ex["targets"]]
    notes = [f"last {ratio:.0%} of each user's interactions (by time, at least 1) held out"]
    if short:
        notes.append(f"{short} users with fewer than 2 interactions are train-only")
    return Split(
        dataset=dataset.name,
        name=HOLDOUT_SPLIT,
        examples=ex.reset_index(drop=True),
        n_items=dataset.n_items,
        seed=seed,
        n_candidates=n_candidates,
        notes=notes,
    )


def _timestamps(dataset: RecDataset) -> list[np.ndarray]:
    df = dataset.interactions.reset_index(drop=True)
    order = np.lexsort((np.arange(len(df)), df["timestamp"].to_numpy(), df["user_idx"].to_numpy()))
    users = df["user_idx"].to_numpy()[order]
    ts = df["timestamp"].to_numpy()[order]
    bounds = np.searchsorted(users, np.arange(dataset.n_users + 1))
    return [ts[bounds[u] : bounds[u + 1]] for u in range(dataset.n_users)]


def top_k_excluding_seen(scores: np.ndarray, histories: Sequence[np.ndarray], k: int) -> np.ndarray:
    """``[n, k]`` best items per row, best first, never an item of that row's history."""
    scores = np.array(scores, dtype=np.float64, copy=True)
    for i, h in enumerate(histories):
        if len(h):
            scores[i, np.asarray(h, dtype=np.int64)] = -np.inf
    k = min(k, scores.shape[1])
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1)


def evaluate_multi_target(
    model, examples: pd.DataFrame, ks: Sequence[int] = (20, 40, 100), batch_size: int = 256
) -> dict[str, float]:
    """Recall@K / NDCG@K / HR@K of ``model.score_all`` against each example's ``targets`` set."""
    ranked = []
    for start in range(0, len(examples), batch_size):
        chunk = examples.iloc[start : start + batch_size]
        scores = np.asarray(model.score_all(chunk), dtype=np.float64)
        ranked.extend(top_k_excluding_seen(scores, list(chunk["history"]), max(ks)))
    return multi_target_metrics(ranked, list(examples["targets"]), ks)
