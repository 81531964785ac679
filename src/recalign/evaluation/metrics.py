"""Ranking metrics, with the formulas and every tie, truncation and non-finite rule stated (libraries
disagree; the README's "Metric conventions" table is the short form).

Everything is computed from the **1-based rank** of each target among its row's C candidates:

    rank = C − #{j : s_j < s_t}         (the candidates the target strictly beats are below it)

- **Ties are counted against the target** (pessimistic): a target tied with another candidate is ranked
  below it, so a constant scorer gets rank C everywhere (HR@1 = 0, not 1) and a degenerate model can
  never look good. For finite scores this is the number of candidates scoring ``>= s_t``.
- **Non-finite scores** follow the same rule. A NaN, +∞ or −∞ *target* beats nothing: rank C (a diverged
  model scores nothing; +∞ is overflow, not confidence: no recalign scorer produces it). For a finite
  target, a NaN competitor cannot be beaten (``s_j < s_t`` is False), so it counts against the target
  like a tie; +∞ is above it; −∞ is below it (−∞ is how protocols exclude seen items). Hence
  ``1 <= rank <= C`` on every input, and every metric below lies in [0, 1].

- HR@K = 1[rank <= K]
- NDCG@K = 1[rank <= K] / log2(rank + 1) (RecBole's gain; with one target IDCG = 1). For several targets
  (full ranking with held-out sets) DCG sums 1/log2(rank+1) over hit targets and IDCG over the first
  min(K, |targets|) positions.
- MRR@K = 1[rank <= K] / rank
- Recall@K = hits@K / min(K, |targets|) (truncated, as in CLLM4Rec / Liang et al.'s VAE-CF; ranx and
  pytrec_eval divide by |targets|, which caps Recall@K below 1 whenever |targets| > K).
- AUC (one target among C candidates) = (C − rank) / (C − 1): the fraction of negatives the target
  strictly beats. **Ties are losses**, consistent with the pessimistic rank (AUC is a function of it):
  a constant scorer gets AUC 0, not the 0.5 of sklearn's half-credit rule (``roc_auc_score`` counts a
  tie as ½ a win). With continuous LM or embedding scores ties are rare and the two agree.
- ValidRatio: fraction of generated answers that name exactly one candidate (see ``generation``).

Ranks handed to the metric functions are checked: a rank below 1 (a 0-based rank, say) would give
NDCG = MRR = ∞, so it raises. A ranked list in :func:`multi_target_metrics` that names an item twice is
refused the same way (a ranking lists each item once; counting a repeat would push Recall above 1).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np


def target_ranks(scores: np.ndarray, target_col: np.ndarray) -> np.ndarray:
    """1-based pessimistic rank of ``scores[i, target_col[i]]`` within row ``i``, in ``[1, C]``.

    ``rank = C − #{j : scores[i, j] < target}``: ties, NaN competitors and +∞ competitors count
    against the target, −∞ competitors (excluded items) below it; a non-finite target ranks last (C).

    Args:
        scores: ``[n, C]`` higher is better. ``-inf`` marks excluded items (never above a finite
            target). NaN is never an advantage: see the module docstring.
        target_col: ``[n]`` column of the target in each row, ``0 <= target_col < C``.
    """
    scores = np.asarray(scores, dtype=np.float64)
    target_col = np.asarray(target_col, dtype=np.int64)
    if scores.ndim != 2:
        raise ValueError(f"scores must be [n, C], got shape {scores.shape}")
    n, c = scores.shape
    if target_col.shape != (n,):
        raise ValueError(
            f"need one target column per row: scores has {n} rows, target_col shape {target_col.shape}"
        )
    if n and (int(target_col.min()) < 0 or int(target_col.max()) >= c):
        bad = int(np.flatnonzero((target_col < 0) | (target_col >= c))[0])
        raise ValueError(f"row {bad}: target column {int(target_col[bad])} out of range for {c} candidates")
    t = scores[np.arange(n), target_col]
    beaten = (scores < t[:, None]).sum(axis=1)  # NaN on either side compares False: never beaten
    ranks = np.where(np.isfinite(t), c - beaten, c)
    return ranks.astype(np.int64)


def _checked_ranks(ranks, n_candidates: int | None = None) -> np.ndarray:
    ranks = np.asarray(ranks, dtype=np.float64)
    ok = (ranks >= 1) & np.isfinite(ranks)  # False for NaN too
    if not bool(ok.all()):
        raise ValueError(f"ranks are 1-based and finite (best = 1); got {ranks[~ok][0]}")
    if n_candidates is not None and ranks.size and not bool((ranks <= n_candidates).all()):
        raise ValueError(f"rank {ranks.max()} exceeds n_candidates = {n_candidates}")
    return ranks


def hit_values(ranks: np.ndarray, k: int) -> np.ndarray:
    """Each example's HR@k (1.0 or 0.0) from its target's rank: the terms :func:`hit_rate` averages."""
    return (_checked_ranks(ranks) <= k).astype(np.float64)


def ndcg_values(ranks: np.ndarray, k: int) -> np.ndarray:
    """Each example's NDCG@k (one target: 1/log2(rank+1) within k, else 0): the terms :func:`ndcg` averages."""
    ranks = _checked_ranks(ranks)
    return np.where(ranks <= k, 1.0 / np.log2(ranks + 1.0), 0.0)


