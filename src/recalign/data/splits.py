"""Train/validation/test splits and the seeded candidate sets shared by every method.

A split is a table of *next-item examples*: a user, the position of the target in the user's
chronological sequence, the target item and the full history before it (models truncate as they like;
prompts use the last 10 items). Two protocols, selectable by name:

- ``loo`` (RecBole convention): per user, the last item is the test target and the second-last the
  validation target; every earlier position is a training example. Users with fewer than 3 interactions
  have no test example and only contribute training data (counted in ``Split.notes``).
- ``llara`` (LLaRA / S-DPO): every position >= 1 of every user is an example whose history is the
  items before it; examples are ordered by the target's timestamp and cut 8:1:1 into train/valid/test.

Candidates: each example gets the target plus ``n_candidates - 1`` items drawn uniformly from the items
the user *never* interacted with, with a generator seeded by ``(seed, user, position)``, so the same
example always gets the same set regardless of which method asks or in which order. The target's place
in the list is drawn from the same generator (models that read a list in a prompt must not learn that
the answer is first).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from recalign.data.dataset import RecDataset
from recalign.errors import RecalignInputError
from recalign.io import atomic_write_json

SPLITS = ("loo", "llara")
STAGES = ("train", "valid", "test")


@dataclass
class Split:
    """Examples of one dataset under one protocol, with their candidate sets.

    ``examples`` columns: ``stage`` (train/valid/test), ``user``, ``position``, ``target``,
    ``history`` (int64 array, chronological, full), ``timestamp`` (of the target), ``candidates``
    (int64 array of length ``n_candidates`` containing the target, or empty if not materialised).
    """

    dataset: str
    name: str
    examples: pd.DataFrame
    n_items: int
    seed: int
    n_candidates: int
    notes: list[str] = field(default_factory=list)

    def stage(self, stage: str) -> pd.DataFrame:
        if stage not in STAGES:
            raise RecalignInputError(f"unknown stage '{stage}' (choose from {', '.join(STAGES)})")
        return self.examples[self.examples["stage"] == stage].reset_index(drop=True)

    def train_sequences(self, dataset: RecDataset) -> list[np.ndarray]:
        """Per-user item sequences a model may *train* on (no valid/test targets leak in).

        For ``loo`` this is each user's sequence without the last two items. For ``llara`` it is the
        sequence up to and including the user's last training target.
        """
        seqs = dataset.sequences()
        train = self.stage("train")
        last = train.groupby("user")["position"].max()
        out = []
        for u, s in enumerate(seqs):
            p = last.get(u)
            out.append(s[: int(p) + 1] if p is not None else s[:0])
        return out

    def candidate_matrix(self, stage: str) -> np.ndarray:
        df = self.stage(stage)
        return (
            np.stack(df["candidates"].to_numpy()) if len(df) else np.zeros((0, self.n_candidates), np.int64)
        )

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | Path) -> None:
        """Materialise the split: ``examples.parquet`` plus ``split.json`` (what produced it)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        df = self.examples.copy()
        df["history"] = [list(map(int, h)) for h in df["history"]]
        df["candidates"] = [list(map(int, c)) for c in df["candidates"]]
        tmp = directory / ".examples.parquet.tmp"
        df.to_parquet(tmp, index=False)
        tmp.replace(directory / "examples.parquet")
        atomic_write_json(
            directory / "split.json",
            {
                "dataset": self.dataset,
                "split": self.name,
                "seed": self.seed,
                "n_candidates": self.n_candidates,
                "n_items": self.n_items,
                "counts": {s: int((self.examples["stage"] == s).sum()) for s in STAGES},
                "notes": self.notes,
            },
        )

    @classmethod
    def load(cls, directory: str | Path) -> Split:
        directory = Path(directory)
        meta_path = directory / "split.json"
        if not meta_path.is_file() or not (directory / "examples.parquet").is_file():
            raise RecalignInputError(
                "not a prepared split (expected split.json and examples.parquet)", source=directory
            )
        meta = json.loads(meta_path.read_text())
        df = pd.read_parquet(directory / "examples.parquet")
        df["history"] = [np.asarray(h, dtype=np.int64) for h in df["history"]]
        df["candidates"] = [np.asarray(c, dtype=np.int64) for c in df["candidates"]]
        return cls(
            dataset=meta["dataset"],
            name=meta["split"],
            examples=df,
            n_items=meta["n_items"],
            seed=meta["seed"],
            n_candidates=meta["n_candidates"],
            notes=meta.get("notes", []),
        )


