"""Prompt templates: the phrasings of every task, and which one an example gets.

Templates
---------
Templates are grouped by *task* in :data:`TASK_TEMPLATES` (``"next_item"``: pick the next item from a
candidate list). Each task has several phrasings; which one an example gets is a deterministic function of
``(seed, user, position)`` (:func:`choose_template`), so the same example always reads the same way in SFT,
preference training and evaluation, while the training set as a whole mixes phrasings. Other tasks (DMPO's
pairwise ranking, the knowledge-alignment tasks) register their own templates with
:func:`register_template` under a new task name; nothing here has to change.

Every template ends with an explicit answer marker (``"Answer:"``). The S-DPO reference templates do not
always have one, and its SFT collator silently trains on the wrong tokens when it is missing; here
:class:`PromptTemplate` refuses a template without its marker at the end.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from recalign.errors import RecalignInputError

ANSWER_MARKER = "Answer:"


@dataclass(frozen=True)
class PromptTemplate:
    """A phrasing of one task.

    ``text`` is a ``str.format`` template. For ``next_item`` it uses ``{noun}`` / ``{nouns}`` (e.g.
    movie / movies), ``{history}`` (the formatted history) and ``{candidates}`` (the formatted list); other
    tasks define their own fields. ``history_style`` / ``candidate_style`` choose how lists are written:
    ``"lines"`` (one title per line), ``"numbered"`` (``1. Title``) or ``"quoted"`` (``"A", "B"``).
    """

    name: str
    text: str
    history_style: str = "lines"
    candidate_style: str = "lines"
    answer_marker: str = ANSWER_MARKER

    def __post_init__(self) -> None:
        if not self.text.rstrip().endswith(self.answer_marker):
            raise ValueError(f"template {self.name!r} must end with its answer marker {self.answer_marker!r}")
        for style in (self.history_style, self.candidate_style):
            if style not in _LIST_STYLES:
                raise ValueError(f"template {self.name!r}: unknown list style {style!r}")


def _lines(titles: Sequence[str]) -> str:
    return "\n".join(titles)


def _numbered(titles: Sequence[str]) -> str:
    return "\n".join(f"{i}. {t}" for i, t in enumerate(titles, 1))


def _quoted(titles: Sequence[str]) -> str:
    return ", ".join(f'"{t}"' for t in titles)


_LIST_STYLES = {"lines": _lines, "numbered": _numbered, "quoted": _quoted}


def format_list(titles: Sequence[str], style: str = "lines") -> str:
    return _LIST_STYLES[style](titles)


NEXT_ITEM_TEMPLATES = [
    PromptTemplate(
        name="next_item_enjoyed",
        text=(
            "This user has enjoyed these {nouns}, in this order:\n{history}\n\n"
            "From the following candidates, which {noun} will the user choose next?\n{candidates}\n\n"
            "Reply with the title of one candidate only.\n" + ANSWER_MARKER
        ),
        history_style="numbered",
        candidate_style="lines",
    ),
    PromptTemplate(
        name="next_item_recommend",
        text=(
            "A user's most recent {nouns}, oldest first: {history}.\n"
            "Candidates: {candidates}.\n"
            "Recommend the one candidate {noun} this user is most likely to choose next. "
            "Give its exact title.\n" + ANSWER_MARKER
        ),
        history_style="quoted",
        candidate_style="quoted",
    ),
    PromptTemplate(
        name="next_item_predict",
        text=(
            "Interaction history of a user ({nouns}, from oldest to newest):\n{history}\n\n"
            "Predict the next {noun} this user will interact with. "
            "It is one of these {n_candidates} candidates:\n{candidates}\n\n" + ANSWER_MARKER
        ),
        history_style="lines",
        candidate_style="numbered",
    ),
    PromptTemplate(
        name="next_item_choose",
        text=(
            "You are a recommender system. The user liked: {history}.\n"
            "Choose exactly one {noun} from this list for the user to enjoy next:\n{candidates}\n\n"
            + ANSWER_MARKER
        ),
        history_style="quoted",
        candidate_style="lines",
    ),
]

#: Next item *without* a candidate list: used to score the whole catalogue (full ranking), where listing
#: candidates would leak the target. Same history formatting; ``{candidates}`` is not used.
OPEN_NEXT_ITEM_TEMPLATES = [
    PromptTemplate(
        name="open_enjoyed",
        text=(
            "This user has enjoyed these {nouns}, in this order:\n{history}\n\n"
            "Which {noun} will the user choose next? Reply with its title only.\n" + ANSWER_MARKER
        ),
        history_style="numbered",
    ),
    PromptTemplate(
        name="open_recommend",
        text=(
            "A user's most recent {nouns}, oldest first: {history}.\n"
            "Recommend one {noun} this user is likely to choose next. Give its exact title.\n" + ANSWER_MARKER
        ),
        history_style="quoted",
    ),
    PromptTemplate(
        name="open_predict",
        text=(
            "Interaction history of a user ({nouns}, from oldest to newest):\n{history}\n\n"
            "Predict the next {noun} this user will interact with.\n" + ANSWER_MARKER
        ),
        history_style="lines",
    ),
]

#: Task name -> list of phrasings. Add tasks with :func:`register_template`.
TASK_TEMPLATES: dict[str, list[PromptTemplate]] = {
    "next_item": list(NEXT_ITEM_TEMPLATES),
    "next_item_open": list(OPEN_NEXT_ITEM_TEMPLATES),
}

# Salt that separates the template draw from the candidate draw, which uses the same (seed, user, position).
_TEMPLATE_SALT = 7_340_033


def register_template(task: str, template: PromptTemplate) -> None:
    """Add a phrasing to ``task`` (creating the task). Names must be unique within a task."""
    existing = TASK_TEMPLATES.setdefault(task, [])
    if any(t.name == template.name for t in existing):
        raise ValueError(f"task {task!r} already has a template named {template.name!r}")
    existing.append(template)


def get_templates(task: str = "next_item") -> list[PromptTemplate]:
    if task not in TASK_TEMPLATES:
        raise RecalignInputError(
            f"unknown prompt task '{task}' (choose from {', '.join(sorted(TASK_TEMPLATES))})", field="task"
        )
    return TASK_TEMPLATES[task]


def choose_template(
    seed: int, user: int, position: int, task: str = "next_item"
) -> tuple[int, PromptTemplate]:
    """The phrasing of example ``(user, position)`` under ``seed``: deterministic, no Python ``hash``.

    Uses a numpy generator seeded with ``[seed, user, position, salt]`` (stable across processes and
    platforms, unlike ``hash()`` of a tuple of strings).
    """
    templates = get_templates(task)
    rng = np.random.default_rng([int(seed), int(user), int(position), _TEMPLATE_SALT])
    i = int(rng.integers(0, len(templates)))
    return i, templates[i]


def resolve_template(
    template: PromptTemplate | int | str | None,
    *,
    seed: int = 0,
    user: int = 0,
    position: int = 0,
    task: str = "next_item",
) -> PromptTemplate:
    """``None`` -> chosen by seed; an int -> by index; a str -> by name; a template -> itself."""
    if template is None:
        return choose_template(seed, user, position, task)[1]
    if isinstance(template, PromptTemplate):
        return template
    templates = get_templates(task)
    if isinstance(template, int):
        if not 0 <= template < len(templates):
            raise RecalignInputError(f"template index {template} out of range 0..{len(templates) - 1}")
        return templates[template]
    for t in templates:
        if t.name == template:
            return t
    raise RecalignInputError(
        f"unknown template '{template}' for task '{task}' (choose from {', '.join(t.name for t in templates)})"
    )
