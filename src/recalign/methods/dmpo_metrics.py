"""DMPO's pairwise metrics: pair-level decisions from the two orderings' log-probs, and paired differences.

Part of :mod:`recalign.methods.dmpo` (which re-exports these names): pure numpy, no model.
:func:`pairwise_metrics` turns the scores of each pair's two orderings into ``PairAcc`` (with its
standard error and per-example mean) and ``AUC``, the ROC AUC of "A first" against "the positive is
option A", which a constant position bias cannot move; :func:`paired_difference` compares two models
on the same pairs.
"""

from __future__ import annotations

import numpy as np

from recalign.errors import RecalignInputError
from recalign.evaluation.metrics import paired_difference as shared_paired_difference


def _pessimistic_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """P(score of a label-1 pair > score of a label-0 pair); ties and NaN count as losses."""
    s = np.where(np.isnan(scores), -np.inf, scores)
    pos, neg = s[labels], s[~labels]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    neg_sorted = np.sort(neg)
    # for each positive, the negatives it strictly beats; a NaN (-inf) positive beats nothing
    beaten = np.searchsorted(neg_sorted, pos, side="left")
    beaten = np.where(np.isneginf(pos), 0, beaten)
    return float(beaten.sum() / (len(pos) * len(neg)))


def _hanley_mcneil_se(auc: float, n_pos: int, n_neg: int) -> float:
    """Standard error of an AUC (Hanley & McNeil 1982)."""
    if not np.isfinite(auc) or n_pos == 0 or n_neg == 0:
        return float("nan")
    q1, q2 = auc / (2 - auc), 2 * auc**2 / (1 + auc)
    var = (auc * (1 - auc) + (n_pos - 1) * (q1 - auc**2) + (n_neg - 1) * (q2 - auc**2)) / (n_pos * n_neg)
    return float(np.sqrt(max(var, 0.0)))


def pairwise_metrics(
    positive_first: np.ndarray,
    negative_first: np.ndarray,
    rows: np.ndarray,
    positive_is_a: np.ndarray | None = None,
) -> dict[str, float]:
    """Pair-level decisions from the log-probs of each pair's two orderings.

    Args:
        positive_first, negative_first: ``[n_pairs]`` log-prob of the ordering "positive, negative" and
            of the reversed ordering under the pair's prompt.
        rows: ``[n_pairs]`` the test example of each pair (for the per-example mean).
        positive_is_a: ``[n_pairs]`` whether the positive was shown as option A (for ``AUC``).

    Returns:
        ``PairAcc``: fraction of pairs whose positive-first ordering is *strictly* more likely (ties and
        NaN are wrong, the project's pessimistic rule); over one positive and m negatives this is the
        AUC of the model's target-vs-negative ranking. ``PairAcc SE``: its binomial standard error.
        ``PairAcc (per-example)``: the mean of each example's accuracy. ``AUC``: the ROC AUC of the
        score "A first" (log-prob of the A-first ordering minus the B-first one) against the label
        "the positive is option A", ties and NaN as losses; a model that always prefers the first-listed
        option, however strongly, gets ~0.5 here while its ``PairAcc`` is the share of pairs that
        happen to show the positive first. ``AUC SE`` (Hanley-McNeil), ``A-first rate`` (position bias:
        share of pairs where the A-first ordering wins) and ``n_pairs``.
    """
    p = np.asarray(positive_first, dtype=float)
    n = np.asarray(negative_first, dtype=float)
    rows = np.asarray(rows)
    if len(p) == 0:
        raise RecalignInputError("no pairs to evaluate")
    if not (len(p) == len(n) == len(rows)):
        raise RecalignInputError(f"{len(p)}, {len(n)} and {len(rows)} scores/rows differ in length")
    margin = p - n  # NaN when either ordering's score is NaN
    correct = (margin > 0).astype(float)  # NaN > 0 is False: a NaN pair is wrong
    acc = float(correct.mean())
    per_example = [correct[rows == r].mean() for r in np.unique(rows)]
    out = {
        "PairAcc": acc,
        "PairAcc SE": float(np.sqrt(acc * (1 - acc) / len(correct))),
        "PairAcc (per-example)": float(np.mean(per_example)),
        "n_pairs": float(len(correct)),
    }
    if positive_is_a is not None:
        a = np.asarray(positive_is_a, dtype=bool)
        a_first = np.where(a, margin, -margin)  # log-prob(A-first ordering) - log-prob(B-first ordering)
        auc = _pessimistic_auc(a_first, a)
        out["AUC"] = auc
        out["AUC SE"] = _hanley_mcneil_se(auc, int(a.sum()), int((~a).sum()))
        out["A-first rate"] = float(np.mean(a_first > 0))
    return out


def paired_difference(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Mean of ``a - b`` over the same pairs (e.g. correctness of two models) and its standard error.

    :func:`recalign.evaluation.metrics.paired_difference`, made lenient for DMPO's few-shot tables: a
    domain with fewer than two test pairs gives a NaN standard error instead of an error, so one tiny
    domain does not stop the others from being reported.
    """
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape == b.shape and a.ndim == 1 and len(a) < 2:
        return {
            "diff": float((a - b).mean()) if len(a) else float("nan"),
            "se": float("nan"),
            "n": float(len(a)),
        }
    out = shared_paired_difference(a, b)
    return {**out, "n": float(out["n"])}


__all__ = ["paired_difference", "pairwise_metrics"]
