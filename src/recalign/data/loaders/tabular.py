"""Generic CSV / Parquet loaders: an interaction file plus an optional item catalogue, mapped onto
recalign's columns by one :class:`ColumnMapping` (the same option names for both formats).

Registered loaders:

- ``csv``: a delimited file with a header (or ``columns=`` names) and a column mapping
  (``user_col``, ``item_col``, ``time_col``, ``rating_col``), optionally an item catalogue
  (``items=`` path, CSV or Parquet, with ``items_item_col`` and ``title_col``).
- ``parquet``: the same mapping for a Parquet file (errors name the row, Parquet has no lines).

Files are read by :mod:`~recalign.data.loaders.files` and :mod:`~recalign.data.loaders.delimited`, so bad
input is one line naming the file, the line (or row) and the problem.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from recalign.data.dataset import RecDataset
from recalign.data.loaders.delimited import (
    DelimitedTable,
    check_known_items,
    check_unknown_items_option,
    to_seconds,
)
from recalign.data.loaders.registry import register
from recalign.errors import RecalignInputError


@dataclasses.dataclass(frozen=True)
class ColumnMapping:
    """Which columns hold what, in the interaction file and the optional catalogue: the options the
    CSV and Parquet loaders share (see :func:`load_csv` for each one's meaning)."""

    user_col: str = "user"
    item_col: str = "item"
    time_col: str = "timestamp"
    rating_col: str | None = None
    time_unit: str = "s"
    items: str | Path | None = None
    items_item_col: str | None = None
    title_col: str | None = "title"
    text_cols: list[str] | None = None
    unknown_items: str = "error"
    dataset_name: str | None = None

    @classmethod
    def of(cls, options: dict[str, Any]) -> ColumnMapping:
        """The mapping among a loader's keyword arguments (its ``locals()``), checked."""
        mapping = cls(**{f.name: options[f.name] for f in dataclasses.fields(cls)})
        check_unknown_items_option(mapping.unknown_items)
        return mapping

    @property
    def required(self) -> list[str]:
        """The interaction columns that must exist: user, item, time and (if mapped) rating."""
        return [self.user_col, self.item_col, self.time_col, *([self.rating_col] if self.rating_col else [])]

    def dataset(
        self,
        path: str | Path,
        frame: pd.DataFrame,
        timestamps: np.ndarray,
        ratings: pd.Series | None,
        *,
        source: str,
        items_sep: str,
        encoding: str,
        table: DelimitedTable | None = None,
    ) -> RecDataset:
        """The dataset of the parsed interaction ``frame`` with the mapped catalogue (``table``, when
        given, lets an unknown item be reported by line)."""
        inter = pd.DataFrame(
            {
                "user": frame[self.user_col].astype(str),
                "item": frame[self.item_col].astype(str),
                "timestamp": timestamps,
            }
        )
        if ratings is not None:
            inter["rating"] = ratings.astype("float64")
        cat = None
        if self.items is not None:
            cat, cat_src = _catalogue(
                self.items,
                self.items_item_col or self.item_col,
                self.title_col,
                items_sep,
                encoding,
                self.text_cols,
            )
            if self.unknown_items == "error":
                check_known_items(table, inter["item"], pd.Index(cat["item"]), Path(cat_src).name, source)
        return RecDataset.from_frames(
            self.dataset_name or Path(path).name.split(".")[0],
            inter,
            cat,
            source=source,
            unknown_items=self.unknown_items,
        )


# ---------------------------------------------------------------------- generic loaders
def _catalogue(
    path: str | Path,
    item_col: str,
    title_col: str | None,
    sep: str,
    encoding: str,
    text_cols: list[str] | None,
) -> tuple[pd.DataFrame, str]:
    p = Path(path)
    if p.suffix == ".parquet":
        df = _read_parquet(p)
        src = str(p)
        for c in [item_col, *([title_col] if title_col else [])]:
            if c not in df.columns:
                raise RecalignInputError(
                    f"missing column '{c}' (columns: {', '.join(map(str, df.columns))})", source=p
                )
        df = df.astype({c: str for c in df.columns if c != item_col}).fillna("")
    else:
        t = DelimitedTable(p, sep=sep, header=True, required=[item_col], encoding=encoding, quoted=True)
        src = t.source
        if title_col and title_col not in t.names:
            raise RecalignInputError(
                f"missing column '{title_col}' (header has: {', '.join(t.names)})", source=src, line=1
            )
        df = pd.DataFrame({c: t.text_column(c) for c in t.names})
    keep = text_cols if text_cols is not None else [c for c in df.columns if c not in (item_col, title_col)]
    out = pd.DataFrame({"item": df[item_col].astype(str), "title": df[title_col] if title_col else ""})
    for c in keep:
        if c not in df.columns:
            raise RecalignInputError(f"missing column '{c}'", source=src, field="text_cols")
        out[c] = df[c].astype(str)
    dup = out["item"].duplicated().to_numpy()
    if dup.any():
        raise RecalignInputError(f"item id {out['item'][dup].iloc[0]!r} appears twice", source=src)
    return out, src


def _read_parquet(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise RecalignInputError("file not found", source=path)
    try:
        df = pd.read_parquet(path)
    except Exception as e:  # pyarrow raises several unrelated types for a damaged file
        raise RecalignInputError(f"cannot read Parquet ({type(e).__name__}: {e})", source=path) from None
    if len(df) == 0:
        raise RecalignInputError("empty file (no rows)", source=path)
    return df


def _to_seconds_any(values: pd.Series, unit: str, source: str, col: str, locate: Any) -> np.ndarray:
    """Seconds from numbers (``s``/``ms``) or date strings (``datetime``), naming the first bad value."""
    if unit == "datetime":
        parsed = pd.to_datetime(values, errors="coerce", utc=True, format="ISO8601")
        if parsed.isna().any():  # not all ISO 8601: let pandas guess per value (slower)
            parsed = pd.to_datetime(values, errors="coerce", utc=True, format="mixed")
        bad = parsed.isna().to_numpy()
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise RecalignInputError(f"unparseable date {values.iloc[row]!r}", **locate(row), field=col)
        delta = parsed - pd.Timestamp("1970-01-01", tz="UTC")
        return (delta // pd.Timedelta(seconds=1)).to_numpy(dtype="int64")
    return to_seconds(values, unit, source)


@register("csv")
def load_csv(
    path: str | Path,
    *,
    user_col: str = "user",
    item_col: str = "item",
    time_col: str = "timestamp",
    rating_col: str | None = None,
    sep: str = ",",
    header: bool = True,
    columns: str | list[str] | None = None,
    time_unit: str = "s",
    encoding: str = "utf-8",
    items: str | Path | None = None,
    items_item_col: str | None = None,
    title_col: str | None = "title",
    text_cols: list[str] | None = None,
    items_sep: str | None = None,
    unknown_items: str = "error",
    dataset_name: str | None = None,
) -> RecDataset:
    """A delimited interaction file with a column mapping.

    Args:
        path: the interactions file (``.gz`` allowed).
        user_col, item_col, time_col: column names for user, item and time (required).
        rating_col: column with explicit ratings; ``None`` means the data is implicit feedback.
        sep: field separator (``","``, ``"\\t"``, ``";"``, ``"::"``...).
        header: whether the first line names the columns; if not, pass ``columns`` (names in order,
            a list or a comma-separated string).
        time_unit: ``s`` (Unix seconds), ``ms`` (Unix milliseconds) or ``datetime`` (date strings).
        items: optional catalogue file (CSV with a header, or Parquet) keyed by ``items_item_col``
            (default: ``item_col``) with titles in ``title_col``; ``text_cols`` selects extra text
            fields (default: every other column).
        unknown_items: interacted items missing from the catalogue: ``error`` or ``title-from-id``.
        dataset_name: the dataset's name in results (default: the file name without extensions).
    """
    mapping = ColumnMapping.of(locals())
    if not header and columns is None:
        raise RecalignInputError("a file without header needs columns=name1,name2,...", field="columns")
    names = columns.split(",") if isinstance(columns, str) else columns
    rating = [rating_col] if rating_col else []
    t = DelimitedTable(
        path,
        sep=sep,
        header=header,
        columns=[n.strip() for n in names] if names else None,
        required=mapping.required,
        numeric=[time_col, *rating] if time_unit != "datetime" else rating,
        encoding=encoding,
        quoted=True,
    )
    if time_unit == "datetime":
        ts = _to_seconds_any(
            t.frame[time_col],
            "datetime",
            t.source,
            time_col,
            lambda r: {"source": t.source, "line": t.line_of_row(r)},
        )
    else:
        ts = to_seconds(t.numeric(time_col, "timestamp"), time_unit, t.source)
    ratings = t.numeric(rating_col, "rating") if rating_col else None
    return mapping.dataset(
        path, t.frame, ts, ratings, source=t.source, items_sep=items_sep or sep, encoding=encoding, table=t
    )


@register("parquet")
def load_parquet(
    path: str | Path,
    *,
    user_col: str = "user",
    item_col: str = "item",
    time_col: str = "timestamp",
    rating_col: str | None = None,
    time_unit: str = "s",
    items: str | Path | None = None,
    items_item_col: str | None = None,
    title_col: str | None = "title",
    text_cols: list[str] | None = None,
    items_sep: str = ",",
    unknown_items: str = "error",
    dataset_name: str | None = None,
) -> RecDataset:
    """A Parquet interaction file with the same column mapping as :func:`load_csv`.

    Parquet has no lines, so errors name the (1-based) row instead.
    """
    mapping = ColumnMapping.of(locals())
    p = Path(path)
    df = _read_parquet(p)
    for c in mapping.required:
        if c not in df.columns:
            raise RecalignInputError(
                f"missing column '{c}' (columns: {', '.join(map(str, df.columns))})", source=p
            )
        bad = df[c].isna().to_numpy()
        if bad.any():
            raise RecalignInputError(
                f"empty value in column '{c}' at row {int(np.flatnonzero(bad)[0]) + 1}", source=p
            )

    def numeric(col: str, what: str) -> pd.Series:
        vals = pd.to_numeric(df[col], errors="coerce")
        bad = ~np.isfinite(vals.to_numpy(dtype="float64", na_value=np.nan))
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise RecalignInputError(
                f"non-numeric {what} {df[col].iloc[row]!r} at row {row + 1}", source=p, field=col
            )
        return vals

    if time_unit == "datetime" or pd.api.types.is_datetime64_any_dtype(df[time_col]):
        ts = _to_seconds_any(
            df[time_col], "datetime", str(p), time_col, lambda r: {"source": f"{p} row {r + 1}"}
        )
    else:
        ts = to_seconds(numeric(time_col, "timestamp"), time_unit, str(p))
    ratings = numeric(rating_col, "rating") if rating_col else None
    return mapping.dataset(p, df, ts, ratings, source=str(p), items_sep=items_sep, encoding="utf-8")
