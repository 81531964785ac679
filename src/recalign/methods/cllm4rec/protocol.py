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


def valid_cut(n: int, cut: int, ratio: float) -> int | None:
    """Index of the first validation item of an ``n``-item sequence whose test part starts at ``cut``:
    ``round(ratio·n)`` items (at least 1) just before the test part, keeping >= 1 training item;
    None when ``ratio`` is 0 or the training part is too short to give any."""
    if ratio <= 0 or cut < 2:
        return None
    n_val = int(min(cut - 1, max(1, round(ratio * n))))
    return cut - n_val


def holdout_split(
    dataset: RecDataset,
    ratio: float = 0.2,
    seed: int = 0,
    n_candidates: int = 20,
    valid_ratio: float = 0.0,
) -> Split:
    """Time-ordered per-user hold-out of ``ratio`` of the interactions (users with < 2 items: train only).

    With ``valid_ratio`` > 0 the ``valid_ratio`` of each user's interactions just before the test part
    is a validation target set (stage ``valid``, history = the training part before it): models train
    on what precedes it (``Split.train_sequences``), early stopping reads it, and the test example's
    history still holds every item before the test part, as in ``loo`` (whose test history holds the
    validation item). The test targets do not depend on ``valid_ratio``.
    """
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
        vcut = valid_cut(n, cut, valid_ratio)
        train_end = vcut if vcut is not None else cut
        seen_sorted = np.unique(s)
        for p in range(1, train_end):
            rows.append(
                {
                    "stage": "train",
                    "user": u,
                    "position": p,
                    "target": int(s[p]),
                    "timestamp": int(ts_by_user[u][p]),
                }
            )
        stages = [("test", cut, n)] if vcut is None else [("valid", vcut, cut), ("test", cut, n)]
        for stage, start, stop in stages:
            targets = np.setdiff1d(np.unique(s[start:stop]), s[:start])
            rows.append(
                {
                    "stage": stage,
                    "user": u,
                    "position": start,
                    "target": int(s[start]),
                    "timestamp": int(ts_by_user[u][start]),
                    "targets": targets.astype(np.int64),
                    "candidates": sample_candidates(
                        u, start, int(s[start]), seen_sorted, dataset.n_items, n_candidates, seed
                    ),
                }
            )
    ex = pd.DataFrame(rows)
    ex["history"] = [seqs[u][:p] for u, p in zip(ex["user"], ex["position"])]
    ex["candidates"] = [c if isinstance(c, np.ndarray) else np.zeros(0, np.int64) for c in ex["candidates"]]
    ex["targets"] = [t if isinstance(t, np.ndarray) else np.zeros(0, np.int64) for t in ex["targets"]]
    notes = [f"last {ratio:.0%} of each user's interactions (by time, at least 1) held out"]
    if valid_ratio > 0:
        notes.append(f"the {valid_ratio:.0%} before it is the validation target set (stage 'valid')")
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
    """``[n, k]`` best items per row, best first; ties keep the lower item index first.

    Order: every unseen item with a number (``+inf`` to ``-inf``), then unseen items scored NaN, then
    the row's history items — so a NaN never ranks above a real score, and a history item appears only
    when ``k`` exceeds the row's unseen items (callers that serve cut the list there).
    """
    scores = np.array(scores, dtype=np.float64, copy=True)
    group = np.where(np.isnan(scores), 1, 0).astype(np.int8)
    for i, h in enumerate(histories):
        if len(h):
            group[i, np.asarray(h, dtype=np.int64)] = 2
    key = np.where(group == 0, -scores, 0.0)  # ascending sort key within the finite-and-unseen group
    k = min(k, scores.shape[1])
    # lexsort: last key is primary. Item index as the final tie-break keeps the order deterministic.
    idx = np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
    order = np.lexsort((idx, key, group), axis=1)
    return np.ascontiguousarray(order[:, :k])


def with_targets(examples: pd.DataFrame) -> pd.DataFrame:
    """The hold-out examples that have targets: the users a multi-target metric is computed over."""
    return examples[[len(x) > 0 for x in examples["targets"]]]


def rank_all(model, examples: pd.DataFrame, k: int = 100, batch_size: int = 256) -> list[np.ndarray]:
    """Per example, the ``k`` best unseen items of ``model.score_all`` (best first), in example order."""
    ranked: list[np.ndarray] = []
    for start in range(0, len(examples), batch_size):
        chunk = examples.iloc[start : start + batch_size]
        scores = np.asarray(model.score_all(chunk), dtype=np.float64)
        ranked.extend(top_k_excluding_seen(scores, list(chunk["history"]), k))
    return ranked


def evaluate_multi_target(
    model, examples: pd.DataFrame, ks: Sequence[int] = (20, 40, 100), batch_size: int = 256
) -> dict[str, float]:
    """Recall@K / NDCG@K / HR@K of ``model.score_all`` against each example's ``targets`` set."""
    ranked = rank_all(model, examples, max(ks), batch_size)
    return multi_target_metrics(ranked, list(examples["targets"]), ks)
