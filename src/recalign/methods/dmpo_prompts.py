"""DMPO's prompts and training rows: the pairwise-ranking prompt, its ordering answers, and the choice prompt.

Part of :mod:`recalign.methods.dmpo` (which re-exports every public name here; the pairwise metrics are in
:mod:`recalign.methods.dmpo_metrics`, the objective in :mod:`recalign.methods.dmpo_objective`):

- **The pair-ranking prompt** (task ``pair_ranking``, :data:`PAIR_RANKING_TEMPLATES`, two phrasings
  chosen per example by seed like the ``next_item`` ones): history, then ``A. <title>`` and
  ``B. <title>`` in an order drawn by a generator seeded on ``(seed, user, position, the pair)``, so the
  position of the watched item carries no signal. :func:`pair_ranking_prompt`.
- **Ordering answers** (:func:`ordering_answer`): the two option lines of the prompt, most likely first.
  For a pair (positive p, negative n) the *chosen* answer is the ordering "p, n" and the *rejected*
  answer the reversed ordering "n, p" (:func:`pair_answers`); K negatives of one training example give K
  such prompts (:func:`pair_ranking_rows`).
- **The choice prompt** (task ``pairwise``: options ``A``, ``B``, ..., answer the watched item's title),
  which ``recalign align prompt=choice`` trains on (:func:`pairwise_prompt`,
  :func:`preference_pairwise_prompts`).

Importing this module registers both tasks' phrasings (once). Free of torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from recalign.data.dataset import RecDataset
from recalign.errors import RecalignInputError
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


def _register(task: str, templates: list[PromptTemplate]) -> None:
    """Register a task's phrasings once (re-importing this module must not raise on duplicate names)."""
    have = {t.name for t in TASK_TEMPLATES.get(task, [])}
    for t in templates:
        if t.name not in have:
            register_template(task, t)


_register(TASK, PAIRWISE_TEMPLATES)

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


_register(PAIR_TASK, PAIR_RANKING_TEMPLATES)


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
    options = [int(o) for o in option_idx]
    if len(set(options)) != len(options):
        raise RecalignInputError(f"pairwise options must be distinct items, got {options}")
    t, hist_titles, shown, titles = _seeded_options(
        dataset, history_idx, options, TASK, seed, user, position, max_history, template, titles
    )
    noun, nouns = item_noun(dataset)
    return render_pairwise(t, hist_titles, [titles[o] for o in shown], noun, nouns), shown


def _seeded_options(dataset, history_idx, options, task, seed, user, position, max_history, template, titles):
    """What both option prompts share: the example's phrasing of ``task``, the recent history's titles,
    the options in their seeded display order (a permutation of the *sorted* set, so the input order is
    irrelevant) and the catalogue's display titles."""
    t = resolve_template(template, seed=seed, user=user, position=position, task=task)
    ordered = sorted(options)
    shown = [ordered[i] for i in option_order(seed, user, position, options)]
    titles = list(titles) if titles is not None else display_titles(dataset)
    hist_titles = [titles[int(h)] for h in recent_history(history_idx, max_history)]
    return t, hist_titles, shown, titles


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
    t, hist, shown, titles = _seeded_options(
        dataset, history_idx, items, PAIR_TASK, seed, user, position, max_history, template, titles
    )
    noun, nouns = item_noun(dataset)
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


__all__ = [
    "LETTERS",
    "PAIRWISE_TEMPLATES",
    "PAIR_RANKING_TEMPLATES",
    "PAIR_TASK",
    "TASK",
    "PairRankingRow",
    "option_line",
    "option_order",
    "ordering_answer",
    "pair_answers",
    "pair_ranking_prompt",
    "pair_ranking_rows",
    "pairwise_prompt",
    "parse_ordering",
    "preference_pairwise_prompts",
    "render_pairwise",
]
