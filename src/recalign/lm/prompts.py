"""Every prompt recalign shows a language model, and the one rule for turning prompts into tokens.

Templates (:mod:`recalign.lm.prompt_templates`)
-----------------------------------------------
Phrasings grouped by task, chosen per example by ``(seed, user, position)``, each ending with its answer
marker: see that module's docstring.

Item text: the history is the last ``max_history`` (default 10) items, oldest first, as titles with the
year (MovieLens titles already end with ``(year)``; for catalogues with a separate ``year`` column and a
title without it, the year is appended). Candidates are listed one per line, in the split's order (the
split already places the target at a seeded random slot).

Tokenisation (:mod:`recalign.lm.prompt_encoding`)
-------------------------------------------------
:func:`encode_prompt` and :func:`encode_answer` are the *only* way prompts and answers become token ids in
recalign; see that module for the rule for chat and plain tokenizers.

This module renders the prompts and re-exports the names of both submodules, so
``from recalign.lm.prompts import encode_prompt, PromptTemplate`` keeps working.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from recalign.data.dataset import RecDataset
from recalign.errors import RecalignInputError
from recalign.lm.prompt_encoding import (
    ITEM_SLOT_CLOSE,
    ITEM_SLOT_OPEN,
    encode_answer,
    encode_prompt,
    end_of_turn_id,
    is_chat_tokenizer,
    item_slot,
    soft_token_id,
    stop_token_ids,
)
from recalign.lm.prompt_templates import (
    ANSWER_MARKER,
    NEXT_ITEM_TEMPLATES,
    OPEN_NEXT_ITEM_TEMPLATES,
    TASK_TEMPLATES,
    PromptTemplate,
    choose_template,
    format_list,
    get_templates,
    register_template,
    resolve_template,
)

__all__ = [
    "ANSWER_MARKER",
    "ITEM_SLOT_CLOSE",
    "ITEM_SLOT_OPEN",
    "NEXT_ITEM_TEMPLATES",
    "OPEN_NEXT_ITEM_TEMPLATES",
    "TASK_TEMPLATES",
    "PromptExample",
    "PromptTemplate",
    "build_candidate_prompt",
    "build_open_prompt",
    "choose_template",
    "display_titles",
    "encode_answer",
    "encode_prompt",
    "end_of_turn_id",
    "examples_to_prompts",
    "format_list",
    "get_templates",
    "is_chat_tokenizer",
    "item_noun",
    "item_slot",
    "prompt_item_texts",
    "recent_history",
    "register_template",
    "render_next_item",
    "resolve_template",
    "soft_token_id",
    "stop_token_ids",
]


# ---------------------------------------------------------------------- item text
def item_noun(dataset: RecDataset) -> tuple[str, str]:
    """(singular, plural) noun for the dataset's items: movies for MovieLens, artists for LastFM."""
    name = dataset.name.lower()
    if name.startswith(("ml-", "ml_", "movielens")) or name in {"ml100k", "ml1m", "ml-100k", "ml-1m"}:
        return "movie", "movies"
    if "lastfm" in name or "last.fm" in name:
        return "artist", "artists"
    if "book" in name:
        return "book", "books"
    return "item", "items"


def _title_with_year(title: str, year: object) -> str:
    title = " ".join(str(title).split())
    if isinstance(year, float) and not np.isnan(year):
        year = int(year)
    y = str(year).strip() if year is not None and not (isinstance(year, float) and np.isnan(year)) else ""
    if y and y.lower() != "nan" and not title.endswith(f"({y})"):
        return f"{title} ({y})"
    return title


def display_titles(dataset: RecDataset, item_idx: Sequence[int] | np.ndarray | None = None) -> list[str]:
    """Titles as they appear in prompts and answers: whitespace collapsed, year appended if missing.

    These strings are also the *answers* scored for each candidate, and what generated text is matched
    against, so every stage must get titles from here.
    """
    items = dataset.items
    if item_idx is not None:
        items = items.iloc[np.asarray(item_idx, dtype=np.int64)]
    titles = items["title"].tolist()
    years = items["year"].tolist() if "year" in items.columns else [None] * len(titles)
    return [_title_with_year(t, y) for t, y in zip(titles, years)]


def _field_text(value: object) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    text = str(value).strip()
    return ", ".join(p.strip() for p in text.split("|") if p.strip()) if "|" in text else text


def prompt_item_texts(
    dataset: RecDataset,
    item_idx: Sequence[int] | np.ndarray | None = None,
    fields: Sequence[str] = (),
    *,
    item_tokens: bool = False,
) -> list[str]:
    """Items as listed *in prompts*: the display title, then optional catalogue fields in brackets,
    e.g. ``Toy Story (1995) [genres: Animation, Children's, Comedy]`` for ``fields=("genres",)``.

    Fields missing from the catalogue or empty for an item are skipped. Answers stay plain display
    titles (:func:`display_titles`); only the prompt text gets the extra fields. ``item_tokens`` puts
    the item's soft-token mark (:func:`item_slot`) right after its title (``Title<emb> [genres: ...]``).
    """
    titles = display_titles(dataset, item_idx)
    fields = [f for f in fields if f != "title" and f in dataset.items.columns]
    if item_tokens:
        idx = range(len(dataset.items)) if item_idx is None else np.asarray(item_idx, dtype=np.int64)
        listed = prompt_item_texts(dataset, item_idx, fields)
        return [t + item_slot(int(i)) + text[len(t) :] for t, text, i in zip(titles, listed, idx)]
    if not fields:
        return titles
    items = dataset.items
    if item_idx is not None:
        items = items.iloc[np.asarray(item_idx, dtype=np.int64)]
    columns = {f: items[f].tolist() for f in fields}
    out = []
    for k, title in enumerate(titles):
        extras = [f"{f}: {v}" for f in fields if (v := _field_text(columns[f][k]))]
        out.append(f"{title} [{'; '.join(extras)}]" if extras else title)
    return out


