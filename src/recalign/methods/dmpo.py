"""DMPO's own settings: the pairwise-ranking prompt, its training rows and the pairwise protocol.

DMPO (Bai et al., CIKM 2024) frames recommendation as "rank the likelihood of the user watching A and
B": the prompt shows the user's history and exactly **two** items, and the answer is an *ordering* of
the two. What is specific to that setting lives in four modules, each imported from where it is
defined; this one holds the evaluation protocol (the loss itself, ``dmpo``, lives in
:mod:`recalign.objectives.preference`; the few-shot recipe in :mod:`recalign.methods.dmpo_fewshot`):

- :mod:`recalign.methods.dmpo_prompts`: **the pair-ranking prompt** (task ``pair_ranking``,
  :data:`PAIR_RANKING_TEMPLATES`, two phrasings chosen per example by seed): history, then
  ``A. <title>`` and ``B. <title>`` in an order drawn by a generator seeded on
  ``(seed, user, position, the pair)``, so the position of the watched item carries no signal
  (:func:`pair_ranking_prompt`); **ordering answers** (:func:`ordering_answer`): the two option lines,
  most likely first; for a pair (positive p, negative n) the *chosen* answer is "p, n" and the
  *rejected* one "n, p" (:func:`pair_answers`), K negatives of one example give K prompts
  (:func:`pair_ranking_rows`); and the *choice* prompt (task ``pairwise``: options ``A``, ``B``, ...,
  answer the watched item's title) that ``recalign align prompt=choice`` trains on
  (:func:`pairwise_prompt`, :func:`preference_pairwise_prompts`).
- :mod:`recalign.methods.dmpo_metrics`: :func:`pairwise_metrics` (``PairAcc``, its standard error, the
  per-example mean, and ``AUC``, the ROC AUC of "A first" against "the positive is option A", which a
  constant position bias cannot move) and :func:`paired_difference`.
- :mod:`recalign.methods.dmpo_objective`: :class:`~recalign.methods.dmpo_objective.PairRankingObjective`,
  DMPO / S-DPO over the K pair-ranking prompts of a row.
- here, **the pairwise protocol** (:func:`pairwise_accuracy`): for every test pair
  (:func:`test_negatives`, :func:`pairwise_items`) both orderings are scored under the pair's prompt
  with :func:`recalign.lm.scoring.answer_logprobs` (one shared-prefix pass) and the pair is decided at
  pair level: correct when the positive-first ordering is strictly more likely;
  :func:`evaluate_pairwise` makes it a result record.

Kept free of torch at import time: models are only touched inside the evaluation functions.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pandas as pd

from recalign.data.dataset import RecDataset
from recalign.errors import RecalignInputError
from recalign.evaluation.records import ResultRecord
from recalign.methods.dmpo_metrics import pairwise_metrics
from recalign.methods.dmpo_prompts import PairRankingRow, pair_ranking_rows

# Mixed into the test-pair generator so it is not the option-order, candidate or template draw's stream.
_PAIR_SALT = 0xD3_0002


def test_negatives(examples: pd.DataFrame, *, seed: int = 0, max_pairs: int = 0) -> list[list[int]]:
    """The negatives each test example is paired with: ``max_pairs`` of its non-target candidates,
    drawn without replacement by a generator seeded on ``(seed, user, position)`` (so the pairs of an
    example never depend on the other examples); ``max_pairs=0`` keeps all ``candidates - 1``."""
    out = []
    for row, (user, position, target, cands) in enumerate(
        zip(examples["user"], examples["position"], examples["target"], examples["candidates"])
    ):
        negs = [int(c) for c in cands if int(c) != int(target)]
        if not negs:
            raise RecalignInputError(f"example row {row} has no negative candidates")
        if 0 < max_pairs < len(negs):
            rng = np.random.default_rng([int(seed), int(user), int(position), _PAIR_SALT])
            negs = [negs[i] for i in np.sort(rng.choice(len(negs), size=max_pairs, replace=False))]
        out.append(negs)
    return out


def pairwise_items(
    dataset: RecDataset, examples: pd.DataFrame, *, seed: int = 0, max_history: int = 10, max_pairs: int = 0
) -> list[PairRankingRow]:
    """Every evaluated (target, negative candidate) pair of every example, flat, with its prompt."""
    negs = test_negatives(examples, seed=seed, max_pairs=max_pairs)
    groups = pair_ranking_rows(dataset, examples, negs, seed=seed, max_history=max_history)
    return [r for g in groups for r in g]


def decided_for_positive(positive_first, negative_first) -> np.ndarray:
    """``[n_pairs]`` 1.0 where the "positive first" ordering is strictly more likely (ties and NaN: 0.0)."""
    return ((np.asarray(positive_first) - np.asarray(negative_first)) > 0).astype(float)


@dataclass
class PairwiseResult:
    metrics: dict[str, float]
    items: list[PairRankingRow]
    positive_first: np.ndarray  # log-prob of the ordering "positive, negative" per pair
    negative_first: np.ndarray  # log-prob of the reversed ordering

    @property
    def correct(self) -> np.ndarray:
        """``[n_pairs]`` 1.0 where the pair was decided for the positive (for paired comparisons)."""
        return decided_for_positive(self.positive_first, self.negative_first)

    def to_rows(self) -> list[dict]:
        return [
            {"row": it.row, "user": it.user, "position": it.position, "positive": it.positive,
             "negative": it.negative, "positive_is_a": it.positive_is_a,
             "positive_first": float(p), "negative_first": float(n)}
            for it, p, n in zip(self.items, self.positive_first, self.negative_first)
        ]  # fmt: skip


def pairwise_accuracy(
    model,
    tokenizer,
    dataset: RecDataset,
    examples: pd.DataFrame,
    *,
    seed: int = 0,
    max_history: int = 10,
    max_pairs: int = 0,
    batch_size: int = 8,
    length_normalize: bool = False,
    impl: str = "packed",
) -> PairwiseResult:
    """DMPO's pairwise protocol: both orderings of every (target, negative) pair, decided per pair.

    Each pair is one pair-ranking prompt with two answers (the orderings "target, negative" and
    "negative, target"), scored in one shared-prefix pass by :func:`recalign.lm.scoring.answer_logprobs`
    (summed answer-token log-probs, or their mean with ``length_normalize``). Encoder-decoder models get
    their own tokenisation rule (:func:`recalign.lm.seq2seq.text_encoders`), as in every other protocol.
    """
    import torch

    from recalign.lm.scoring import answer_logprobs
    from recalign.lm.seq2seq import text_encoders

    enc_prompt, enc_answer = text_encoders(model, tokenizer)
    items = pairwise_items(dataset, examples, seed=seed, max_history=max_history, max_pairs=max_pairs)
    was_training = bool(getattr(model, "training", False))
    model.eval()
    pos, neg = [], []
    try:
        with torch.no_grad():
            for start in range(0, len(items), batch_size):
                chunk = items[start : start + batch_size]
                prompts = [enc_prompt(it.prompt) for it in chunk]
                answers = [[enc_answer(it.chosen), enc_answer(it.rejected)] for it in chunk]
                scores = answer_logprobs(model, prompts, answers, impl=impl)
                s = (scores.mean if length_normalize else scores.sum).float().cpu().numpy()
                pos.extend(s[:, 0].tolist())
                neg.extend(s[:, 1].tolist())
    finally:
        if was_training:
            model.train()
    p_arr, n_arr = np.asarray(pos, dtype=float), np.asarray(neg, dtype=float)
    metrics = pairwise_metrics(
        p_arr, n_arr, np.asarray([it.row for it in items]), np.asarray([it.positive_is_a for it in items])
    )
    return PairwiseResult(metrics=metrics, items=items, positive_first=p_arr, negative_first=n_arr)


def evaluate_pairwise(
    model,
    tokenizer,
    dataset: RecDataset,
    examples: pd.DataFrame,
    *,
    method: str,
    split_name: str,
    seed: int = 0,
    max_history: int = 10,
    max_pairs: int = 0,
    batch_size: int = 8,
    command: str = "",
    extra: dict | None = None,
) -> tuple[ResultRecord, PairwiseResult]:
    """:func:`pairwise_accuracy` as a result record (protocol ``pairwise``) and the per-pair result."""
    t0 = time.perf_counter()
    res = pairwise_accuracy(
        model, tokenizer, dataset, examples, seed=seed, max_history=max_history, max_pairs=max_pairs,
        batch_size=batch_size,
    )  # fmt: skip
    info = dict(extra or {})
    info["max_pairs"] = max_pairs
    record = ResultRecord(
        dataset=dataset.name,
        split=split_name,
        protocol="pairwise",
        method=method,
        metrics=res.metrics,
        n_examples=len(examples),
        seed=seed,
        seconds=round(time.perf_counter() - t0, 2),
        command=command,
        extra=info,
    )
    return record, res


__all__ = ["PairwiseResult", "evaluate_pairwise", "pairwise_accuracy", "pairwise_items", "test_negatives"]
