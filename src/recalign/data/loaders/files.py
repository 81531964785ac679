"""The file-reading layer every text-format loader shares: raw bytes and JSON lines.

- :func:`read_source_bytes` reads a file or a zip member (:class:`FileRef`), transparently un-gzipping
  ``*.gz`` (a truncated archive is an error);
- :func:`check_encoding` turns a decode failure into the line and column of the first bad byte;
- :func:`iter_json_records` reads JSON lines (or Python-literal lines, as the Amazon 2014 metadata), naming
  the line of a malformed record; :func:`as_text` flattens nested metadata values to text.

Delimited text (the careful ``pd.read_csv``) is :mod:`recalign.data.loaders.delimited`; the loaders built on
both are ``movielens``, ``amazon``, ``lastfm``, ``recbole`` and ``tabular`` (CSV / Parquet).
"""

from __future__ import annotations

import ast
import gzip
import json
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recalign.errors import RecalignInputError


# ---------------------------------------------------------------------- raw bytes
@dataclass(frozen=True)
class FileRef:
    """A file on disk, or a member of a zip archive (the official MovieLens downloads are zips)."""

    path: Path
    member: str | None = None

    @property
    def name(self) -> str:
        return Path(self.member).name if self.member else self.path.name

    def __str__(self) -> str:
        return f"{self.path}:{self.member}" if self.member else str(self.path)


def read_source_bytes(ref: FileRef | str | Path) -> bytes:
    """All bytes of a file (un-gzipped when the name ends in ``.gz``).

    Raises a one-line :class:`RecalignInputError` for a missing file, a truncated or corrupt gzip
    archive, and an empty (or whitespace-only) file.
    """
    if not isinstance(ref, FileRef):
        ref = FileRef(Path(ref))
    src = str(ref)
    try:
        if ref.member is not None:
            with zipfile.ZipFile(ref.path) as zf:
                data = zf.read(ref.member)
        else:
            data = ref.path.read_bytes()
    except FileNotFoundError:
        raise RecalignInputError("file not found", source=src) from None
    except IsADirectoryError:
        raise RecalignInputError("expected a file, found a directory", source=src) from None
    except KeyError:
        raise RecalignInputError("member not found in the zip archive", source=src) from None
    except zipfile.BadZipFile:
        raise RecalignInputError("not a valid zip archive (truncated or corrupt)", source=ref.path) from None
    if ref.name.endswith(".gz"):
        try:
            data = gzip.decompress(data)
        except EOFError:
            raise RecalignInputError("truncated gzip file (the archive ends early)", source=src) from None
        except (gzip.BadGzipFile, zlib.error, OSError) as e:
            raise RecalignInputError(f"corrupt gzip file ({e})", source=src) from None
    if not data.strip():
        raise RecalignInputError("empty file", source=src)
    return data


def check_encoding(data: bytes, encoding: str, source: str) -> None:
    """Fail with the line and byte of the first undecodable character.

    Latin-1 accepts every byte, so this only bites for UTF-8 formats (a Latin-1 file handed to a
    UTF-8 loader is the usual culprit).
    """
    try:
        data.decode(encoding)
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise RecalignInputError(
            f"not valid {encoding} text: byte 0x{data[e.start]:02x} at column {col} "
            f"(is the file in another encoding, e.g. Latin-1?)",
            source=source,
            line=line,
        ) from None
    except LookupError:
        raise RecalignInputError(f"unknown encoding '{encoding}'", source=source, field="encoding") from None


# ---------------------------------------------------------------------- JSON lines
def iter_json_records(ref: FileRef | str | Path, *, literal: bool = False) -> Iterator[tuple[int, dict]]:
    """(line number, object) for every non-blank line of a JSON-lines file (``.gz`` allowed).

    With ``literal=True`` each line may also be a Python literal (the Amazon 2014 metadata is written
    with ``repr``): lines are tried as JSON first and then with :func:`ast.literal_eval`, which only
    accepts literals and never executes code (no ``eval``, no pickle).
    """
    ref = ref if isinstance(ref, FileRef) else FileRef(Path(ref))
    src = str(ref)
    if not ref.path.is_file():
        raise RecalignInputError("file not found", source=src)
    opener = gzip.open if ref.name.endswith(".gz") else open
    lineno = 0
    seen_any = False
    try:
        with opener(ref.path, "rb") as f:
            for lineno, raw in enumerate(f, start=1):  # noqa: B007 (lineno is used after the loop)
                if not raw.strip():
                    continue
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise RecalignInputError(
                        f"not valid UTF-8 text: byte 0x{raw[e.start]:02x} at column {e.start + 1}",
                        source=src,
                        line=lineno,
                    ) from None
                obj = _parse_record(line.rstrip("\r\n"), literal, src, lineno)
                seen_any = True
                yield lineno, obj
    except EOFError:
        raise RecalignInputError(
            f"truncated gzip file (the archive ends early, after line {lineno})", source=src
        ) from None
    except (gzip.BadGzipFile, zlib.error) as e:
        raise RecalignInputError(f"corrupt gzip file ({e})", source=src) from None
    if not seen_any:
        raise RecalignInputError("empty file", source=src)


def _parse_record(line: str, literal: bool, src: str, lineno: int) -> dict:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        if not literal:
            raise RecalignInputError(
                f"invalid JSON ({e.msg}, column {e.colno})", source=src, line=lineno
            ) from None
        try:
            obj = ast.literal_eval(line.strip())
        except (ValueError, SyntaxError, MemoryError, RecursionError) as e2:
            msg = getattr(e2, "msg", None) or type(e2).__name__
            raise RecalignInputError(
                f"not a JSON object or Python literal ({msg})", source=src, line=lineno
            ) from None
    if not isinstance(obj, dict):
        raise RecalignInputError(
            f"expected an object per line, found {type(obj).__name__}", source=src, line=lineno
        )
    return obj


def as_text(value: Any, joiner: str = " ") -> str:
    """Metadata fields come as strings, lists of strings or lists of lists (the 2014 category paths):
    flatten them to one string of distinct, whitespace-normalised parts in first-seen order."""
    parts: list[str] = []

    def walk(v: Any) -> None:
        if v is None:
            return
        if isinstance(v, list | tuple):
            for x in v:
                walk(x)
            return
        t = " ".join(str(v).split())
        if t and t not in parts:
            parts.append(t)

    walk(value)
    return joiner.join(parts)
