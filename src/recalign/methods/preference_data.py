"""Preference data for S-DPO / DMPO / DPO: one positive and K negatives per training example.

Each training example of a split (a row of ``Split.stage("train")``: ``user``, ``position``, ``target``,
``history``, ``candidates``) becomes a preference tuple: the prompt the policy sees, the target as the
chosen answer, and K rejected answers drawn from the example's *distractors* (its candidates other than
the target). Drawing negatives from the prompt's own candidate list matters: the prompt names those
items, so the model is taught to prefer the right one among the options it was actually shown (this is
what the S-DPO reference scripts do).

Strategies, selectable by name:

- ``random``: K distractors uniformly without replacement (the reference behaviour);
- ``popularity``: K distractors without replacement with probability ∝ (training popularity + smoothing);
  popular wrong items are the ones a recommender is most tempted by, so they make informative negatives;
- ``hard``: the K distractors a given scorer (typically the SFT model, via candidate-ranking scores)
  ranks highest — the mistakes the model currently makes. Deterministic; ties go to the earlier slot.

The random strategies use a generator seeded by ``(seed, user, position, strategy)``, so an example's
negatives never depend on which other examples are in the batch or in what order they are processed,
and they are decorrelated from the candidate draw itself (which is seeded by ``(seed, user, position)``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from recalign.data.dataset import RecDataset
from recalign.data.splits import Split
from recalign.errors import RecalignInputError

__all__ = [
    "STRATEGIES",
    "PreferenceData",
    "build_preference_data",
    "sample_negatives",
    "training_popularity",
]

STRATEGIES = ("random", "popularity", "hard")
# Mixed into the generator seed so negatives are not a function of the candidate draw's random stream.
_SALT = {"random": 0x5D90_0001, "popularity": 0x5D90_0002}


@dataclass
class PreferenceData:
    """Preference tuples, one per example, aligned by row.

    Attributes:
        users, positions: ``[n]`` the example keys (for joins and determinism checks).
        prompts: ``[n]`` prompt text shown to the policy (it lists the candidates).
        chosen: ``[n]`` item index of the positive (the example's target).
        rejected: ``[n, K]`` item indices of the negatives.
        chosen_titles: ``[n]`` answer text of the positive.
        rejected_titles: ``[n][K]`` answer text of the negatives.
        strategy, seed: how the negatives were drawn.
    """

    users: np.ndarray
    positions: np.ndarray
    prompts: list[str]
    chosen: np.ndarray
    rejected: np.ndarray
    chosen_titles: list[str]
    rejected_titles: list[list[str]]
    strategy: str
    seed: int
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.chosen)

    @property
    def k(self) -> int:
        """Number of negatives per example."""
        return int(self.rejected.shape[1])

    def answers(self, i: int) -> list[str]:
        """Answer texts of example ``i`` in loss order: chosen first, then the K rejected."""
        return [self.chosen_titles[i], *self.rejected_titles[i]]

    def subset(self, index: Sequence[int] | np.ndarray) -> PreferenceData:
        idx = np.asarray(index, dtype=np.int64)
        return PreferenceData(
            users=self.users[idx],
            positions=self.positions[idx],
            prompts=[self.prompts[i] for i in idx],
            chosen=self.chosen[idx],
            rejected=self.rejected[idx],
            chosen_titles=[self.chosen_titles[i] for i in idx],
            rejected_titles=[self.rejected_titles[i] for i in idx],
            strategy=self.strategy,
            seed=self.seed,
            notes=list(self.notes),
        )

    def to_frame(self) -> pd.DataFrame:
        """One row per example: ``user, position, prompt, chosen, rejected, chosen_title, rejected_titles``."""
        return pd.DataFrame(
            {
                "user": self.users,
                "position": self.positions,
                "prompt": self.prompts,
                "chosen": self.chosen,
                "rejected": list(self.rejected),
                "chosen_title": self.chosen_titles,
                "rejected_titles": self.rejected_titles,
            }
        )


# ---------------------------------------------------------------------- negatives
def training_popularity(split: Split, dataset: RecDataset) -> np.ndarray:
    """Interaction count of every item over the part of each sequence a model may train on.

    Uses :meth:`Split.train_sequences`, so validation and test targets never leak into the weights.
    """
    seqs = split.train_sequences(dataset)
    flat = np.concatenate(seqs) if seqs else np.zeros(0, np.int64)
    return np.bincount(flat, minlength=dataset.n_items).astype(np.float64)


def _distractors(candidates: np.ndarray, target: int, row: int) -> tuple[np.ndarray, np.ndarray]:
    """The candidate slots and items that are not the target."""
    candidates = np.asarray(candidates, dtype=np.int64)
    if candidates.size == 0:
        raise RecalignInputError(
            f"example row {row} has no candidates (were candidates materialised for this stage?)",
            field="candidates",
        )
    slots = np.flatnonzero(candidates != target)
    if len(slots) == len(candidates):
        raise RecalignInputError(f"example row {row}: target {target} is not among its candidates")
    return slots, candidates[slots]


def sample_negatives(
    examples: pd.DataFrame,
    k: int,
    strategy: str = "random",
    *,
    seed: int = 0,
    popularity: np.ndarray | None = None,
    popularity_smoothing: float = 1.0,
    scores: np.ndarray | None = None,
) -> np.ndarray:
    """K negative item indices per example, ``[n, K]``, drawn from each example's distractors.

    Args:
        examples: rows with ``user``, ``position``, ``target``, ``candidates``.
        k: negatives per example (at most the number of distractors, 19 with 20 candidates).
        strategy: ``"random"``, ``"popularity"`` or ``"hard"``.
        seed: seeds the random strategies together with ``(user, position)``.
        popularity: ``[n_items]`` training counts (``popularity`` strategy; see :func:`training_popularity`).
        popularity_smoothing: added to every count so never-seen distractors keep a small chance
            (0 draws only items seen in training, and fails if fewer than K of them are distractors).
        scores: ``[n, C]`` scorer outputs aligned with ``candidates`` (``hard`` strategy), higher = more
            likely according to the scorer.

    Negatives of one example are distinct and in draw order (``hard``: best-scored first).
    """
    if strategy not in STRATEGIES:
        raise RecalignInputError(
            f"unknown negative sampling strategy '{strategy}' (choose from {', '.join(STRATEGIES)})",
            field="negatives",
        )
    if k < 1:
        raise RecalignInputError(f"need at least one negative per example, got k={k}", field="k")
    n = len(examples)
    users = examples["user"].to_numpy()
    positions = examples["position"].to_numpy()
    targets = examples["target"].to_numpy()
    cands = examples["candidates"].to_numpy()
    if strategy == "popularity":
        if popularity is None:
            raise RecalignInputError("the 'popularity' strategy needs item popularity counts")
        popularity = np.asarray(popularity, dtype=np.float64)
        if popularity_smoothing < 0 or (popularity < 0).any():
            raise RecalignInputError("popularity counts and smoothing must be non-negative")
    if strategy == "hard":
        if scores is None:
            raise RecalignInputError("the 'hard' strategy needs candidate scores [n, C] from a scorer")
        scores = np.asarray(scores, dtype=np.float64)
        if scores.ndim != 2 or scores.shape[0] != n:
            raise RecalignInputError(f"scores must be [n_examples={n}, C], got shape {scores.shape}")
        if np.isnan(scores).any():
            raise RecalignInputError("scores contain NaN")

    out = np.empty((n, k), dtype=np.int64)
    for row in range(n):
        slots, items = _distractors(cands[row], int(targets[row]), row)
        if len(items) < k:
            raise RecalignInputError(
                f"example row {row} has {len(items)} distractors; cannot draw k={k} negatives", field="k"
            )
        if strategy == "hard":
            if scores.shape[1] != len(cands[row]):
                raise RecalignInputError(
                    f"scores have {scores.shape[1]} columns but row {row} has {len(cands[row])} candidates"
                )
            s = scores[row, slots]
            order = np.argsort(-s, kind="stable")  # best-scored first, ties to the earlier slot
            out[row] = items[order[:k]]
            continue
        rng = np.random.default_rng([seed, int(users[row]), int(positions[row]), _SALT[strategy]])
        if strategy == "random":
            out[row] = rng.choice(items, size=k, replace=False)
        else:
            w = popularity[items] + popularity_smoothing
            if np.count_nonzero(w) < k:
                raise RecalignInputError(
                    f"example row {row}: only {np.count_nonzero(w)} distractors have non-zero popularity "
                    f"weight, need k={k} (use popularity_smoothing > 0)"
                )
            out[row] = rng.choice(items, size=k, replace=False, p=w / w.sum())
    return out


# ---------------------------------------------------------------------- assembling
def build_preference_data(
    dataset: RecDataset,
    examples: pd.DataFrame,
    k: int = 3,
    strategy: str = "random",
    *,
    seed: int = 0,
    popularity: np.ndarray | None = None,
    popularity_smoothing: float = 1.0,
    scores: np.ndarray | None = None,
    prompts: Sequence[str] | None = None,
    titles: Sequence[str] | None = None,
) -> PreferenceData:
    """Preference tuples for ``examples`` (typically ``split.stage("train")``).

    Args:
        dataset: supplies item titles (and prompts, through :mod:`recalign.lm.prompts`).
        examples, k, strategy, seed, popularity, popularity_smoothing, scores: see :func:`sample_negatives`.
        prompts: prompt text per example; by default built with
            ``recalign.lm.prompts.examples_to_prompts(dataset, examples, seed)`` — the same prompts SFT
            trains on, so preference training continues from the SFT distribution.
        titles: answer text per item index; defaults to ``recalign.lm.prompts.display_titles`` — the
            exact strings the prompt lists as candidates and that SFT and candidate scoring use as
            answers (a preference answer spelled differently from the prompt's candidate would teach the
            model a title it is never asked for).
    """
    rejected = sample_negatives(
        examples,
        k,
        strategy,
        seed=seed,
        popularity=popularity,
        popularity_smoothing=popularity_smoothing,
        scores=scores,
    )
    if prompts is None:
        prompts = _default_prompts(dataset, examples, seed)
    prompts = [str(p) for p in prompts]
    if len(prompts) != len(examples):
        raise RecalignInputError(f"got {len(prompts)} prompts for {len(examples)} examples")
    if titles is None:
        from recalign.lm.prompts import display_titles

        titles = display_titles(dataset)
    titles = list(titles)
    chosen = examples["target"].to_numpy().astype(np.int64)
    return PreferenceData(
        users=examples["user"].to_numpy().astype(np.int64),
        positions=examples["position"].to_numpy().astype(np.int64),
        prompts=prompts,
        chosen=chosen,
        rejected=rejected,
        chosen_titles=[titles[i] for i in chosen],
        rejected_titles=[[titles[i] for i in row] for row in rejected],
        strategy=strategy,
        seed=seed,
    )


def _default_prompts(dataset: RecDataset, examples: pd.DataFrame, seed: int) -> list[str]:
    from recalign.lm.prompts import examples_to_prompts

    return [_prompt_text(p) for p in examples_to_prompts(dataset, examples, seed)]


def _prompt_text(p: object) -> str:
    """Accept plain strings or rendered examples exposing ``.prompt`` (``PromptExample``)."""
    if isinstance(p, str):
        return p
    text = getattr(p, "prompt", None)
    if isinstance(text, str):
        return text
    raise TypeError(f"cannot get prompt text from {type(p).__name__}")
