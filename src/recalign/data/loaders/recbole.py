"""RecBole atomic files: read ``<name>.inter`` / ``<name>.item`` and write them back.

RecBole (the reference toolkit for the classical baselines) keeps data as tab-separated "atomic
files" whose header cells are ``field:type`` with type one of ``token``, ``token_seq`` (space-separated
tokens), ``float`` or ``float_seq``, e.g.::

    user_id:token   item_id:token   rating:float    timestamp:float
    196             242             3               881250949

Reading maps RecBole's conventional field names onto ours: ``user_id``/``item_id``/``timestamp``/
``rating`` (configurable with ``user_field`` etc.), the item title from ``title_field`` or the first of
``movie_title``, ``title``, ``item_name``, ``name``; ``genre`` (a space-separated ``token_seq``) becomes
``genres`` joined by ``|`` like the MovieLens loaders produce, and ``release_year`` becomes ``year``.
Without a time field the file order is the time order (noted in ``notes``).

Writing (:func:`write_recbole`) is the inverse, so ``recalign data convert --to recbole`` produces files
that RecBole can load and that recalign reads back to the same dataset. RecBole has no quoting, so
tabs and line breaks inside text fields are replaced by spaces.
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
from recalign.data.loaders.files import read_source_bytes
from recalign.data.loaders.registry import register
from recalign.errors import RecalignInputError
from recalign.io import atomic_write_text

RECBOLE_TYPES = ("token", "token_seq", "float", "float_seq")
TITLE_FIELDS = ("movie_title", "title", "item_name", "name")


def _parse_header(data: bytes, source: str) -> list[tuple[str, str]]:
    """``field:type`` cells of the first non-blank line, validated."""
    first = next((ln for ln in data.split(b"\n") if ln.strip()), b"")
    try:
        cells = first.decode("utf-8").rstrip("\r").split("\t")
    except UnicodeDecodeError:
        cells = []  # the encoding check in DelimitedTable reports it with the line
    out = []
    for k, cell in enumerate(cells, start=1):
        cell = cell.strip().lstrip("\ufeff")
        if ":" not in cell:
            hint = " (is the file comma-separated? atomic files are tab-separated)" if "," in cell else ""
            raise RecalignInputError(
                f"header column {k} '{cell}' lacks a ':type' suffix (expected e.g. 'user_id:token'){hint}",
                source=source,
                line=1,
            )
        field, tp = cell.rsplit(":", 1)
        if tp not in RECBOLE_TYPES:
            raise RecalignInputError(
                f"header column {k} '{cell}' has unknown type '{tp}' (expected one of {', '.join(RECBOLE_TYPES)})",
                source=source,
                line=1,
            )
        out.append((field, tp))
    return out


class _AtomicFile:
    """One atomic file: its typed header and the parsed table (columns named ``field:type``)."""

    def __init__(self, path: Path, required: tuple[str, ...]) -> None:
        data = read_source_bytes(path)
        self.fields = _parse_header(data, str(path))
        self.types = dict(self.fields)
        names = {f for f, _ in self.fields}
        for r in required:
            if r not in names:
                raise RecalignInputError(
                    f"missing column '{r}' (header has: {', '.join(f'{f}:{t}' for f, t in self.fields)})",
                    source=path,
                    line=1,
                )
        self.table = DelimitedTable(
            path,
            sep="\t",
            header=True,
            required=[f"{r}:{self.types[r]}" for r in required],
            numeric=[f"{f}:{t}" for f, t in self.fields if t == "float"],
            data=data,
        )

    def col(self, field: str) -> str:
        return f"{field}:{self.types[field]}"

    def has(self, field: str) -> bool:
        return field in self.types


def _resolve(path: str | Path, name: str | None) -> tuple[Path, Path | None]:
    p = Path(path)
    if p.is_file():
        if p.suffix != ".inter":
            raise RecalignInputError("expected a .inter file or a directory holding one", source=p)
        inter = p
    elif p.is_dir():
        if name is not None:
            inter = p / f"{name}.inter"
            if not inter.is_file():
                raise RecalignInputError(f"missing file '{name}.inter'", source=p)
        else:
            cands = sorted(p.glob("*.inter"))
            if not cands:
                raise RecalignInputError(
                    "missing file '<name>.inter' (no .inter file in the directory)", source=p
                )
            preferred = p / f"{p.name}.inter"
            if preferred in cands:
                inter = preferred
            elif len(cands) == 1:
                inter = cands[0]
            else:
                raise RecalignInputError(
                    f"several .inter files ({', '.join(c.name for c in cands)}); pass dataset_name=<name> "
                    "(--opt dataset_name=...)",
                    source=p,
                )
    else:
        raise RecalignInputError("no such file or directory", source=p)
    item = inter.with_suffix(".item")
    return inter, item if item.is_file() else None


@register("recbole")
def load_recbole(
    path: str | Path,
    *,
    dataset_name: str | None = None,
    user_field: str = "user_id",
    item_field: str = "item_id",
    time_field: str = "timestamp",
    rating_field: str = "rating",
    title_field: str | None = None,
    unknown_items: str = "error",
) -> RecDataset:
    """Read ``<name>.inter`` and, if present, ``<name>.item`` from a directory (or a ``.inter`` path).

    ``dataset_name`` picks ``<dataset_name>.inter`` in a directory holding several and names the dataset
    (default: the file's stem).
    """
    check_unknown_items_option(unknown_items)
    inter_path, item_path = _resolve(path, dataset_name)
    af = _AtomicFile(inter_path, (user_field, item_field))
    t = af.table
    notes: list[str] = []
    if af.has(time_field):
        if af.types[time_field] != "float":
            raise RecalignInputError(
                f"time field '{time_field}' must have type float, not {af.types[time_field]}",
                source=t.source,
                line=1,
            )
        ts = to_seconds(t.numeric(af.col(time_field), "timestamp"), "s", t.source)
    else:
        ts = np.arange(len(t.frame), dtype="int64")
        notes.append(f"no '{time_field}' field: file order is used as time order")
    inter = pd.DataFrame(
        {
            "user": t.frame[af.col(user_field)].astype(str),
            "item": t.frame[af.col(item_field)].astype(str),
            "timestamp": ts,
        }
    )
    if af.has(rating_field):
        inter["rating"] = t.numeric(af.col(rating_field), "rating").astype("float64")

    catalogue = None
    if item_path is not None:
        it = _AtomicFile(item_path, (item_field,))
        catalogue = _catalogue(it, item_field, title_field)
        if unknown_items == "error":
            check_known_items(t, inter["item"], pd.Index(catalogue["item"]), item_path.name, t.source)
    ds = RecDataset.from_frames(
        dataset_name or inter_path.stem, inter, catalogue, source=t.source, unknown_items=unknown_items
    )
    ds.notes.extend(notes)
    return ds


def _catalogue(af: _AtomicFile, item_field: str, title_field: str | None) -> pd.DataFrame:
    t = af.table
    dup = t.frame[af.col(item_field)].duplicated().to_numpy()
    if dup.any():
        row = int(dup.nonzero()[0][0])
        raise RecalignInputError(
            f"item id {t.frame[af.col(item_field)].iloc[row]!r} appears twice",
            source=t.source,
            line=t.line_of_row(row),
        )
    if title_field is not None and not af.has(title_field):
        raise RecalignInputError(
            f"missing column '{title_field}'", source=t.source, line=1, field="title_field"
        )
    tf = title_field or next((f for f in TITLE_FIELDS if af.has(f)), None)
    cat = pd.DataFrame({"item": t.frame[af.col(item_field)].astype(str)})
    cat["title"] = t.text_column(af.col(tf)) if tf else ""
    for field, tp in af.fields:
        if field in (item_field, tf):
            continue
        values = t.text_column(f"{field}:{tp}")
        if field in ("genre", "genres") and tp == "token_seq":
            values = values.str.split().str.join("|")
            field = "genres"
        elif field == "release_year":
            field = "year"
        cat[field] = values
    return cat


# ---------------------------------------------------------------------- writing
def _clean(values: pd.Series) -> pd.Series:
    return values.fillna("").astype(str).str.replace(r"[\t\r\n]+", " ", regex=True)


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(float(v))


def write_recbole(dataset: RecDataset, directory: str | Path, name: str | None = None) -> tuple[Path, Path]:
    """Write ``<name>.inter`` and ``<name>.item`` into ``directory``; returns both paths.

    Ids are the original ids; the rating column is written only if the dataset has ratings. Genres
    become a ``genre:token_seq`` field when no genre contains a space (the RecBole convention for
    MovieLens), otherwise a ``genres:token`` field that keeps the ``|``-joined string intact.
    """
    directory = Path(directory)
    name = name or dataset.name
    if not name or "/" in name:
        raise RecalignInputError(f"invalid RecBole dataset name {name!r}", field="name")
    inter = dataset.interactions
    users = dataset.user_ids[inter["user_idx"].to_numpy()].astype(str)
    items = dataset.items["item_id"].to_numpy()[inter["item_idx"].to_numpy()].astype(str)
    cols = {"user_id:token": pd.Series(users), "item_id:token": pd.Series(items)}
    if dataset.has_ratings:
        cols["rating:float"] = pd.Series(
            [_num(r) if not np.isnan(r) else "" for r in inter["rating"].to_numpy()]
        )
    cols["timestamp:float"] = pd.Series(inter["timestamp"].to_numpy().astype("int64").astype(str))
    inter_df = pd.DataFrame({k: _clean(v) for k, v in cols.items()})
    if not len(inter_df):
        raise RecalignInputError("dataset has no interactions to write", field="dataset")

    cat = dataset.items
    item_cols: dict[str, pd.Series] = {
        "item_id:token": _clean(cat["item_id"]),
        "title:token_seq": _clean(cat["title"]),
    }
    for c in cat.columns:
        if c in ("item_id", "title"):
            continue
        values = _clean(cat[c])
        if c == "genres":
            if not values.str.contains(" ", regex=False).any():
                item_cols["genre:token_seq"] = values.str.replace("|", " ", regex=False)
            else:
                item_cols["genres:token"] = values
        elif c == "year":
            item_cols["year:token"] = values
        else:
            item_cols[f"{c}:token_seq"] = values
    item_df = pd.DataFrame(item_cols)

    inter_path = directory / f"{name}.inter"
    item_path = directory / f"{name}.item"
    atomic_write_text(inter_path, _atomic_text(inter_df))
    atomic_write_text(item_path, _atomic_text(item_df))
    return inter_path, item_path


def _atomic_text(df: pd.DataFrame) -> str:
    """Tab-joined lines without any quoting (RecBole reads fields verbatim; quotes would become text)."""
    columns = [df[c].tolist() for c in df.columns]
    lines = ["\t".join(df.columns)]
    lines.extend("\t".join(row) for row in zip(*columns))
    return "\n".join(lines) + "\n"
