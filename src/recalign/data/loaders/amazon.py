"""Amazon review datasets, 2014 (McAuley et al.) and 2023 (Hou et al.) releases.

- ``amazon-2014``: a ratings CSV with *no header* (``user,item,rating,timestamp``, seconds), e.g.
  ``ratings_Beauty.csv``, plus optional ``meta_<Category>.json.gz`` whose lines are Python literals
  (``{'asin': '...', 'title': '...', 'categories': [[...]], ...}``, written with ``repr`` by the
  original crawl). Those lines are parsed with :func:`ast.literal_eval` (after trying JSON), which only
  builds literals: never ``eval`` or pickle on downloaded data.
- ``amazon-2023``: a CSV with header ``user_id,parent_asin,rating,timestamp`` (timestamp in
  *milliseconds*, converted to seconds), e.g. ``Movies_and_TV.csv``; optional JSONL metadata
  ``meta_<Category>.jsonl[.gz]`` keyed by ``parent_asin`` (``title``, ``description`` list,
  ``categories`` list, ``main_category``, ``store``); optional reviews JSONL
  (``user_id``, ``parent_asin``, ``text``) that becomes the dataset's ``reviews`` frame (CLLM4Rec's
  content LM trains on reviews).

``path`` is the ratings file, or a directory holding one ratings CSV and, optionally, the metadata and
reviews files (recognised by name: ``meta_*`` is metadata, another ``*.jsonl[.gz]`` is reviews). They can
also be given explicitly with ``meta=`` and ``reviews=``.

Coverage rules (documented choices, not silent drops):
- metadata for items nobody rated is normal (the catalogue covers the whole category): those items stay
  out of the index and are counted in ``notes``;
- rated items without metadata are common in the 2014 crawl, so by default (``unknown_items=
  "title-from-id"``) they are kept and titled "Item <ASIN>", and counted in ``notes``; pass
  ``unknown_items="error"`` to refuse them;
- metadata records without a title are titled "Item <ASIN>" as well (counted in ``notes``);
- reviews of (user, item) pairs that are not in the ratings are ignored and counted in ``notes``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from recalign.data.dataset import RecDataset
from recalign.data.loaders.delimited import (
    DelimitedTable,
    check_known_items,
    check_unknown_items_option,
    to_seconds,
)
from recalign.data.loaders.files import FileRef, as_text, iter_json_records
from recalign.data.loaders.registry import register
from recalign.errors import RecalignInputError


def _is_csv(p: Path) -> bool:
    return p.name.endswith((".csv", ".csv.gz"))


def _is_json(p: Path) -> bool:
    return p.name.endswith((".json", ".json.gz", ".jsonl", ".jsonl.gz"))


def _find_files(
    path: str | Path, meta: str | Path | None, reviews: str | Path | None
) -> tuple[Path, Path | None, Path | None]:
    """Resolve (ratings, metadata, reviews) from a file or a directory."""
    p = Path(path)
    if p.is_file():
        return p, Path(meta) if meta else None, Path(reviews) if reviews else None
    if not p.is_dir():
        raise RecalignInputError("no such file or directory", source=p)
    csvs = sorted(f for f in p.iterdir() if f.is_file() and _is_csv(f))
    if not csvs:
        raise RecalignInputError("missing ratings file (no *.csv in the directory)", source=p)
    if len(csvs) > 1:
        raise RecalignInputError(
            f"several ratings files ({', '.join(f.name for f in csvs)}); pass the one to use as the path",
            source=p,
        )
    jsons = sorted(f for f in p.iterdir() if f.is_file() and _is_json(f))
    metas = [f for f in jsons if f.name.startswith("meta_")]
    others = [f for f in jsons if not f.name.startswith("meta_")]
    if meta is None and len(metas) > 1:
        raise RecalignInputError(
            f"several metadata files ({', '.join(f.name for f in metas)}); pass meta=", source=p
        )
    if reviews is None and len(others) > 1:
        raise RecalignInputError(
            f"several review files ({', '.join(f.name for f in others)}); pass reviews=", source=p
        )
    return (
        csvs[0],
        Path(meta) if meta else (metas[0] if metas else None),
        Path(reviews) if reviews else (others[0] if others else None),
    )


def _metadata_frame(path: Path, id_key: str, literal: bool) -> tuple[pd.DataFrame, int]:
    """Item catalogue from a metadata file; returns (frame, number of records without a title)."""
    rows: dict[str, dict] = {}
    first_line: dict[str, int] = {}
    untitled = 0
    for line, rec in iter_json_records(FileRef(path), literal=literal):
        item = rec.get(id_key)
        if item is None or (isinstance(item, str) and not item.strip()):
            raise RecalignInputError(f"record has no '{id_key}'", source=path, line=line)
        item = str(item)
        if item in rows:
            raise RecalignInputError(
                f"{id_key} {item!r} appears twice (first at line {first_line[item]})", source=path, line=line
            )
        title = as_text(rec.get("title"))
        if not title:
            untitled += 1
        row = {
            "item": item,
            "title": title,  # empty -> "Item <id>" in from_frames
            "description": as_text(rec.get("description")),
            "categories": as_text(rec.get("categories"), joiner="|"),
        }
        if literal:
            row["brand"] = as_text(rec.get("brand"))
        else:
            row["main_category"] = as_text(rec.get("main_category"))
            row["store"] = as_text(rec.get("store"))
        rows[item] = row
        first_line[item] = line
    return pd.DataFrame(list(rows.values())), untitled


def _finish(
    name: str,
    inter: pd.DataFrame,
    table: DelimitedTable,
    meta_path: Path | None,
    id_key: str,
    literal: bool,
    unknown_items: str,
    reviews: pd.DataFrame | None = None,
    extra_notes: list[str] | None = None,
) -> RecDataset:
    check_unknown_items_option(unknown_items)
    catalogue = None
    notes = list(extra_notes or [])
    if meta_path is not None:
        catalogue, untitled = _metadata_frame(meta_path, id_key, literal)
        if untitled:
            notes.append(f"{untitled} metadata records have no title; titled 'Item <id>'")
        if unknown_items == "error":
            check_known_items(table, inter["item"], pd.Index(catalogue["item"]), meta_path.name, table.source)
    ds = RecDataset.from_frames(
        name, inter, catalogue, reviews=reviews, source=table.source, unknown_items="title-from-id"
    )
    if meta_path is None:
        notes.append("no metadata file: items are titled by their id")
    ds.notes.extend(notes)
    return ds


@register("amazon-2014")
def load_amazon_2014(
    path: str | Path,
    *,
    meta: str | Path | None = None,
    unknown_items: str = "title-from-id",
    dataset_name: str | None = None,
) -> RecDataset:
    """Amazon 2014: headerless ``user,item,rating,timestamp`` CSV + optional Python-literal metadata."""
    ratings, meta_path, _ = _find_files(path, meta, None)
    t = DelimitedTable(
        ratings,
        sep=",",
        columns=["user", "item", "rating", "timestamp"],
        required=["user", "item", "rating", "timestamp"],
        numeric=["rating", "timestamp"],
        quoted=True,
    )
    inter = pd.DataFrame(
        {
            "user": t.frame["user"].astype(str),
            "item": t.frame["item"].astype(str),
            "timestamp": to_seconds(t.numeric("timestamp"), "s", t.source),
            "rating": t.numeric("rating").astype("float64"),
        }
    )
    return _finish(dataset_name or _stem(ratings), inter, t, meta_path, "asin", True, unknown_items)


@register("amazon-2023")
def load_amazon_2023(
    path: str | Path,
    *,
    meta: str | Path | None = None,
    reviews: str | Path | None = None,
    unknown_items: str = "title-from-id",
    time_unit: str = "ms",
    dataset_name: str | None = None,
) -> RecDataset:
    """Amazon 2023: ``user_id,parent_asin,rating,timestamp`` CSV (ms) + optional JSONL metadata/reviews."""
    ratings, meta_path, reviews_path = _find_files(path, meta, reviews)
    cols = ["user_id", "parent_asin", "rating", "timestamp"]
    t = DelimitedTable(
        ratings, sep=",", header=True, required=cols, numeric=["rating", "timestamp"], quoted=True
    )
    inter = pd.DataFrame(
        {
            "user": t.frame["user_id"].astype(str),
            "item": t.frame["parent_asin"].astype(str),
            "timestamp": to_seconds(t.numeric("timestamp"), time_unit, t.source),
            "rating": t.numeric("rating").astype("float64"),
        }
    )
    rev, notes = None, []
    if reviews_path is not None:
        rev, notes = _reviews_frame(reviews_path, inter)
    return _finish(
        dataset_name or _stem(ratings),
        inter,
        t,
        meta_path,
        "parent_asin",
        False,
        unknown_items,
        reviews=rev,
        extra_notes=notes,
    )


def _reviews_frame(path: Path, inter: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    users, items, texts = [], [], []
    for line, rec in iter_json_records(FileRef(path)):
        for key in ("user_id", "parent_asin"):
            if not rec.get(key):
                raise RecalignInputError(f"review has no '{key}'", source=path, line=line)
        text = as_text(rec.get("text"))
        title = as_text(rec.get("title"))
        if title and text:
            text = f"{title}. {text}"
        users.append(str(rec["user_id"]))
        items.append(str(rec["parent_asin"]))
        texts.append(text or title)
    rev = pd.DataFrame({"user": users, "item": items, "text": texts})
    pairs = pd.MultiIndex.from_frame(inter[["user", "item"]])
    known = pd.MultiIndex.from_frame(rev[["user", "item"]]).isin(pairs)
    empty = np.asarray([not t for t in texts], dtype=bool) if texts else np.zeros(0, bool)
    notes = []
    if (~known).any():
        notes.append(
            f"{int((~known).sum())} reviews of (user, item) pairs absent from the ratings were ignored"
        )
    if (empty & known).any():
        notes.append(f"{int((empty & known).sum())} reviews without text were ignored")
    return rev[known & ~empty].reset_index(drop=True), notes


def _stem(p: Path) -> str:
    n = p.name
    for suf in (".gz", ".csv"):
        n = n.removesuffix(suf)
    return n
