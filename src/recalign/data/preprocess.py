"""Preprocessing: duplicate removal, rating threshold, k-core filtering, history truncation.

Every step returns a *new* :class:`~recalign.data.dataset.RecDataset` (built with
``dataset.with_interactions``, so indices stay contiguous) together with a :class:`FilterReport` of how
many rows, users and items it removed. The report's one-line summary is also appended to
``dataset.notes``, so whatever a split or a result file is built from carries the record of what was
filtered: published numbers on "ML-1M" differ mostly by such filtering, and a silent drop makes runs
incomparable.

Order used by :func:`preprocess` (and why):

0. the genre (domain) filter, if configured, before everything: it decides which catalogue the run is
   about, and k-core counts must be taken within that catalogue;
1. ``rating_threshold`` first: it decides which events count as positive feedback at all;
2. ``drop_duplicates`` next: repeated (user, item) events must not inflate k-core counts;
3. ``k_core`` last, iterated to a fixed point (removing a user can push an item below the threshold
   and vice versa, so one pass is not enough).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, TypeVar

import numpy as np
import pandas as pd

from recalign.config import Ge, cfg_field, check_constraints
from recalign.data.dataset import RecDataset
from recalign.errors import RecalignInputError

T = TypeVar("T")


@dataclass
class FilterReport:
    """What one preprocessing step removed."""

    step: str
    rows_removed: int
    users_removed: int
    items_removed: int
    rows_left: int
    users_left: int
    items_left: int
    detail: str = ""

    def summary(self) -> str:
        extra = f" ({self.detail})" if self.detail else ""
        return (
            f"{self.step}{extra}: removed {self.rows_removed} rows, {self.users_removed} users, "
            f"{self.items_removed} items; {self.rows_left} rows, {self.users_left} users, "
            f"{self.items_left} items left"
        )

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _apply(
    dataset: RecDataset, keep: np.ndarray, step: str, detail: str = ""
) -> tuple[RecDataset, FilterReport]:
    kept = dataset.interactions[keep]
    if len(kept) == 0:
        raise RecalignInputError(f"{step}{f' ({detail})' if detail else ''} would remove every interaction")
    before = (dataset.n_interactions, dataset.n_users, dataset.n_items)
    n_users = int(np.unique(kept["user_idx"].to_numpy()).size)
    n_items = int(np.unique(kept["item_idx"].to_numpy()).size)
    report = FilterReport(
        step=step,
        rows_removed=before[0] - len(kept),
        users_removed=before[1] - n_users,
        items_removed=before[2] - n_items,
        rows_left=len(kept),
        users_left=n_users,
        items_left=n_items,
        detail=detail,
    )
    return dataset.with_interactions(kept, note=report.summary()), report


def drop_duplicates(dataset: RecDataset) -> tuple[RecDataset, FilterReport]:
    """Keep only the earliest event of each (user, item) pair (ties in time: the first in file order).

    Re-consumption is rare in the supported datasets and next-item evaluation assumes a user does not
    "discover" an item twice; keeping the earliest event preserves when the user first met the item.
    Surviving rows keep their original order.
    """
    df = dataset.interactions
    order = np.lexsort((np.arange(len(df)), df["timestamp"].to_numpy()))
    first = (
        ~pd.DataFrame({"u": df["user_idx"].to_numpy()[order], "i": df["item_idx"].to_numpy()[order]})
        .duplicated()
        .to_numpy()
    )
    keep = np.zeros(len(df), dtype=bool)
    keep[order[first]] = True
    return _apply(dataset, keep, "drop_duplicates", "same user and item, earliest kept")


def k_core(dataset: RecDataset, user_k: int, item_k: int) -> tuple[RecDataset, FilterReport]:
    """Keep users with ≥ ``user_k`` and items with ≥ ``item_k`` interactions, iterated to a fixed point.

    Counts are interaction rows (run :func:`drop_duplicates` first to count distinct items).
    ``0`` or ``1`` disables a side.
    """
    if user_k < 0 or item_k < 0:
        raise RecalignInputError(f"k-core thresholds must be >= 0, got user_k={user_k}, item_k={item_k}")
    df = dataset.interactions
    users = df["user_idx"].to_numpy()
    items = df["item_idx"].to_numpy()
    keep = np.ones(len(df), dtype=bool)
    rounds = 0
    while True:
        rounds += 1
        u_cnt = np.bincount(users[keep], minlength=dataset.n_users)
        i_cnt = np.bincount(items[keep], minlength=dataset.n_items)
        new = keep & (u_cnt[users] >= user_k) & (i_cnt[items] >= item_k)
        if new.sum() == keep.sum():
            break
        keep = new
        if not keep.any():
            break
    return _apply(dataset, keep, "k_core", f"users >= {user_k}, items >= {item_k}, {rounds} rounds")


def rating_threshold(dataset: RecDataset, min_rating: float) -> tuple[RecDataset, FilterReport]:
    """Implicit feedback from explicit ratings: keep events rated ``>= min_rating``.

    Events without a rating cannot pass a rating threshold and are removed (counted in the report).
    A dataset without any ratings is an error: the threshold would silently mean "remove everything"
    or "nothing", and either is a mistake in the run's configuration.
    """
    if not dataset.has_ratings:
        raise RecalignInputError(
            f"dataset '{dataset.name}' has no ratings, so a rating threshold ({min_rating}) cannot apply",
            field="min_rating",
        )
    r = dataset.interactions["rating"].to_numpy()
    keep = r >= min_rating  # NaN compares False
    unrated = int(np.isnan(r).sum())
    detail = f"rating >= {min_rating}" + (f", {unrated} unrated rows among the removed" if unrated else "")
    return _apply(dataset, keep, "rating_threshold", detail)


def _item_genre_sets(dataset: RecDataset) -> list[set[str]]:
    """Each catalogue item's genres as a set (``|``- or ``,``-separated text; missing -> empty set)."""
    if "genres" not in dataset.items.columns:
        raise RecalignInputError(
            f"dataset '{dataset.name}' has no 'genres' column, so a genre (domain) filter cannot apply",
            field="preprocess.item_genres_include",
        )
    out = []
    for value in dataset.items["genres"].tolist():
        text = "" if value is None or (isinstance(value, float) and np.isnan(value)) else str(value)
        out.append({g.strip() for g in text.replace(",", "|").split("|") if g.strip()})
    return out


