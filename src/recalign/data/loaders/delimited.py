"""Delimited text read carefully: the parser behind every CSV / TSV / ``::`` loader.

Why this module is more than ``pd.read_csv``: recalign promises that bad input produces *one line*
naming the file, the line and the problem, and that nothing is dropped silently. ``pandas`` alone is
fast but vague (a comma file read as tab-separated is just "one column"; short rows quietly become empty
fields; a bad byte is reported at a chunk offset). So every reader here

1. reads the raw bytes (transparently un-gzipping ``*.gz``; a truncated archive is an error),
2. checks the encoding over the whole file and turns a decode failure into a line number,
3. parses with pandas' C engine for speed, and then checks cheaply that every row had the expected
   number of fields (for unquoted formats the total separator count must be exactly
   ``(fields - 1) * rows``),
4. only when something is wrong, scans the file line by line to *locate* the first bad line.

So the common case costs one pandas parse plus a few vectorised checks, even for millions of lines, and
the error case names the line. :class:`DelimitedTable`, :func:`to_seconds` and :func:`check_known_items`
are used by the MovieLens, Amazon, LastFM, RecBole and CSV loaders; the raw bytes come from
:mod:`recalign.data.loaders.files`.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from recalign.data.loaders.files import FileRef, check_encoding, read_source_bytes
from recalign.errors import RecalignInputError

SEP_NAMES = {"\t": "tab", ",": "comma", "|": "pipe", ";": "semicolon", "::": "'::'", " ": "space"}
_PRIVATE_SEP = "\x1f"  # ASCII unit separator: stands in for multi-character separators such as '::'


def sep_name(sep: str) -> str:
    return SEP_NAMES.get(sep, repr(sep))


# ---------------------------------------------------------------------- delimited text
class DelimitedTable:
    """A delimited text file parsed into string columns, able to say which *line* a row came from.

    Args:
        ref: the file.
        sep: field separator (``"\\t"``, ``","``, ``"|"``, ``"::"``...).
        columns: names for a headerless file (their number is the expected field count).
        header: the first non-blank line holds the column names.
        required: columns that must exist and may not be empty in any row.
        numeric: columns pandas may parse as numbers directly (they are validated by :meth:`numeric`);
            every other column is read as text so that ids like ``"0012"`` survive.
        encoding: text encoding of the file.
        quoted: honour ``"``-quoting (CSV style). Formats that never quote (MovieLens, RecBole, LastFM)
            pass ``False`` so a stray quote in a title is just a character.
        optional_trailing: how many trailing columns a line may leave out entirely (read as empty);
            every other deviation in the field count is an error naming the line.
        data: the file's bytes, if the caller has already read them.
    """

    def __init__(
        self,
        ref: FileRef | str | Path,
        *,
        sep: str,
        columns: Sequence[str] | None = None,
        header: bool = False,
        required: Sequence[str] = (),
        numeric: Sequence[str] = (),
        encoding: str = "utf-8",
        quoted: bool = False,
        optional_trailing: int = 0,
        data: bytes | None = None,
    ) -> None:
        self.ref = ref if isinstance(ref, FileRef) else FileRef(Path(ref))
        self.source = str(self.ref)
        self.sep = sep
        self.encoding = encoding
        raw = read_source_bytes(self.ref) if data is None else data
        check_encoding(raw, encoding, self.source)
        if len(sep) > 1:
            if _PRIVATE_SEP.encode() in raw:
                raise RecalignInputError("file contains control character 0x1f", source=self.source)
            raw = raw.replace(sep.encode(encoding), _PRIVATE_SEP.encode())
            self._psep = _PRIVATE_SEP
        else:
            self._psep = sep
        self._raw = raw
        # CSV quoting only matters if a quote character occurs at all; without one, the cheap exact
        # separator-count check applies.
        self.quoted = quoted and b'"' in raw
        self._text: str | None = None
        self._header_line = 0

        if header:
            first = self._first_record()
            if first is None:
                raise RecalignInputError("empty file", source=self.source)
            self._header_line, names = first
            names = [n.strip().lstrip("\ufeff") for n in names]
            self.names = names
        else:
            if columns is None:
                raise ValueError("DelimitedTable needs columns= or header=True")
            self.names = list(columns)
        self.n_fields = len(self.names)
        self.min_fields = self.n_fields - optional_trailing
        missing = [c for c in required if c not in self.names]
        if missing:
            hint = self._separator_hint(self.names) if header else ""
            raise RecalignInputError(
                f"missing column '{missing[0]}' ({'header has' if header else 'columns are'}: "
                f"{', '.join(self.names)}){hint}",
                source=self.source,
                line=self._header_line or None,
            )
        if len(set(self.names)) != len(self.names):
            dup = next(n for n in self.names if self.names.count(n) > 1)
            raise RecalignInputError(
                f"column '{dup}' appears twice in the header", source=self.source, line=self._header_line
            )
        self.frame = self._parse(numeric)
        if header:
            self._check_repeated_header()
        for col in required:
            self._check_not_empty(col)

    # ---------------------------------------------------------------- parsing
    def _parse(self, numeric: Sequence[str]) -> pd.DataFrame:
        dtype = {i: str for i, n in enumerate(self.names) if n not in numeric}

        def read(**extra: Any) -> pd.DataFrame:
            return pd.read_csv(
                io.BytesIO(self._raw),
                sep=self._psep,
                header=None,
                skiprows=self._header_line,  # the header line and any blank lines before it
                dtype=dtype,
                na_values=[""],
                keep_default_na=False,
                quoting=csv.QUOTE_MINIMAL if self.quoted else csv.QUOTE_NONE,
                encoding=self.encoding,
                engine="c",
                skip_blank_lines=True,
                low_memory=False,
                **extra,
            )

        # Without explicit names pandas refuses rows longer than the first one (a ParserError) instead
        # of silently truncating them, so extra fields are always caught.
        try:
            df: pd.DataFrame | None = read()
        except pd.errors.EmptyDataError:
            raise RecalignInputError(
                "no data rows" if self._header_line else "empty file", source=self.source
            ) from None
        except pd.errors.ParserError as e:
            self._locate_bad_line()
            if self.min_fields == self.n_fields:
                raise RecalignInputError(
                    f"cannot parse: {' '.join(str(e).split())}", source=self.source
                ) from None
            df = None  # only allowed short rows (optional trailing fields) confused pandas
        if df is None or df.shape[1] != self.n_fields:
            self._locate_bad_line()
            if self.min_fields == self.n_fields:
                raise RecalignInputError(
                    f"inconsistent number of fields (expected {self.n_fields} {sep_name(self.sep)}-separated)",
                    source=self.source,
                )
            # Every line has between min_fields and n_fields fields (just checked): read them padded.
            df = read(names=list(range(self.n_fields)), index_col=False)
        elif self.quoted:
            if df.isna().to_numpy().any():
                self._locate_bad_line()
        else:
            n_seps = self._raw.count(self._psep.encode())
            if self._header_line:
                n_seps -= self.n_fields - 1
            if n_seps != (self.n_fields - 1) * len(df):
                self._locate_bad_line()
                if self.min_fields == self.n_fields:
                    raise RecalignInputError("inconsistent number of fields", source=self.source)
        df.columns = self.names
        return df

    def _separator_hint(self, fields: list[str]) -> str:
        if len(fields) != 1:
            return ""
        for cand in ("\t", ",", ";", "|", "::", " "):
            if cand != self.sep and cand in fields[0]:
                return f"; is the separator {sep_name(cand)} rather than {sep_name(self.sep)}?"
        return ""

    def _locate_bad_line(self) -> None:
        """Scan for the first line with a wrong number of fields and fail there (no-op if none)."""
        for line, fields in self.records():
            if not self.min_fields <= len(fields) <= self.n_fields:
                hint = self._separator_hint(fields) if len(fields) == 1 else ""
                want = (
                    str(self.n_fields)
                    if self.min_fields == self.n_fields
                    else f"{self.min_fields} to {self.n_fields}"
                )
                raise RecalignInputError(
                    f"expected {want} {sep_name(self.sep)}-separated fields, found {len(fields)}{hint}",
                    source=self.source,
                    line=line,
                )

    @property
    def text(self) -> str:
        if self._text is None:
            self._text = self._raw.decode(self.encoding)
        return self._text

    def _first_record(self) -> tuple[int, list[str]] | None:
        """The first non-blank line (the header), read from the raw bytes without decoding the file."""
        raw, pos, lineno = self._raw, 0, 0
        while pos < len(raw):
            end = raw.find(b"\n", pos)
            end = len(raw) if end == -1 else end
            lineno += 1
            line = raw[pos:end].decode(self.encoding).rstrip("\r")
            if line.strip(" "):
                if self.quoted:
                    try:
                        return lineno, next(csv.reader([line], delimiter=self._psep))
                    except csv.Error as e:  # e.g. a stray carriage return inside the header
                        raise RecalignInputError(
                            f"malformed header line ({e})", source=self.source, line=lineno
                        ) from None
                return lineno, line.split(self._psep)
            pos = end + 1
        return None

    def records(self, include_header: bool = False) -> Iterator[tuple[int, list[str]]]:
        """(1-based line number, fields) of every non-blank record, header excluded unless asked."""
        if self.quoted:
            reader = csv.reader(io.StringIO(self.text, newline=""), delimiter=self._psep, strict=True)
            while True:
                try:
                    fields = next(reader)
                except StopIteration:
                    return
                except csv.Error as e:
                    raise RecalignInputError(
                        f"malformed quoted field ({e})", source=self.source, line=reader.line_num
                    ) from None
                if not fields or (len(fields) == 1 and not fields[0].strip()):
                    continue
                if not include_header and reader.line_num <= self._header_line:
                    continue
                yield reader.line_num, fields
        else:
            for i, line in enumerate(self.text.split("\n"), start=1):
                line = line.rstrip("\r")
                if not line.strip(" "):
                    continue
                if not include_header and i <= self._header_line:
                    continue
                yield i, line.split(self._psep)

    def line_of_row(self, row: int) -> int | None:
        """Line number of data row ``row`` (0-based, as in :attr:`frame`)."""
        for k, (line, _) in enumerate(self.records()):
            if k == row:
                return line
        return None

    # ---------------------------------------------------------------- validation
    def _check_repeated_header(self) -> None:
        """A header line in the middle of the data (two files concatenated) is an error, not a row."""
        cols = self.names[: min(3, self.n_fields)]
        if any(pd.api.types.is_numeric_dtype(self.frame[c]) for c in cols):
            return  # a column that parsed as numbers cannot contain its own name: no repeated header
        mask = np.ones(len(self.frame), dtype=bool)
        for n in cols:
            mask &= (self.frame[n] == n).to_numpy(dtype=bool, na_value=False)
        if mask.any():
            row = int(np.flatnonzero(mask)[0])
            raise RecalignInputError(
                "the header line is repeated inside the data (concatenated files?)",
                source=self.source,
                line=self.line_of_row(row),
            )

    def _check_not_empty(self, col: str) -> None:
        bad = self.frame[col].isna().to_numpy()
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise RecalignInputError(
                f"empty value in column '{col}'", source=self.source, line=self.line_of_row(row)
            )

    def require(self, cols: Sequence[str]) -> None:
        for col in cols:
            if col not in self.names:
                raise RecalignInputError(
                    f"missing column '{col}' (columns: {', '.join(self.names)})", source=self.source
                )
            self._check_not_empty(col)

    def numeric(self, col: str, what: str | None = None) -> pd.Series:
        """Column ``col`` as numbers; the first non-numeric value is reported with its line."""
        s = self.frame[col]
        if pd.api.types.is_numeric_dtype(s) and not pd.api.types.is_bool_dtype(s):
            vals = s
        else:
            vals = pd.to_numeric(s, errors="coerce")
        # inf / 1e400 parse as numbers but are no rating, weight or time: rejected like text.
        bad = ~np.isfinite(vals.to_numpy(dtype="float64", na_value=np.nan))
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            v = s.iloc[row]
            v = v.item() if isinstance(v, np.generic) else v  # 'inf', not 'np.float64(inf)'
            shown = "an empty value" if (v is None or (isinstance(v, float) and np.isnan(v))) else repr(v)
            kind = "non-numeric" if pd.isna(vals.iloc[row]) else "non-finite"
            raise RecalignInputError(
                f"{kind} {what or col} {shown}",
                source=self.source,
                line=self.line_of_row(row),
                field=col,
            )
        return vals

    def text_column(self, col: str) -> pd.Series:
        """Column as strings, with empty fields as ``""``."""
        return self.frame[col].astype(object).where(self.frame[col].notna(), "").astype(str)


def to_seconds(ts: pd.Series, unit: str, source: str) -> np.ndarray:
    """Integer seconds from numbers in ``unit`` (``"s"`` or ``"ms"``).

    Values outside the int64 range (or not finite) are an error: numpy would cast them silently to
    -2**63, which sorts first in every user's history.
    """
    x = ts.to_numpy(dtype="float64")
    out = ~(np.abs(x) < 2.0**63)
    if out.any():
        row = int(np.flatnonzero(out)[0])
        raise RecalignInputError(
            f"timestamp {x[row]:g} in data row {row + 1} is out of range",
            source=source,
            field="timestamp",
        )
    if unit == "s":
        return np.floor(ts.to_numpy(dtype="float64")).astype("int64")
    if unit == "ms":
        return np.floor_divide(ts.to_numpy(dtype="float64"), 1000).astype("int64")
    raise RecalignInputError(f"unknown time unit '{unit}' (choose s or ms)", source=source, field="time_unit")


def check_unknown_items_option(value: str) -> None:
    if value not in ("error", "title-from-id"):
        raise RecalignInputError(
            f"unknown_items must be 'error' or 'title-from-id', got {value!r}", field="unknown_items"
        )


def check_known_items(
    table: DelimitedTable | None,
    item_ids: pd.Series,
    known: set[str] | pd.Index,
    catalogue: str,
    source: str,
) -> None:
    """Every interacted item must be in the catalogue: name the first unknown id and its line."""
    known_idx = known if isinstance(known, pd.Index) else pd.Index(list(known))
    mask = ~item_ids.isin(known_idx).to_numpy()
    if mask.any():
        row = int(np.flatnonzero(mask)[0])
        n_unknown = item_ids[mask].nunique()
        line = table.line_of_row(row) if table is not None else None
        where = "" if line is not None else f" (row {row + 1})"
        raise RecalignInputError(
            f"item id {item_ids.iloc[row]!r} is not in {catalogue}{where} ({n_unknown} unknown item id(s) in all)",
            source=source,
            line=line,
        )