# ---------------------------------------------------------------------- prompts
@dataclass
class PromptExample:
    """One next-item example rendered as text.

    ``candidates`` are the candidate titles in the split's order (so ``candidates.index(target)`` is the
    target column, unless two candidates share a title), ``target`` the target's title.
    """

    prompt: str
    candidates: list[str]
    target: str
    user: int
    position: int


def recent_history(history_idx: Sequence[int] | np.ndarray, max_history: int | None) -> np.ndarray:
    """The last ``max_history`` items of a history (all of them when None or <= 0), oldest first."""
    hist = np.asarray(history_idx, dtype=np.int64)
    return hist[-max_history:] if max_history is not None and max_history > 0 else hist


def render_next_item(
    template: PromptTemplate,
    history_titles: Sequence[str],
    candidate_titles: Sequence[str],
    noun: str,
    nouns: str,
) -> str:
    return template.text.format(
        noun=noun,
        nouns=nouns,
        history=format_list(history_titles, template.history_style),
        candidates=format_list(candidate_titles, template.candidate_style),
        n_candidates=len(candidate_titles),
    )


def build_candidate_prompt(
    dataset: RecDataset,
    history_idx: Sequence[int] | np.ndarray,
    candidate_idx: Sequence[int] | np.ndarray,
    *,
    template: PromptTemplate | int | str | None = None,
    seed: int = 0,
    user: int = 0,
    position: int = 0,
    max_history: int = 10,
    item_fields: Sequence[str] = (),
    item_tokens: bool = False,
) -> str:
    """The next-item prompt for one example (history = last ``max_history`` items, oldest first).

    ``item_fields`` adds catalogue fields (e.g. ``("genres",)``) to listed items; see
    :func:`prompt_item_texts`. ``item_tokens`` marks a soft item token after every listed title
    (hybrid prompts, :mod:`recalign.lm.hybrid`).
    """
    t = resolve_template(template, seed=seed, user=user, position=position)
    candidates = prompt_item_texts(dataset, candidate_idx, item_fields, item_tokens=item_tokens)
    return _history_prompt(dataset, t, history_idx, candidates, max_history, item_fields, item_tokens)


def build_open_prompt(
    dataset: RecDataset,
    history_idx: Sequence[int] | np.ndarray,
    *,
    template: PromptTemplate | int | str | None = None,
    seed: int = 0,
    user: int = 0,
    position: int = 0,
    max_history: int = 10,
    item_fields: Sequence[str] = (),
    item_tokens: bool = False,
) -> str:
    """The next-item prompt without candidates (task ``next_item_open``), for whole-catalogue scoring."""
    t = resolve_template(template, seed=seed, user=user, position=position, task="next_item_open")
    return _history_prompt(dataset, t, history_idx, [], max_history, item_fields, item_tokens)


def _history_prompt(
    dataset: RecDataset,
    template: PromptTemplate,
    history_idx: Sequence[int] | np.ndarray,
    candidates: list[str],
    max_history: int,
    item_fields: Sequence[str],
    item_tokens: bool = False,
) -> str:
    hist = recent_history(history_idx, max_history)
    noun, nouns = item_noun(dataset)
    listed = prompt_item_texts(dataset, hist, item_fields, item_tokens=item_tokens)
    return render_next_item(template, listed, candidates, noun, nouns)


def examples_to_prompts(
    dataset: RecDataset,
    examples_df: pd.DataFrame,
    seed: int = 0,
    max_history: int = 10,
    *,
    template: PromptTemplate | int | str | None = None,
    item_fields: Sequence[str] = (),
    item_tokens: bool = False,
) -> list[PromptExample]:
    """Render every row of a split's examples frame (needs ``user``, ``position``, ``history``,
    ``target``, ``candidates``; candidates must be materialised).

    ``candidates`` / ``target`` of the result are plain display titles (the answers); ``item_fields``
    and ``item_tokens`` (a soft item token after every listed title: hybrid prompts,
    :mod:`recalign.lm.hybrid`) only change how items are listed in the prompt text.
    """
    titles = display_titles(dataset)
    if item_fields or item_tokens:
        listed = prompt_item_texts(dataset, None, item_fields, item_tokens=item_tokens)
    else:
        listed = titles
    noun, nouns = item_noun(dataset)
    out: list[PromptExample] = []
    for user, position, history, target, cands in zip(
        examples_df["user"],
        examples_df["position"],
        examples_df["history"],
        examples_df["target"],
        examples_df["candidates"],
    ):
        if len(cands) == 0:
            raise RecalignInputError(
                f"example (user {user}, position {position}) has no candidates; "
                "build the split with candidates for this stage"
            )
        t = resolve_template(template, seed=seed, user=int(user), position=int(position))
        hist = recent_history(history, max_history)
        cand_titles = [titles[int(c)] for c in cands]
        prompt = render_next_item(
            t, [listed[int(h)] for h in hist], [listed[int(c)] for c in cands], noun, nouns
        )
        out.append(
            PromptExample(
                prompt=prompt,
                candidates=cand_titles,
                target=titles[int(target)],
                user=int(user),
                position=int(position),
            )
        )
    return out
