"""The one in-memory representation every dataset is turned into.

A :class:`RecDataset` holds

- ``interactions``: one row per (user, item, time) event with columns ``user_idx``, ``item_idx``,
  ``timestamp`` (int64, seconds) and ``rating`` (float64, NaN when the source has no ratings);
- ``items``: the catalogue, one row per internal item index ``0..n_items-1`` with the original id in
  ``item_id``, a ``title`` and any optional text fields (``genres``, ``year``, ``description``, ...);
- ``user_ids``: the original id of every internal user index;
- optionally ``reviews``: ``user_idx``, ``item_idx``, ``text`` (used by CLLM4Rec's content LM).

Users and items keep their original ids (as strings, so "0012" and "12" stay distinct) and get
contiguous internal indices; every model works on the indices. Construction goes through
:meth:`RecDataset.from_frames`, which validates the frames and assigns indices, so loaders only have to
produce plain frames with original ids.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from recalign.errors import RecalignInputError


@dataclass
class RecDataset:
    name: str
    interactions: pd.DataFrame
    items: pd.DataFrame
    user_ids: np.ndarray
    reviews: pd.DataFrame | None = None
    notes: list[str] = field(default_factory=list)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_frames(
        cls,
        name: str,
        interactions: pd.DataFrame,
        items: pd.DataFrame | None = None,
        *,
        reviews: pd.DataFrame | None = None,
        source: str | None = None,
        unknown_items: str = "error",
    ) -> RecDataset:
        """Build a dataset from frames keyed by *original* ids.

        Args:
            interactions: columns ``user``, ``item``, ``timestamp`` and optionally ``rating``.
            items: columns ``item``, ``title`` and optional text fields. Items that appear in the catalogue
                but never in ``interactions`` are kept out of the index (a recommender cannot learn them)
                and counted in ``notes``.
            reviews: optional ``user``, ``item``, ``text``.
            source: file name used in error messages.
            unknown_items: what to do with interacted items missing from ``items``: ``"error"`` (raise),
                or ``"title-from-id"`` (keep them, titled by their id, and say so in ``notes``).
        """
        src = source or name
        for col in ("user", "item", "timestamp"):
            if col not in interactions.columns:
                raise RecalignInputError(f"missing column '{col}'", source=src)
        if len(interactions) == 0:
            raise RecalignInputError("no interactions", source=src)
        inter = pd.DataFrame(
            {
                "user": interactions["user"].astype(str).to_numpy(),
                "item": interactions["item"].astype(str).to_numpy(),
            }
        )
        ts = pd.to_numeric(interactions["timestamp"], errors="coerce")
        if ts.isna().any():
            bad = int(np.flatnonzero(ts.isna().to_numpy())[0])
            raise RecalignInputError(
                f"non-numeric timestamp {interactions['timestamp'].iloc[bad]!r} in row {bad + 1}",
                source=src,
                field="timestamp",
            )
        inter["timestamp"] = ts.astype("int64").to_numpy()
        if "rating" in interactions.columns:
            r = pd.to_numeric(interactions["rating"], errors="coerce")
            if r.isna().any():
                bad = int(np.flatnonzero(r.isna().to_numpy())[0])
                raise RecalignInputError(
                    f"non-numeric rating {interactions['rating'].iloc[bad]!r} in row {bad + 1}",
                    source=src,
                    field="rating",
                )
            inter["rating"] = r.astype("float64").to_numpy()
        else:
            inter["rating"] = np.nan

        notes: list[str] = []
        if items is None or len(items) == 0:
            items = pd.DataFrame({"item": pd.unique(inter["item"]), "title": None})
        if "item" not in items.columns:
            raise RecalignInputError("item catalogue is missing column 'item'", source=src)
        items = items.copy()
        items["item"] = items["item"].astype(str)
        if items["item"].duplicated().any():
            dup = items.loc[items["item"].duplicated(), "item"].iloc[0]
            raise RecalignInputError(f"item id {dup!r} appears twice in the catalogue", source=src)
        if "title" not in items.columns:
            items["title"] = None
        known = set(items["item"])
        used = pd.unique(inter["item"])
        missing = [i for i in used if i not in known]
        if missing:
            if unknown_items == "error":
                raise RecalignInputError(
                    f"{len(missing)} interacted item id(s) not in the item catalogue, e.g. {missing[0]!r}",
                    source=src,
                )
            items = pd.concat([items, pd.DataFrame({"item": missing, "title": None})], ignore_index=True)
            notes.append(f"{len(missing)} interacted items had no metadata; titled by their id")
        used_set = set(used)
        unused = int((~items["item"].isin(used_set)).sum())
        if unused:
            notes.append(f"{unused} catalogue items never interacted with; left out of the index")
        items = items[items["item"].isin(used_set)].reset_index(drop=True)
        items["title"] = [
            t if isinstance(t, str) and t.strip() else f"Item {i}"
            for t, i in zip(items["title"], items["item"])
        ]
        items = items.rename(columns={"item": "item_id"})
        item_index = pd.Index(items["item_id"])

        user_ids = pd.unique(inter["user"])
        user_index = pd.Index(user_ids)
        frame = pd.DataFrame(
            {
                "user_idx": user_index.get_indexer(inter["user"]).astype("int64"),
                "item_idx": item_index.get_indexer(inter["item"]).astype("int64"),
                "timestamp": inter["timestamp"].to_numpy(),
                "rating": inter["rating"].to_numpy(),
            }
        )
        rev = None
        if reviews is not None and len(reviews):
            rev = pd.DataFrame(
                {
                    "user_idx": user_index.get_indexer(reviews["user"].astype(str)),
                    "item_idx": item_index.get_indexer(reviews["item"].astype(str)),
                    "text": reviews["text"].astype(str).to_numpy(),
                }
            )
            rev = rev[(rev.user_idx >= 0) & (rev.item_idx >= 0)].reset_index(drop=True)
        return cls(
            name=name,
            interactions=frame,
            items=items,
            user_ids=np.asarray(user_ids),
            reviews=rev,
            notes=notes,
        )

    # ------------------------------------------------------------------ basic facts
    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        return len(self.items)

    @property
    def n_interactions(self) -> int:
        return len(self.interactions)

    @property
    def has_ratings(self) -> bool:
        return bool(self.interactions["rating"].notna().any())

    def titles(self) -> list[str]:
        return self.items["title"].tolist()

    def stats(self) -> dict:
        """Summary numbers, as printed by ``recalign data stats``."""
        per_user = self.interactions.groupby("user_idx").size()
        n = self.n_users * self.n_items
        return {
            "dataset": self.name,
            "users": self.n_users,
            "items": self.n_items,
            "interactions": self.n_interactions,
            "density": (self.n_interactions / n) if n else 0.0,
            "min_per_user": int(per_user.min()),
            "median_per_user": float(per_user.median()),
            "max_per_user": int(per_user.max()),
            "has_ratings": self.has_ratings,
            "item_fields": [c for c in self.items.columns if c != "item_id"],
            "time_span": [
                int(self.interactions["timestamp"].min()),
                int(self.interactions["timestamp"].max()),
            ],
        }

    def sequences(self) -> list[np.ndarray]:
        """Chronological item sequence per user index (ties in time keep file order)."""
        df = self.interactions.reset_index(drop=True)
        order = np.lexsort((np.arange(len(df)), df["timestamp"].to_numpy(), df["user_idx"].to_numpy()))
        users = df["user_idx"].to_numpy()[order]
        items = df["item_idx"].to_numpy()[order]
        bounds = np.searchsorted(users, np.arange(self.n_users + 1))
        return [items[bounds[u] : bounds[u + 1]] for u in range(self.n_users)]

    def item_popularity(self) -> np.ndarray:
        return np.bincount(self.interactions["item_idx"].to_numpy(), minlength=self.n_items)

    def with_interactions(self, interactions: pd.DataFrame, note: str | None = None) -> RecDataset:
        """A new dataset restricted to ``interactions`` (a filtered copy of ``self.interactions``).

        Users and items left without interactions are dropped and the indices made contiguous again.
        """
        users = np.unique(interactions["user_idx"].to_numpy())
        items = np.unique(interactions["item_idx"].to_numpy())
        umap = np.full(self.n_users, -1, dtype=np.int64)
        umap[users] = np.arange(len(users))
        imap = np.full(self.n_items, -1, dtype=np.int64)
        imap[items] = np.arange(len(items))
        inter = interactions.copy()
        inter["user_idx"] = umap[inter["user_idx"].to_numpy()]
        inter["item_idx"] = imap[inter["item_idx"].to_numpy()]
        rev = None
        if self.reviews is not None:
            r = self.reviews.copy()
            r["user_idx"] = umap[r["user_idx"].to_numpy()]
            r["item_idx"] = imap[r["item_idx"].to_numpy()]
            rev = r[(r.user_idx >= 0) & (r.item_idx >= 0)].reset_index(drop=True)
        notes = list(self.notes) + ([note] if note else [])
        return RecDataset(
            name=self.name,
            interactions=inter.reset_index(drop=True),
            items=self.items.iloc[items].reset_index(drop=True),
            user_ids=self.user_ids[users],
            reviews=rev,
            notes=notes,
        )

    def item_text(self, item_idx: int, fields: tuple[str, ...] = ("title",)) -> str:
        """Text of an item for prompts: the title, then any requested extra fields that are present."""
        row = self.items.iloc[int(item_idx)]
        parts = [str(row["title"])]
        for f in fields:
            if f == "title" or f not in row.index:
                continue
            v = row[f]
            if isinstance(v, str) and v:
                parts.append(f"{f}: {v}")
        return "; ".join(parts)
