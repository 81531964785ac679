"""DMPO's own settings: the pairwise-ranking prompt and the pairwise (AUC-like) evaluation protocol.

DMPO (Bai et al.) frames recommendation as "rank the likelihood of the user watching A and B": the prompt
shows the user's history and a few named options, and the answer is the title of the one the user
watched. The loss itself (``loss=dmpo`` of ``recalign align``) lives in
:mod:`recalign.objectives.preference`; this module adds what is specific to the paper's setting:

- **The ``pairwise`` prompt task**, registered with :func:`recalign.lm.prompts.register_template` when this
  module is imported (two phrasings, chosen per example by seed exactly like the ``next_item`` ones).
  Options are labelled ``A``, ``B``, ``C``, ... and listed in a seeded order, so the position of the
  watched item carries no signal. The answer is always the plain display title
  (:func:`recalign.lm.prompts.display_titles`), as in every other recalign task, so answers are scored
  and trained with the same :func:`~recalign.lm.prompts.encode_answer` rule.
- **Training on pairwise prompts** (``recalign align prompt=pairwise``): each preference example's prompt
  lists the positive and *its own K negatives* (and nothing else) as the options A, B, ... With K = 1
  this is exactly the paper's "A and B" prompt; with K > 1 (DMPO's multi-negative loss) the prompt names
  all 1 + K answers the loss compares, so every rejected answer is an option the model was shown --
  the same reason S-DPO draws its negatives from the prompt's candidate list. See
  :func:`preference_pairwise_prompts`.
- **Pairwise evaluation** (:func:`pairwise_accuracy`): for each test example, one prompt per pair
  (target, negative candidate) with the two in seeded order; both answers are scored with
  :func:`recalign.lm.scoring.answer_logprobs`, and a pair is correct when the target's answer log-prob
  is higher (ties count one half). The fraction of correct pairs is an AUC estimate of the model's
  pairwise preferences over the split's candidates (``PairAcc``); the per-example mean is reported too.

Kept free of torch at import time: models are only touched inside the evaluation functions.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from recalign.data.dataset import RecDataset
from recalign.errors import RecalignInputError
from recalign.evaluation.records import ResultRecord
from recalign.lm.prompts import (
    ANSWER_MARKER,
    TASK_TEMPLATES,
    PromptTemplate,
    display_titles,
    format_list,
    item_noun,
    recent_history,
    register_template,
    resolve_template,
)

TASK = "pairwise"
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
# Mixed into the option-order generator so it is not the candidate draw's or the template draw's stream.
_ORDER_SALT = 0xD3_0001
_PAIR_SALT = 0xD3_0002

PAIRWISE_TEMPLATES = [
    PromptTemplate(
        name="pairwise_rank",
        text=(
            "This user has watched these {nouns}, oldest first:\n{history}\n\n"
            "Rank the likelihood of the user watching {letters_and}:\n{options}\n\n"
            "Which {noun} is the user most likely to watch next? Reply with its title only.\n" + ANSWER_MARKER
        ),
        history_style="numbered",
    ),
    PromptTemplate(
        name="pairwise_choose",
        text=(
            "A user's most recent {nouns}: {history}.\n"
            "Is the user more likely to watch {letters_or}?\n{options}\n\n"
            "Give the exact title of the more likely {noun}.\n" + ANSWER_MARKER
        ),
        history_style="quoted",
    ),
]


def _register() -> None:
    """Register the phrasings once (re-importing this module must not raise on duplicate names)."""
    have = {t.name for t in TASK_TEMPLATES.get(TASK, [])}
    for t in PAIRWISE_TEMPLATES:
        if t.name not in have:
            register_template(TASK, t)


_register()


# ---------------------------------------------------------------------- prompts
def _join_letters(letters: Sequence[str], word: str) -> str:
    if len(letters) == 1:
        return letters[0]
    return f"{', '.join(letters[:-1])} {word} {letters[-1]}"


def render_pairwise(
    template: PromptTemplate,
    history_titles: Sequence[str],
    option_titles: Sequence[str],
    noun: str,
    nouns: str,
) -> str:
    """The prompt text of one pairwise example, options listed as ``A. Title`` in the given order."""
    if not 2 <= len(option_titles) <= len(LETTERS):
        raise RecalignInputError(
            f"a pairwise prompt needs 2..{len(LETTERS)} options, got {len(option_titles)}"
        )
    letters = list(LETTERS[: len(option_titles)])
    return template.text.format(
        noun=noun,
        nouns=nouns,
        history=format_list(history_titles, template.history_style),
        options="\n".join(f"{a}. {t}" for a, t in zip(letters, option_titles)),
        letters_and=_join_letters(letters, "and"),
        letters_or=_join_letters(letters, "or"),
    )


def option_order(seed: int, user: int, position: int, options: Sequence[int]) -> np.ndarray:
    """The seeded permutation in which ``options`` are shown (depends on the option *set*, not its order).

    Seeding by the sorted option ids makes a pair (target, c) read the same whichever way it is passed,
    and different pairs of the same example get independent orders.
    """
    key = [int(seed), int(user), int(position), _ORDER_SALT, *sorted(int(o) for o in options)]
    return np.random.default_rng(key).permutation(len(options))


def pairwise_prompt(
    dataset: RecDataset,
    history_idx: Sequence[int] | np.ndarray,
    option_idx: Sequence[int],
    *,
    seed: int = 0,
    user: int = 0,
    position: int = 0,
    max_history: int = 10,
    template: PromptTemplate | int | str | None = None,
    titles: Sequence[str] | None = None,
) -> tuple[str, list[int]]:
    """The pairwise prompt of one example and the options in the order shown (item indices).

    ``template=None`` picks the phrasing by ``(seed, user, position)``; ``titles`` (display titles of
    the whole catalogue) may be passed to avoid recomputing them per example.
    """
    t = resolve_template(template, seed=seed, user=user, position=position, task=TASK)
    hist = recent_history(history_idx, max_history)
    options = [int(o) for o in option_idx]
    if len(set(options)) != len(options):
        raise RecalignInputError(f"pairwise options must be distinct items, got {options}")
    ordered = sorted(options)  # the permutation applies to the sorted set: input order is irrelevant
    shown = [ordered[i] for i in option_order(seed, user, position, options)]
    titles = list(titles) if titles is not None else display_titles(dataset)
    noun, nouns = item_noun(dataset)
    hist_titles = [titles[int(h)] for h in hist]
    return render_pairwise(t, hist_titles, [titles[o] for o in shown], noun, nouns), shown


def preference_pairwise_prompts(
    dataset: RecDataset, examples: pd.DataFrame, rejected: np.ndarray, *, seed: int = 0, max_history: int = 10
) -> list[str]:
    """Pairwise prompts for preference training: row ``i`` lists its target and ``rejected[i]`` (K items).

    With K = 1 this is DMPO's "A and B" prompt; with K negatives the options are all 1 + K answers the
    loss compares, in seeded order (see the module docstring).
    """
    rejected = np.asarray(rejected, dtype=np.int64)
    if rejected.ndim != 2 or rejected.shape[0] != len(examples):
        raise RecalignInputError(f"rejected must be [n_examples={len(examples)}, K], got {rejected.shape}")
    titles = display_titles(dataset)
    out = []
    for row, (user, position, history, target) in enumerate(
        zip(examples["user"], examples["position"], examples["history"], examples["target"])
    ):
        prompt, _ = pairwise_prompt(
            dataset, history, [int(target), *rejected[row].tolist()], seed=seed, user=int(user),
            position=int(position), max_history=max_history, titles=titles,
        )  # fmt: skip
        out.append(prompt)
    return out


# ---------------------------------------------------------------------- evaluation
@dataclass
class PairwiseItem:
    """One evaluated pair: example row, the target and the negative, and the prompt shown."""

    row: int
    target: int
    negative: int
    prompt: str


def pairwise_items(
    dataset: RecDataset, examples: pd.DataFrame, *, seed: int = 0, max_history: int = 10, max_pairs: int = 0
) -> list[PairwiseItem]:
    """Every (target, negative candidate) pair of every example, with its prompt.

    ``max_pairs > 0`` keeps that many negatives per example, drawn without replacement by a generator
    seeded on ``(seed, user, position)`` (so the pairs of an example never depend on the other
    examples); 0 keeps all ``candidates - 1``.
    """
    titles = display_titles(dataset)
    out: list[PairwiseItem] = []
    for row, (user, position, history, target, cands) in enumerate(
        zip(
            examples["user"],
            examples["position"],
            examples["history"],
            examples["target"],
            examples["candidates"],
        )
    ):
        negs = [int(c) for c in cands if int(c) != int(target)]
        if not negs:
            raise RecalignInputError(f"example row {row} has no negative candidates")
        if 0 < max_pairs < len(negs):
            rng = np.random.default_rng([int(seed), int(user), int(position), _PAIR_SALT])
            negs = [negs[i] for i in np.sort(rng.choice(len(negs), size=max_pairs, replace=False))]
        for neg in negs:
            prompt, _ = pairwise_prompt(
                dataset, history, [int(target), neg], seed=seed, user=int(user), position=int(position),
                max_history=max_history, titles=titles,
            )  # fmt: skip
            out.append(PairwiseItem(row=row, target=int(target), negative=neg, prompt=prompt))
    return out


def pairwise_metrics(
    target_scores: np.ndarray, negative_scores: np.ndarray, rows: np.ndarray
) -> dict[str, float]:
    """``PairAcc`` (micro: over all pairs; ties count 1/2), ``PairAcc (per-example)`` (mean of each
    example's accuracy, so examples with more pairs do not weigh more) and ``n_pairs``."""
    t, n, rows = np.asarray(target_scores, float), np.asarray(negative_scores, float), np.asarray(rows)
    if len(t) == 0:
        raise RecalignInputError("no pairs to evaluate")
    correct = (t > n).astype(float) + 0.5 * (t == n)
    per_example = [correct[rows == r].mean() for r in np.unique(rows)]
    return {
        "PairAcc": float(correct.mean()),
        "PairAcc (per-example)": float(np.mean(per_example)),
        "n_pairs": float(len(correct)),
    }


@dataclass
class PairwiseResult:
    metrics: dict[str, float]
    items: list[PairwiseItem]
    target_scores: np.ndarray
    negative_scores: np.ndarray


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
    """Score both answers of every pair under its pairwise prompt and report pairwise accuracy.

    Each pair is one prompt with two answers (the target's and the negative's display titles), scored
    in one shared-prefix pass by :func:`recalign.lm.scoring.answer_logprobs` (summed answer-token
    log-probs, or their mean with ``length_normalize``). Encoder-decoder models get their own
    tokenisation rule (:func:`recalign.lm.seq2seq.encode_source` / ``encode_target``), as in every
    other protocol.
    """
    import torch

    from recalign.lm.scoring import answer_logprobs
    from recalign.lm.seq2seq import text_encoders

    enc_prompt, enc_answer = text_encoders(model, tokenizer)

    items = pairwise_items(dataset, examples, seed=seed, max_history=max_history, max_pairs=max_pairs)
    titles = display_titles(dataset)
    answer_ids: dict[int, list[int]] = {}

    def ans(i: int) -> list[int]:
        if i not in answer_ids:
            answer_ids[i] = enc_answer(titles[i])
        return answer_ids[i]

    was_training = bool(getattr(model, "training", False))
    model.eval()
    t_scores, n_scores = [], []
    try:
        with torch.no_grad():
            for start in range(0, len(items), batch_size):
                chunk = items[start : start + batch_size]
                prompts = [enc_prompt(it.prompt) for it in chunk]
                answers = [[ans(it.target), ans(it.negative)] for it in chunk]
                scores = answer_logprobs(model, prompts, answers, impl=impl)
                s = scores.mean if length_normalize else scores.sum
                s = s.float().cpu().numpy()
                t_scores.extend(s[:, 0].tolist())
                n_scores.extend(s[:, 1].tolist())
    finally:
        if was_training:
            model.train()
    t_arr, n_arr = np.asarray(t_scores), np.asarray(n_scores)
    metrics = pairwise_metrics(t_arr, n_arr, np.asarray([it.row for it in items]))
    return PairwiseResult(metrics=metrics, items=items, target_scores=t_arr, negative_scores=n_arr)


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
) -> ResultRecord:
    """:func:`pairwise_accuracy` as a result record (protocol ``pairwise``), like ``evaluate_lm``'s."""
    t0 = time.perf_counter()
    res = pairwise_accuracy(
        model, tokenizer, dataset, examples, seed=seed, max_history=max_history, max_pairs=max_pairs,
        batch_size=batch_size,
    )  # fmt: skip
    info = dict(extra or {})
    info["max_pairs"] = max_pairs
    return ResultRecord(
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


__all__ = [
    "PAIRWISE_TEMPLATES",
    "TASK",
    "PairwiseItem",
    "PairwiseResult",
    "evaluate_pairwise",
    "option_order",
    "pairwise_accuracy",
    "pairwise_items",
    "pairwise_metrics",
    "pairwise_prompt",
    "preference_pairwise_prompts",
    "render_pairwise",
]
