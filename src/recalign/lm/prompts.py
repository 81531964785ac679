"""Every prompt recalign shows a language model, and the one rule for turning prompts into tokens.

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

Item text: the history is the last ``max_history`` (default 10) items, oldest first, as titles with the
year (MovieLens titles already end with ``(year)``; for catalogues with a separate ``year`` column and a
title without it, the year is appended). Candidates are listed one per line, in the split's order (the
split already places the target at a seeded random slot).

Tokenisation: one rule for every stage
--------------------------------------
:func:`encode_prompt` and :func:`encode_answer` are the *only* way prompts and answers become token ids
in recalign -- SFT, S-DPO/DMPO/DPO, reference log-prob precomputation, candidate scoring and generation all
call them, and the model always sees exactly ``encode_prompt(p) + encode_answer(a)``. (The S-DPO reference
code tokenises the prompt with BOS in SFT and without it in DPO, so the preference stage trains on inputs
the SFT model never saw; a single function makes that impossible.)

- **Chat models** (the tokenizer has a ``chat_template``, e.g. SmolLM2-Instruct): the prompt text is the
  content of one user turn, rendered by the model's own template with ``add_generation_prompt=True``
  (so the ids end with the assistant header, e.g. ``<|im_start|>assistant\\n``, and include whatever
  system turn / BOS the template adds by default). The answer is the assistant message: the answer text
  tokenised without special tokens, followed by the template's end-of-turn token (``<|im_end|>`` for
  ChatML; found by rendering a sentinel conversation, see :func:`end_of_turn_id`). Generation stops on
  the same token.
- **Plain tokenizers** (no chat template): ``[BOS] + prompt`` (BOS only if the tokenizer has one) and
  ``" " + answer + [EOS]``. The leading space makes the answer read ``"Answer: Title"`` as one text;
  byte-level BPE tokenizers (GPT-2 style, Llama-3, Qwen, SmolLM base and the tiny test tokenizer) then
  encode the title as they would inside running text.

Answers are always tokenised separately from the prompt (never ``tokenize(prompt + answer)``), so the
boundary between prompt and answer tokens is exact and identical for every candidate.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from recalign.data.dataset import RecDataset
from recalign.errors import RecalignInputError

ANSWER_MARKER = "Answer:"

#: Hybrid item tokens (:mod:`recalign.lm.hybrid`): a prompt text marks the soft token of item ``i`` as
#: ``ITEM_SLOT_OPEN + str(i) + ITEM_SLOT_CLOSE`` (private-use characters, never in a title and never
#: whitespace, so chat templates that trim do not touch them). :func:`encode_prompt` turns each mark
#: into the id ``-(i + 1)``; a prompt without marks is encoded exactly as before.
ITEM_SLOT_OPEN = "\ue000"
ITEM_SLOT_CLOSE = "\ue001"
_SLOT_RE = re.compile(f"{ITEM_SLOT_OPEN}(\\d+){ITEM_SLOT_CLOSE}")


def item_slot(item_idx: int) -> str:
    """The mark of item ``item_idx``'s soft token in a prompt text (see :data:`ITEM_SLOT_OPEN`)."""
    return f"{ITEM_SLOT_OPEN}{int(item_idx)}{ITEM_SLOT_CLOSE}"


def soft_token_id(item_idx: int) -> int:
    """The prompt token id standing for item ``item_idx``'s soft token: ``-(item_idx + 1)``."""
    return -(int(item_idx) + 1)


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


# ---------------------------------------------------------------------- tokenisation (one rule)
def is_chat_tokenizer(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


_EOT_CACHE_ATTR = "_recalign_end_of_turn_id"


def end_of_turn_id(tokenizer) -> int:
    """The token that ends an answer: the chat template's end-of-turn token, else EOS.

    For chat templates we render ``[user: "u", assistant: SENTINEL]`` and take the first special token
    after the sentinel (``<|im_end|>`` for ChatML, ``<|eot_id|>`` for Llama-3, ``<end_of_turn>`` for
    Gemma). Cached on the tokenizer object.
    """
    cached = getattr(tokenizer, _EOT_CACHE_ATTR, None)
    if cached is not None:
        return cached
    eot = tokenizer.eos_token_id
    if is_chat_tokenizer(tokenizer):
        sentinel = "XQZSENTINELQZX"
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "u"}, {"role": "assistant", "content": sentinel}], tokenize=False
        )
        if sentinel in text:
            suffix = text.split(sentinel, 1)[1]
            special = set(tokenizer.all_special_ids)
            for tid in tokenizer.encode(suffix, add_special_tokens=False):
                if tid in special:
                    eot = tid
                    break
    if eot is None:
        raise RecalignInputError("tokenizer has neither an end-of-turn token nor an EOS token")
    with contextlib.suppress(AttributeError):  # exotic tokenizer objects: just don't cache
        setattr(tokenizer, _EOT_CACHE_ATTR, int(eot))
    return int(eot)


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Token ids of ``prompt`` exactly as every stage feeds them (see the module docstring).

    A prompt holding soft item-token marks (:func:`item_slot`) is encoded by
    :func:`_encode_hybrid_prompt`; every other prompt takes the path below, unchanged.
    """
    if ITEM_SLOT_OPEN in prompt:
        return _encode_hybrid_prompt(tokenizer, prompt)
    if is_chat_tokenizer(tokenizer):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
        )
        if hasattr(ids, "keys"):  # BatchEncoding in transformers 5
            ids = ids["input_ids"]
        return [int(i) for i in ids]
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    bos = tokenizer.bos_token_id
    return ([int(bos)] if bos is not None else []) + [int(i) for i in ids]


def _encode_hybrid_prompt(tokenizer, prompt: str) -> list[int]:
    """A prompt with soft item-token marks: the text between marks tokenised piece by piece, each mark
    replaced by the id ``-(item + 1)`` (:func:`soft_token_id`).

    The whole prompt is rendered first as :func:`encode_prompt` would (chat template with the generation
    prompt, or BOS + text), then split at the marks; each piece is tokenised without special tokens,
    which is how transformers tokenises a rendered chat template. A title and what follows it are thus
    tokenised apart (the soft token sits between them), as LLaRA's placeholder token does.
    """
    if is_chat_tokenizer(tokenizer):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
        ids: list[int] = []
    else:
        text = prompt
        bos = tokenizer.bos_token_id
        ids = [int(bos)] if bos is not None else []
    pieces = _SLOT_RE.split(text)
    if ITEM_SLOT_OPEN in pieces[0] or any(ITEM_SLOT_OPEN in p for p in pieces[::2]):
        raise RecalignInputError("malformed soft item-token mark in a prompt")
    for k, piece in enumerate(pieces):
        if k % 2:
            ids.append(soft_token_id(int(piece)))
        elif piece:
            ids.extend(int(i) for i in tokenizer.encode(piece, add_special_tokens=False))
    return ids


def encode_answer(tokenizer, answer: str) -> list[int]:
    """Token ids of ``answer`` as a continuation of :func:`encode_prompt`, end-of-turn/EOS included."""
    if is_chat_tokenizer(tokenizer):
        ids = tokenizer.encode(answer, add_special_tokens=False)
    else:
        ids = tokenizer.encode(" " + answer.strip(), add_special_tokens=False)
    return [int(i) for i in ids] + [end_of_turn_id(tokenizer)]


def stop_token_ids(tokenizer) -> list[int]:
    """Tokens that end a generated answer: end-of-turn and EOS (deduplicated)."""
    ids = [end_of_turn_id(tokenizer)]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(int(tokenizer.eos_token_id))
    return ids