# ---------------------------------------------------------------------- building
def _examples_loo(seqs: list[np.ndarray], timestamps: list[np.ndarray]) -> tuple[list[dict], list[str]]:
    rows = []
    short = 0
    for u, (s, ts) in enumerate(zip(seqs, timestamps)):
        n = len(s)
        if n < 3:
            short += 1
        for p in range(1, n):
            if n >= 3 and p == n - 1:
                stage = "test"
            elif n >= 3 and p == n - 2:
                stage = "valid"
            else:
                stage = "train"
            rows.append(
                {"stage": stage, "user": u, "position": p, "target": int(s[p]), "timestamp": int(ts[p])}
            )
    notes = [f"{short} users with fewer than 3 interactions have no valid/test example"] if short else []
    return rows, notes


def _examples_llara(seqs: list[np.ndarray], timestamps: list[np.ndarray]) -> tuple[list[dict], list[str]]:
    rows = []
    for u, (s, ts) in enumerate(zip(seqs, timestamps)):
        for p in range(1, len(s)):
            rows.append({"user": u, "position": p, "target": int(s[p]), "timestamp": int(ts[p])})
    rows.sort(key=lambda r: (r["timestamp"], r["user"], r["position"]))
    n = len(rows)
    n_train = int(round(n * 0.8))
    n_valid = int(round(n * 0.1))
    for i, r in enumerate(rows):
        r["stage"] = "train" if i < n_train else ("valid" if i < n_train + n_valid else "test")
    return rows, []


def sample_candidates(
    user: int,
    position: int,
    target: int,
    seen: set[int] | np.ndarray,
    n_items: int,
    n_candidates: int,
    seed: int,
) -> np.ndarray:
    """Target + ``n_candidates - 1`` uniform draws from items the user never interacted with.

    Deterministic in ``(seed, user, position)``. ``seen`` holds all items of the user (a set is fastest).
    """
    n_neg = n_candidates - 1
    if not isinstance(seen, set):
        seen = set(np.asarray(seen).tolist())
    available = n_items - len(seen)
    if available < n_neg:
        raise RecalignInputError(
            f"user {user} has interacted with {len(seen)} of {n_items} items; "
            f"cannot draw {n_neg} unseen candidates"
        )
    rng = np.random.default_rng([seed, user, position])
    chosen: list[int] = []
    chosen_set: set[int] = set()
    while len(chosen) < n_neg:
        draw = rng.integers(0, n_items, size=2 * (n_neg - len(chosen)) + 4)
        for it in draw.tolist():
            if it in chosen_set or it in seen:
                continue
            chosen.append(it)
            chosen_set.add(it)
            if len(chosen) == n_neg:
                break
    slot = int(rng.integers(0, n_candidates))
    chosen.insert(slot, int(target))
    return np.asarray(chosen, dtype=np.int64)


def build_split(
    dataset: RecDataset,
    name: str = "loo",
    *,
    seed: int = 0,
    n_candidates: int = 20,
    stages_with_candidates: tuple[str, ...] = STAGES,
) -> Split:
    """Build the named split of ``dataset`` and draw candidate sets for the requested stages."""
    if name not in SPLITS:
        raise RecalignInputError(f"unknown split '{name}' (choose from {', '.join(SPLITS)})", field="split")
    df = dataset.interactions.reset_index(drop=True)
    order = np.lexsort((np.arange(len(df)), df["timestamp"].to_numpy(), df["user_idx"].to_numpy()))
    users = df["user_idx"].to_numpy()[order]
    bounds = np.searchsorted(users, np.arange(dataset.n_users + 1))
    items_sorted = df["item_idx"].to_numpy()[order]
    ts_sorted = df["timestamp"].to_numpy()[order]
    seqs = [items_sorted[bounds[u] : bounds[u + 1]] for u in range(dataset.n_users)]
    tss = [ts_sorted[bounds[u] : bounds[u + 1]] for u in range(dataset.n_users)]
    rows, notes = (_examples_loo if name == "loo" else _examples_llara)(seqs, tss)
    ex = pd.DataFrame(rows, columns=["stage", "user", "position", "target", "timestamp"])
    ex = ex.sort_values(
        ["stage", "user", "position"],
        key=lambda c: c.map({s: i for i, s in enumerate(STAGES)}) if c.name == "stage" else c,
    )
    ex = ex.reset_index(drop=True)
    ex["history"] = [seqs[u][:p] for u, p in zip(ex["user"], ex["position"])]
    seen_sets = [set(s.tolist()) for s in seqs]
    cands = []
    for st, u, p, t in zip(ex["stage"], ex["user"], ex["position"], ex["target"]):
        if st in stages_with_candidates:
            cands.append(sample_candidates(u, p, t, seen_sets[u], dataset.n_items, n_candidates, seed))
        else:
            cands.append(np.zeros(0, dtype=np.int64))
    ex["candidates"] = cands
    return Split(
        dataset=dataset.name,
        name=name,
        examples=ex,
        n_items=dataset.n_items,
        seed=seed,
        n_candidates=n_candidates,
        notes=notes,
    )
