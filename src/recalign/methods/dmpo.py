"""DMPO's own settings: the pairwise-ranking prompt, its training rows and the pairwise protocol.

DMPO (Bai et al., CIKM 2024) frames recommendation as "rank the likelihood of the user watching A and
B": the prompt shows the user's history and exactly **two** items, and the answer is an *ordering* of
the two. This module holds what is specific to that setting (the loss itself, ``dmpo``, lives in
:mod:`recalign.objectives.preference`; the few-shot recipe in :mod:`recalign.methods.dmpo_fewshot`):

- **The pair-ranking prompt** (task ``pair_ranking``, :data:`PAIR_RANKING_TEMPLATES`, two phrasings
  chosen per example by seed like the ``next_item`` ones): history, then ``A. <title>`` and
  ``B. <title>`` in an order drawn by a generator seeded on ``(seed, user, position, the pair)``, so the
  position of the watched item carries no signal. :func:`pair_ranking_prompt`.
- **Ordering answers** (:func:`ordering_answer`): the two option lines of the prompt, most likely first.
  For a pair (positive p, negative n) the *chosen* answer is the ordering "p, n" and the *rejected*
  answer the reversed ordering "n, p" (:func:`pair_answers`); K negatives of one training example give K
  such prompts (:func:`pair_ranking_rows`).
- **The pairwise protocol** (:func:`pairwise_accuracy`): for every test pair both orderings are scored
  under the pair's prompt with :func:`recalign.lm.scoring.answer_logprobs` (one shared-prefix pass) and
  the pair is decided at pair level: correct when the positive-first ordering is strictly more likely
  (:func:`pairwise_metrics`: ``PairAcc``, its standard error, the per-example mean, and ``AUC``, the
  ROC AUC of "A first" against "the positive is option A", which a constant position bias cannot move).

Also kept, under their own names: the *choice* prompt (task ``pairwise``: options ``A``, ``B``, ...,
answer the watched item's title), which ``recalign align prompt=choice`` trains on
(:func:`pairwise_prompt`, :func:`preference_pairwise_prompts`).

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

#: DMPO's pair-ranking prompt: exactly two options, the answer is their ordering (:func:`ordering_answer`).
PAIR_TASK = "pair_ranking"
PAIR_RANKING_TEMPLATES = [
    PromptTemplate(
        name="pair_rank_list",
        text=(
            "This user has watched these {nouns}, oldest first:\n{history}\n\n"
            "Rank the likelihood of the user watching A and B:\n{options}\n\n"
            "List both {nouns}, the one the user is more likely to watch first.\n" + ANSWER_MARKER
        ),
        history_style="numbered",
    ),
    PromptTemplate(
        name="pair_rank_quoted",
        text=(
            "A user's most recent {nouns}: {history}.\n"
            "Rank the likelihood of this user watching A and B, most likely first:\n{options}\n"
            + ANSWER_MARKER
        ),
        history_style="quoted",
    ),
]


def _register_pair_ranking() -> None:
    have = {t.name for t in TASK_TEMPLATES.get(PAIR_TASK, [])}
    for t in PAIR_RANKING_TEMPLATES:
        if t.name not in have:
            register_template(PAIR_TASK, t)


_register_pair_ranking()


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


# ---------------------------------------------------------------------- pair ranking (the paper's prompt)
def option_line(letter: str, title: str) -> str:
    """One option as the prompt lists it and as an ordering answer repeats it: ``A. Title``."""
    return f"{letter}. {title}"


def ordering_answer(shown_titles: Sequence[str], first: int) -> str:
    """The answer ranking the two shown options with option ``first`` (0 = A, 1 = B) on top.

    The answer repeats the prompt's option lines, most likely first, one per line; the two orderings of
    a pair therefore hold the same lines and differ only in their order.
    """
    if len(shown_titles) != 2 or first not in (0, 1):
        raise RecalignInputError(
            f"an ordering ranks exactly two options, got {len(shown_titles)}, first={first}"
        )
    lines = [option_line(LETTERS[i], shown_titles[i]) for i in (0, 1)]
    return "\n".join([lines[first], lines[1 - first]])


def parse_ordering(answer: str) -> list[str]:
    """The option letters of an ordering answer, top first (``"B. x\nA. y"`` -> ``["B", "A"]``)."""
    return [line.split(".", 1)[0].strip() for line in answer.strip().splitlines() if line.strip()]


@dataclass
class PairRankingRow:
    """One pair-ranking prompt: an example row, its positive, one negative, and both orderings."""

    row: int
    user: int
    position: int
    positive: int
    negative: int
    shown: list[int]  # the two items as options A, B
    prompt: str
    chosen: str  # the ordering "positive, negative"
    rejected: str  # the reversed ordering "negative, positive"

    @property
    def positive_is_a(self) -> bool:
        return self.shown[0] == self.positive


def pair_ranking_prompt(
    dataset: RecDataset,
    history_idx: Sequence[int] | np.ndarray,
    pair: Sequence[int],
    *,
    seed: int = 0,
    user: int = 0,
    position: int = 0,
    max_history: int = 10,
    template: PromptTemplate | int | str | None = None,
    titles: Sequence[str] | None = None,
) -> tuple[str, list[int]]:
    """DMPO's prompt for one pair of items and the two items in the order shown (A, B).

    The display order is a seeded permutation of the *sorted* pair (:func:`option_order`), so it does
    not depend on the order ``pair`` is passed in; the phrasing is chosen per example by seed.
    """
    items = [int(o) for o in pair]
    if len(items) != 2 or items[0] == items[1]:
        raise RecalignInputError(f"a pair-ranking prompt names exactly two distinct items, got {items}")
    t = resolve_template(template, seed=seed, user=user, position=position, task=PAIR_TASK)
    ordered = sorted(items)
    shown = [ordered[i] for i in option_order(seed, user, position, items)]
    titles = list(titles) if titles is not None else display_titles(dataset)
    noun, nouns = item_noun(dataset)
    hist = [titles[int(h)] for h in recent_history(history_idx, max_history)]
    text = t.text.format(
        noun=noun,
        nouns=nouns,
        history=format_list(hist, t.history_style),
        options="\n".join(option_line(LETTERS[i], titles[o]) for i, o in enumerate(shown)),
    )
    return text, shown


def pair_answers(shown_titles: Sequence[str], positive_is_a: bool) -> tuple[str, str]:
    """(chosen, rejected): the ordering "positive, negative" and its reversal."""
    first = 0 if positive_is_a else 1
    return ordering_answer(shown_titles, first), ordering_answer(shown_titles, 1 - first)


def pair_ranking_rows(
    dataset: RecDataset,
    examples: pd.DataFrame,
    negatives: Sequence[Sequence[int]] | np.ndarray,
    *,
    seed: int = 0,
    max_history: int = 10,
    titles: Sequence[str] | None = None,
) -> list[list[PairRankingRow]]:
    """For every example row, one :class:`PairRankingRow` per negative (K negatives -> K prompts)."""
    negatives = [list(map(int, n)) for n in negatives]
    if len(negatives) != len(examples):
        raise RecalignInputError(f"{len(negatives)} negative lists for {len(examples)} examples")
    titles = list(titles) if titles is not None else display_titles(dataset)
    out: list[list[PairRankingRow]] = []
    for row, (user, position, history, target) in enumerate(
        zip(examples["user"], examples["position"], examples["history"], examples["target"])
    ):
        group = []
        for neg in negatives[row]:
            if int(neg) == int(target):
                raise RecalignInputError(f"example row {row}: a negative equals the target {int(target)}")
            prompt, shown = pair_ranking_prompt(
                dataset, history, [int(target), neg], seed=seed, user=int(user), position=int(position),
                max_history=max_history, titles=titles,
            )  # fmt: skip
            chosen, rejected = pair_answers([titles[o] for o in shown], shown[0] == int(target))
            group.append(
                PairRankingRow(row=row, user=int(user), position=int(position), positive=int(target),
                               negative=int(neg), shown=shown, prompt=prompt, chosen=chosen,
                               rejected=rejected)
            )  # fmt: skip
        out.append(group)
    return out


# ---------------------------------------------------------------------- evaluation
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


@dataclass
class PairwiseResult:
    metrics: dict[str, float]
    items: list[PairRankingRow]
    positive_first: np.ndarray  # log-prob of the ordering "positive, negative" per pair
    negative_first: np.ndarray  # log-prob of the reversed ordering

    @property
    def correct(self) -> np.ndarray:
        """``[n_pairs]`` 1.0 where the pair was decided for the positive (for paired comparisons)."""
        return ((self.positive_first - self.negative_first) > 0).astype(float)

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


def paired_difference(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Mean of ``a - b`` over the same pairs (e.g. correctness of two models) and its standard error."""
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    if len(d) < 2:
        return {"diff": float(d.mean()) if len(d) else float("nan"), "se": float("nan"), "n": float(len(d))}
    return {"diff": float(d.mean()), "se": float(d.std(ddof=1) / np.sqrt(len(d))), "n": float(len(d))}


__all__ = [
    "PAIRWISE_TEMPLATES",
    "PAIR_RANKING_TEMPLATES",
    "PAIR_TASK",
    "TASK",
    "PairRankingRow",
    "PairwiseResult",
    "evaluate_pairwise",
    "option_order",
    "ordering_answer",
    "paired_difference",
    "pair_answers",
    "pair_ranking_prompt",
    "pair_ranking_rows",
    "pairwise_accuracy",
    "pairwise_items",
    "pairwise_metrics",
    "pairwise_prompt",
    "parse_ordering",
    "preference_pairwise_prompts",
    "render_pairwise",
    "test_negatives",
]