def genre_filter(
    dataset: RecDataset, include: Sequence[str] = (), exclude: Sequence[str] = ()
) -> tuple[RecDataset, FilterReport]:
    """Keep interactions with items that carry *any* genre of ``include`` (if given) and *none* of
    ``exclude`` (if given): one "domain" of a catalogue.

    This is how recalign builds cross-domain settings from a single dataset (DMPO's "train on one
    domain, evaluate on another"): ``include=G`` and ``exclude=G`` are genre-disjoint halves of the
    catalogue -- every item goes to exactly one of them, by whether it carries any genre of ``G``. An
    item carrying genres of both halves therefore belongs to the ``include`` half (the half named by
    ``G``); an item without any genre belongs to the ``exclude`` half. The report's detail counts the
    catalogue items of each kind, so nothing is dropped silently. Genre names are compared exactly.
    """
    include, exclude = [str(g) for g in include], [str(g) for g in exclude]
    if not include and not exclude:
        raise RecalignInputError("a genre filter needs include and/or exclude genres")
    sets = _item_genre_sets(dataset)
    known = set().union(*sets) if sets else set()
    unknown = sorted(set(include + exclude) - known)
    if unknown:
        raise RecalignInputError(
            f"unknown genre(s) {', '.join(map(repr, unknown))} (catalogue has: {', '.join(sorted(known))})",
            field="preprocess.item_genres_include",
        )
    inc, exc = set(include), set(exclude)
    item_ok = np.array([(not inc or bool(s & inc)) and not (s & exc) for s in sets], dtype=bool)
    keep = item_ok[dataset.interactions["item_idx"].to_numpy()]
    parts = []
    if inc:
        parts.append(f"items with any of {sorted(inc)}")
    if exc:
        parts.append(f"items with none of {sorted(exc)}")
    n_both = sum(1 for s in sets if inc and exc and (s & inc) and (s & exc))
    n_none = sum(1 for s in sets if not s)
    detail = (
        f"{' and '.join(parts)}: {int(item_ok.sum())} of {len(sets)} catalogue items kept"
        + (f", {n_both} carrying both included and excluded genres removed" if n_both else "")
        + (f", {n_none} items without genres" + (" removed" if inc else " kept") if n_none else "")
    )
    return _apply(dataset, keep, "genre_filter", detail)