def hit_rate(ranks: np.ndarray, k: int) -> float:
    values = hit_values(ranks, k)
    return float(values.mean()) if len(values) else float("nan")


def ndcg(ranks: np.ndarray, k: int) -> float:
    values = ndcg_values(ranks, k)
    return float(values.mean()) if len(values) else float("nan")


def mrr(ranks: np.ndarray, k: int) -> float:
    ranks = _checked_ranks(ranks)
    if not len(ranks):
        return float("nan")
    return float(np.where(ranks <= k, 1.0 / ranks, 0.0).mean())


def auc(ranks: np.ndarray, n_candidates: int) -> float:
    """Mean fraction of the ``n_candidates − 1`` negatives each target strictly beats (ties are losses)."""
    if n_candidates < 2:
        raise ValueError(f"AUC needs at least 2 candidates, got n_candidates = {n_candidates}")
    ranks = _checked_ranks(ranks, n_candidates)
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


def multi_target_per_user(
    ranked_lists: Iterable[Sequence[int]], targets: Iterable[Iterable[int]], ks: Sequence[int] = (20, 40, 100)
) -> dict[str, np.ndarray]:
    """Per-user Recall@K (truncated), NDCG@K and HR@K for users with *sets* of held-out items.

    The values whose means :func:`multi_target_metrics` reports, one per user that has targets, in input
    order: two models ranked for the same users can be compared user by user
    (:func:`paired_difference`), which has a much smaller standard error than comparing two means.

    Args:
        ranked_lists: per user, item ids best first (at least ``max(ks)`` long, seen items removed; a
            shorter list counts its missing positions as misses). Each item at most once: a list that
            names an item twice raises ``ValueError`` (a repeat would be counted as a second hit).
        targets: per user, the held-out items (a set: repeats are counted once). Users without
            targets are skipped.
        ks: cut-offs, each ``>= 1``.
    """
    if any(int(k) < 1 for k in ks):
        raise ValueError(f"ks must be >= 1, got {list(ks)}")
    recalls: dict[int, list[float]] = {k: [] for k in ks}
    ndcgs: dict[int, list[float]] = {k: [] for k in ks}
    hits: dict[int, list[float]] = {k: [] for k in ks}
    for user, (ranked, tgt) in enumerate(zip(ranked_lists, targets)):
        ranked = [int(x) for x in ranked]
        if len(set(ranked)) != len(ranked):
            seen: set[int] = set()
            dup = next(x for x in ranked if x in seen or seen.add(x))
            raise ValueError(f"user {user}: ranked list names item {dup} twice (each item may appear once)")
        tset = set(int(t) for t in tgt)
        if not tset:
            continue
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
    out: dict[str, np.ndarray] = {}
    for k in ks:
        out[f"Recall@{k}"] = np.asarray(recalls[k], dtype=np.float64)
        out[f"NDCG@{k}"] = np.asarray(ndcgs[k], dtype=np.float64)
        out[f"HR@{k}"] = np.asarray(hits[k], dtype=np.float64)
    return out


def multi_target_metrics(
    ranked_lists: Iterable[Sequence[int]], targets: Iterable[Iterable[int]], ks: Sequence[int] = (20, 40, 100)
) -> dict[str, float]:
    """Recall@K (truncated), NDCG@K and HR@K for users with *sets* of held-out items: the means of
    :func:`multi_target_per_user` (NaN when no user has targets)."""
    per_user = multi_target_per_user(ranked_lists, targets, ks)
    return {name: float(v.mean()) if len(v) else float("nan") for name, v in per_user.items()}


def paired_difference(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Mean of ``a - b`` over paired examples (the same users) with its standard error (sd / sqrt(n)).

    Pairing removes the spread between users that two separate means carry: for two recommenders scored
    on the same 943 users the standard error of the difference is typically a fraction of either mean's.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 1 or a.shape != b.shape or len(a) < 2:
        raise ValueError("a paired difference needs two equally long 1-D arrays of at least 2 values")
    d = a - b
    return {"diff": float(d.mean()), "se": float(d.std(ddof=1) / np.sqrt(len(d))), "n": int(len(d))}


def rmse(pred: np.ndarray, true: np.ndarray) -> float:
    pred, true = np.asarray(pred, float), np.asarray(true, float)
    return float(np.sqrt(np.mean((pred - true) ** 2)))


def mae(pred: np.ndarray, true: np.ndarray) -> float:
    pred, true = np.asarray(pred, float), np.asarray(true, float)
    return float(np.mean(np.abs(pred - true)))
