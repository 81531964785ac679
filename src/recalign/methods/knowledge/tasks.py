"""Task generators: turn a :class:`RecDataset` + :class:`Split` into natural-language (prompt, answer) pairs.

Six tasks (Cao et al., NAACL Findings 2024). Auxiliary tasks teach the LM what the interaction data
says about items, recommendation tasks are what is evaluated:

- ``mim``  — masked item modelling: a window of the user's sequence with one item replaced by ``[MASK]``;
  answer: the masked item's title.
- ``mlm``  — masked language modelling on titles: words of the window's titles replaced by ``[MASK]``;
  answer: the masked words in order, joined by ``", "``. Only purely alphanumeric words are maskable,
  so the answer never carries punctuation and the year "(1995)" stays visible.
- ``bpr``  — the history, then a choice between the next item the user took and an item they never
  interacted with (order drawn at random); answer: the taken item's title.
- ``retrieval`` — the history; answer: the next item's title (no candidates).
- ``ranking``   — the history and a candidate list (the split's shared candidates when it has them);
  answer: the target's title. We do not ask for a full ordering: only the target's position is known, so
  a full ordering would be an invented label. Evaluation ranks the candidates by the model's
  log-probability of each title as the answer.
- ``rating``    — the history with its ratings and a new item; answer: its rating as one digit ``"1"``-``"5"``.

Where the data come from: training examples use **only** the split's ``train`` stage (for ``loo`` the
history and target of every earlier position; the valid/test targets never appear as targets or in
windows). The one place test-time knowledge enters is the definition of "never interacted with" for BPR
negatives and candidates, which is the same convention as the shared candidate sets.

Determinism: every random choice of an example (template, masked position, masked words, negative, option
order) comes from ``numpy.random.default_rng([seed, task code, user, position])``, so an example does not
depend on which other examples were generated or in which order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from recalign.data.dataset import RecDataset
from recalign.data.splits import Split, sample_candidates
from recalign.errors import RecalignInputError
from recalign.lm.prompts import display_titles, item_noun
from recalign.methods.knowledge.templates import ALL_TASKS, MASK, SEP, n_templates, render

# Fixed per-task codes that seed the per-example generators (never reorder: changing them changes data).
TASK_CODES = {"mim": 11, "mlm": 12, "bpr": 13, "retrieval": 21, "ranking": 22, "rating": 23}
CANDIDATE_SLOT_CODE = 99

# Past tense and verb that go with a domain noun in the templates.
_VERBS = {
    "movie": ("watched", "watch"),
    "artist": ("listened to", "listen to"),
    "book": ("read", "read"),
    "item": ("interacted with", "choose"),
}


@dataclass
class TaskExample:
    """One natural-language example.

    ``target`` is the catalogue index the answer names (None for MLM, whose answer is words);
    ``candidates`` the items offered in the prompt (ranking: the list in prompt order; BPR: the two
    options); ``rating`` the true rating (rating task).
    """

    task: str
    prompt: str
    answer: str
    user: int
    position: int
    template: int
    target: int | None = None
    candidates: list[int] = field(default_factory=list)
    rating: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "task": self.task,
            "prompt": self.prompt,
            "answer": self.answer,
            "user": self.user,
            "position": self.position,
            "template": self.template,
            "target": self.target,
            "candidates": list(self.candidates),
            "rating": self.rating,
        }


@dataclass
class TaskOptions:
    """How examples are written (not which ones): see :class:`KnowledgeTasks`."""

    history_len: int = 10
    n_candidates: int | None = None  # None: the split's own candidate count
    noun: str | None = None  # None: from the dataset (recalign.lm.prompts.item_noun)
    nouns: str | None = None
    past: str | None = None  # None: "watched" for movies, "listened to" for artists, ...
    verb: str | None = None
    mlm_rate: float = 0.15
    mlm_max_words: int = 4
    seed: int = 0
    #: recommendation-task samples (retrieval, ranking, rating): ``informative`` (Cao et al.'s form: the
    #: user is their history of item titles, no user id) or ``ids`` (the P5-style form it replaces:
    #: ``user_<id>`` and ``item_<id>`` tokens, answers are item ids). Auxiliary tasks always use titles.
    rec_form: str = "informative"


def format_rating(r: float) -> str:
    """Ratings as one digit 1-5 (half stars are rounded half up, out-of-range values clipped)."""
    return str(int(min(5, max(1, np.floor(float(r) + 0.5)))))


class KnowledgeTasks:
    """Writes the six tasks' examples for one dataset and split.

    Args:
        dataset, split: the data; training examples come from ``split.stage("train")`` only.
        options: wording and sizes (history length, candidate count, domain nouns, MLM masking, seed).
    """

    def __init__(self, dataset: RecDataset, split: Split, options: TaskOptions | None = None) -> None:
        self.dataset = dataset
        self.split = split
        self.opt = options or TaskOptions()
        self.n_candidates = int(self.opt.n_candidates or split.n_candidates)
        self.titles = display_titles(dataset)
        if self.opt.rec_form not in ("informative", "ids"):
            raise RecalignInputError(
                f"rec_form must be informative or ids, got {self.opt.rec_form!r}", field="rec_form"
            )
        #: what recommendation tasks name items by (prompts and answers): titles, or ``item_<id>``
        self.answer_names = (
            list(self.titles)
            if self.opt.rec_form == "informative"
            else [f"item_{i}" for i in dataset.items["item_id"].astype(str)]
        )
        noun, nouns = item_noun(dataset)
        past, verb = _VERBS.get(noun, ("interacted with", "choose"))
        o = self.opt
        self.words = {
            "noun": o.noun or noun,
            "nouns": o.nouns or nouns,
            "past": o.past or past,
            "verb": o.verb or verb,
        }
        self._seen: list[np.ndarray] | None = None
        self._ratings: list[np.ndarray] | None = None
        self._stages: dict[str, pd.DataFrame] = {}

    # ------------------------------------------------------------------ cached facts
    def stage(self, stage: str) -> pd.DataFrame:
        if stage not in self._stages:
            self._stages[stage] = self.split.stage(stage)
        return self._stages[stage]

    def seen(self, user: int) -> np.ndarray:
        """Sorted items the user ever interacted with (what "never took" is defined against)."""
        if self._seen is None:
            self._seen = [np.unique(s) for s in self.dataset.sequences()]
        return self._seen[user]

    def rating_at(self, user: int, position: int) -> float:
        """Rating of the user's ``position``-th interaction, in the same chronological order as splits."""
        if self._ratings is None:
            df = self.dataset.interactions.reset_index(drop=True)
            order = np.lexsort((np.arange(len(df)), df["timestamp"].to_numpy(), df["user_idx"].to_numpy()))
            users = df["user_idx"].to_numpy()[order]
            ratings = df["rating"].to_numpy()[order]
            bounds = np.searchsorted(users, np.arange(self.dataset.n_users + 1))
            self._ratings = [ratings[bounds[u] : bounds[u + 1]] for u in range(self.dataset.n_users)]
        return float(self._ratings[user][position])

    def _rng(self, task: str, user: int, position: int) -> np.random.Generator:
        return np.random.default_rng([self.opt.seed, TASK_CODES[task], int(user), int(position)])

    def _words(self) -> dict[str, str]:
        return self.words

    def _template(self, task: str, rng: np.random.Generator, template: int | None) -> int:
        k = int(rng.integers(0, n_templates(task)))  # always drawn, so later draws do not shift
        if template is None:
            return k
        if not 0 <= template < n_templates(task):
            raise RecalignInputError(f"task '{task}' has {n_templates(task)} templates, not {template + 1}")
        return template

    def _join(self, items) -> str:
        return SEP.join(self.titles[int(i)] for i in items)

    def _rec_join(self, items) -> str:
        return SEP.join(self.answer_names[int(i)] for i in items)

    def _rec_prompt(self, user: int, prompt: str) -> str:
        """The ``ids`` form names the user by id in front of the prompt (P5's "user_23 ...")."""
        if self.opt.rec_form == "ids":
            return f"user_{self.dataset.user_ids[int(user)]}: {prompt}"
        return prompt

    # ------------------------------------------------------------------ eligibility
    def eligible(self, task: str, stage: str = "train") -> pd.DataFrame:
        """The split examples a task can be written from (e.g. MIM needs a window of >= 2 items)."""
        if task not in ALL_TASKS:
            raise RecalignInputError(f"unknown task '{task}' (choose from {', '.join(ALL_TASKS)})")
        df = self.stage(stage)
        if task == "rating" and not self.dataset.has_ratings:
            raise RecalignInputError(
                f"dataset '{self.dataset.name}' has no ratings: cannot use task 'rating'"
            )
        if task == "mim":
            return df[df["history"].map(len) >= 1].reset_index(drop=True)
        if task == "mlm":
            ok = [self._maskable_any(self._window(h, t)) for h, t in zip(df["history"], df["target"])]
            return df[np.asarray(ok, dtype=bool)].reset_index(drop=True) if len(df) else df
        if task == "rating":
            r = [self.rating_at(u, p) for u, p in zip(df["user"], df["position"])]
            return df[~np.isnan(np.asarray(r, dtype=float))].reset_index(drop=True) if len(df) else df
        return df

    def _window(self, history: np.ndarray, target: int) -> list[int]:
        """The last ``history_len`` items up to and including ``target`` (auxiliary tasks' context)."""
        seq = [int(i) for i in history] + [int(target)]
        return seq[-self.opt.history_len :]

    def _maskable_any(self, window: list[int]) -> bool:
        return any(_maskable(w) for i in window for w in self.titles[i].split())

    # ------------------------------------------------------------------ one example per task
    def example(self, task: str, row: Any, template: int | None = None) -> TaskExample:
        """Write ``task`` for one split example ``row`` (a row of ``split.stage(...)``)."""
        fn = getattr(self, f"_{task}", None)
        if task not in ALL_TASKS or fn is None:
            raise RecalignInputError(f"unknown task '{task}' (choose from {', '.join(ALL_TASKS)})")
        user, position = int(row["user"]), int(row["position"])
        rng = self._rng(task, user, position)
        k = self._template(task, rng, template)
        return fn(row, user, position, rng, k)

    def _mim(self, row, user, position, rng, k) -> TaskExample:
        window = self._window(row["history"], row["target"])
        j = int(rng.integers(0, len(window)))
        shown = [MASK if i == j else self.titles[it] for i, it in enumerate(window)]
        prompt = render("mim", k, history=SEP.join(shown), **self._words())
        return TaskExample(
            "mim", prompt, self.titles[window[j]], user, position, k, target=window[j], extra={"masked": j}
        )

    def _mlm(self, row, user, position, rng, k) -> TaskExample:
        window = self._window(row["history"], row["target"])
        words = [self.titles[it].split() for it in window]
        slots = [(a, b) for a, ws in enumerate(words) for b, w in enumerate(ws) if _maskable(w)]
        if not slots:
            raise RecalignInputError(f"user {user} position {position}: no maskable title words for 'mlm'")
        n = int(np.clip(round(self.opt.mlm_rate * len(slots)), 1, min(self.opt.mlm_max_words, len(slots))))
        picked = sorted(int(i) for i in rng.choice(len(slots), size=n, replace=False))
        hidden = []
        for i in picked:
            a, b = slots[i]
            hidden.append(words[a][b])
            words[a][b] = MASK
        prompt = render("mlm", k, history=SEP.join(" ".join(ws) for ws in words), **self._words())
        return TaskExample("mlm", prompt, ", ".join(hidden), user, position, k, extra={"slots": picked})

    def _negative(self, user: int, position: int, target: int, rng: np.random.Generator) -> int:
        seen = self.seen(user)
        if len(seen) >= self.dataset.n_items:
            raise RecalignInputError(f"user {user} interacted with every item: no BPR negative exists")
        while True:
            it = int(rng.integers(0, self.dataset.n_items))
            pos = np.searchsorted(seen, it)
            if (pos >= len(seen) or seen[pos] != it) and it != target:
                return it

    def _bpr(self, row, user, position, rng, k) -> TaskExample:
        target = int(row["target"])
        neg = self._negative(user, position, target, rng)
        a, b = (target, neg) if rng.integers(0, 2) == 0 else (neg, target)
        hist = list(row["history"])[-self.opt.history_len :]
        prompt = render(
            "bpr",
            k,
            history=self._join(hist),
            option_a=self.titles[a],
            option_b=self.titles[b],
            **self._words(),
        )
        return TaskExample(
            "bpr", prompt, self.titles[target], user, position, k, target=target, candidates=[a, b]
        )

    def _retrieval(self, row, user, position, rng, k) -> TaskExample:
        target = int(row["target"])
        hist = list(row["history"])[-self.opt.history_len :]
        prompt = self._rec_prompt(user, render("retrieval", k, history=self._rec_join(hist), **self._words()))
        return TaskExample("retrieval", prompt, self.answer_names[target], user, position, k, target=target)

    def candidates_for(self, row, user: int, position: int) -> list[int]:
        """The split's shared candidates when materialised with the requested size, else a seeded draw."""
        cands = row["candidates"] if "candidates" in row.index else np.zeros(0)
        target = int(row["target"])
        if len(cands) == self.n_candidates:
            return [int(c) for c in cands]
        if len(cands) > self.n_candidates:  # shorter list for cheaper prompts: target + first negatives
            negs = [int(c) for c in cands if int(c) != target][: self.n_candidates - 1]
            slot_rng = np.random.default_rng([self.opt.seed, CANDIDATE_SLOT_CODE, user, position])
            slot = int(slot_rng.integers(0, self.n_candidates))
            return negs[:slot] + [target] + negs[slot:]
        c = sample_candidates(
            user, position, target, self.seen(user), self.dataset.n_items, self.n_candidates, self.split.seed
        )
        return [int(x) for x in c]

    def _ranking(self, row, user, position, rng, k) -> TaskExample:
        target = int(row["target"])
        cands = self.candidates_for(row, user, position)
        hist = list(row["history"])[-self.opt.history_len :]
        prompt = self._rec_prompt(
            user,
            render(
                "ranking", k, history=self._rec_join(hist), candidates=self._rec_join(cands), **self._words()
            ),
        )
        return TaskExample(
            "ranking", prompt, self.answer_names[target], user, position, k, target=target, candidates=cands
        )

    def _rating(self, row, user, position, rng, k) -> TaskExample:
        target = int(row["target"])
        hist = list(row["history"])[-self.opt.history_len :]
        start = position - len(hist)
        rated = SEP.join(
            f"{self.answer_names[int(it)]}: {format_rating(self.rating_at(user, start + i))}"
            for i, it in enumerate(hist)
        )
        r = self.rating_at(user, position)
        prompt = self._rec_prompt(
            user, render("rating", k, history=rated, title=self.answer_names[target], **self._words())
        )
        return TaskExample("rating", prompt, format_rating(r), user, position, k, target=target, rating=r)

    # ------------------------------------------------------------------ many examples
    def generate(
        self, task: str, n: int | None = None, stage: str = "train", *, seed: int | None = None
    ) -> list[TaskExample]:
        """``n`` examples of ``task`` from ``stage`` (all eligible ones when ``n`` is None).

        When ``n`` exceeds the eligible pool, the pool is cycled through successive seeded permutations
        (every example is used once before any is used twice). The selection is seeded by ``seed``
        (default: the options' seed) and the task.
        """
        pool = self.eligible(task, stage)
        if n is None:
            idx = np.arange(len(pool))
        else:
            idx = pick_indices(len(pool), n, [self.opt.seed if seed is None else seed, TASK_CODES[task], 7])
        return [self.example(task, pool.iloc[int(i)]) for i in idx]


def pick_indices(pool_size: int, n: int, seed: Any) -> np.ndarray:
    """``n`` indices into a pool, without repetition until the pool is exhausted, seeded."""
    if n <= 0:
        return np.zeros(0, dtype=np.int64)
    if pool_size <= 0:
        raise RecalignInputError(f"no eligible examples to draw {n} from")
    rng = np.random.default_rng(seed)
    parts = []
    left = n
    while left > 0:
        perm = rng.permutation(pool_size)
        parts.append(perm[:left])
        left -= len(parts[-1])
    return np.concatenate(parts)


def _maskable(word: str) -> bool:
    return word.isalnum()