def truncate_history(history: Sequence[T] | np.ndarray, n: int = 10) -> Sequence[T] | np.ndarray:
    """The last ``n`` items of a chronological history (prompts show the 10 most recent by default).

    ``n = 0`` gives an empty history; negative ``n`` is an error (it would silently mean "drop the
    oldest items" with Python slicing).
    """
    if n < 0:
        raise RecalignInputError(f"history length must be >= 0, got {n}")
    if n == 0:
        return history[:0]
    return history[-n:]


@dataclass
class PreprocessConfig:
    """Filtering applied to a dataset before splitting."""

    dedup: bool = cfg_field(True, "drop repeated (user, item) events, keeping the earliest")
    kcore: Annotated[int, Ge(0, show_value=True)] = cfg_field(
        0, "k-core: minimum interactions per user and per item (0 = off)"
    )
    user_core: Annotated[int | None, Ge(0, show_value=True)] = cfg_field(
        None, "minimum interactions per user; overrides kcore for users"
    )
    item_core: Annotated[int | None, Ge(0, show_value=True)] = cfg_field(
        None, "minimum interactions per item; overrides kcore for items"
    )
    min_rating: float | None = cfg_field(
        None, "keep only events rated at least this (implicit feedback); None keeps all"
    )
    item_genres_include: list[str] = cfg_field(
        [], "domain filter: keep only items carrying any of these genres (applied first; [] = off)"
    )
    item_genres_exclude: list[str] = cfg_field(
        [],
        "domain filter: drop items carrying any of these genres (exclude=G is the complement of include=G)",
    )

    def validate(self) -> None:
        check_constraints(self, "preprocess.")  # the Ge annotations, named as the section ``preprocess``

    @property
    def user_k(self) -> int:
        return self.kcore if self.user_core is None else self.user_core

    @property
    def item_k(self) -> int:
        return self.kcore if self.item_core is None else self.item_core


def preprocess(
    dataset: RecDataset, cfg: PreprocessConfig | None = None
) -> tuple[RecDataset, list[FilterReport]]:
    """Apply genre (domain) filter → threshold → dedup → k-core as configured; returns the new dataset and one report per step run."""
    cfg = cfg or PreprocessConfig()
    cfg.validate()
    reports: list[FilterReport] = []
    if cfg.item_genres_include or cfg.item_genres_exclude:
        dataset, rep = genre_filter(dataset, cfg.item_genres_include, cfg.item_genres_exclude)
        reports.append(rep)
    if cfg.min_rating is not None:
        dataset, rep = rating_threshold(dataset, cfg.min_rating)
        reports.append(rep)
    if cfg.dedup:
        dataset, rep = drop_duplicates(dataset)
        reports.append(rep)
    if cfg.user_k > 1 or cfg.item_k > 1:
        dataset, rep = k_core(dataset, cfg.user_k, cfg.item_k)
        reports.append(rep)
    return dataset, reports
