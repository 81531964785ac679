"""MovieLens loaders for the GroupLens on-disk formats.

- ``ml-100k-raw``: a directory with ``u.data`` (tab-separated ``user item rating timestamp``, no header)
  and ``u.item`` (pipe-separated, Latin-1: ``id|title|release date|video release date|IMDb URL|`` and
  19 genre flags), or the official ``ml-100k.zip`` (members ``ml-100k/u.data`` ...). A directory that
  contains the unpacked ``ml-100k/`` folder works too.
- ``ml-1m``: ``ratings.dat`` (``UserID::MovieID::Rating::Timestamp``) and ``movies.dat``
  (``MovieID::Title::Genres``, genres ``|``-joined), Latin-1; a directory or ``ml-1m.zip``.

Titles keep their year ("Toy Story (1995)") because that is how LLM recommenders name items in prompts
(the year disambiguates remakes); the year is also split into its own ``year`` field.

Every rated movie must be in the catalogue: GroupLens files are complete, so a rating of an unknown
movie means a damaged or mismatched file and is an error naming the line (not a guessed title).
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import pandas as pd

from recalign.data.dataset import RecDataset
from recalign.data.loaders.delimited import DelimitedTable, check_known_items, to_seconds
from recalign.data.loaders.embedded import ML100K_GENRES, ml100k_items_frame, year_from_title
from recalign.data.loaders.files import FileRef
from recalign.data.loaders.registry import register
from recalign.errors import RecalignInputError

ML100K_ITEM_COLUMNS = ["item", "title", "release_date", "video_release_date", "imdb_url", *ML100K_GENRES]


def locate_files(path: str | Path, names: tuple[str, ...], what: str) -> dict[str, FileRef]:
    """Find ``names`` in a directory, a sub-directory of it, or a zip archive (any single prefix folder).

    Raises a one-line error naming the first missing file, so "I pointed at the wrong folder" is
    obvious.
    """
    p = Path(path)
    if p.is_file() and zipfile.is_zipfile(p):
        with zipfile.ZipFile(p) as zf:
            members = [m for m in zf.namelist() if not m.endswith("/")]
        found: dict[str, FileRef] = {}
        for n in names:
            hits = sorted((m for m in members if m == n or m.endswith("/" + n)), key=len)
            if not hits:
                raise RecalignInputError(
                    f"missing file '{n}' in the zip archive ({what} needs {', '.join(names)})", source=p
                )
            found[n] = FileRef(p, hits[0])
        return found
    if p.is_file() and p.suffix == ".zip":
        raise RecalignInputError("not a valid zip archive (truncated or corrupt download?)", source=p)
    if p.is_file():
        # A single file of the set was given: look next to it.
        p = p.parent
    if not p.is_dir():
        raise RecalignInputError("no such file or directory", source=p)
    base = p
    if not (p / names[0]).exists():
        subs = [d for d in p.iterdir() if d.is_dir() and (d / names[0]).exists()]
        if len(subs) == 1:
            base = subs[0]
    found = {}
    for n in names:
        f = base / n
        if not f.is_file():
            raise RecalignInputError(f"missing file '{n}' ({what} needs {', '.join(names)})", source=base)
        found[n] = FileRef(f)
    return found


def _genre_flags(table: DelimitedTable) -> None:
    """The 19 genre flags must be 0/1: anything else is a shifted or damaged row."""
    for g in ML100K_GENRES:
        col = table.numeric(g, f"genre flag ({g})")
        bad = ~col.isin([0, 1]).to_numpy()
        if bad.any():
            row = int(bad.nonzero()[0][0])
            raise RecalignInputError(
                f"genre flag '{g}' must be 0 or 1, found {table.frame[g].iloc[row]!r}",
                source=table.source,
                line=table.line_of_row(row),
            )
        table.frame[g] = col.astype("int64")


@register("ml-100k-raw")
def load_ml100k_raw(path: str | Path, *, dataset_name: str = "ml-100k") -> RecDataset:
    """MovieLens-100K from ``u.data`` + ``u.item`` (directory or the official zip)."""
    files = locate_files(path, ("u.data", "u.item"), "MovieLens-100K")
    data = DelimitedTable(
        files["u.data"],
        sep="\t",
        columns=["user", "item", "rating", "timestamp"],
        required=["user", "item", "rating", "timestamp"],
        numeric=["rating", "timestamp"],
        encoding="latin-1",
    )
    items = DelimitedTable(
        files["u.item"],
        sep="|",
        columns=ML100K_ITEM_COLUMNS,
        required=["item", "title"],
        numeric=list(ML100K_GENRES),
        encoding="latin-1",
    )
    _genre_flags(items)
    catalogue = ml100k_items_frame(items.frame, "item", "title")
    _check_unique(items, "item")
    inter = pd.DataFrame(
        {
            "user": data.frame["user"],
            "item": data.frame["item"],
            "timestamp": to_seconds(data.numeric("timestamp"), "s", data.source),
            "rating": data.numeric("rating"),
        }
    )
    check_known_items(data, inter["item"], pd.Index(catalogue["item"]), "u.item", data.source)
    return RecDataset.from_frames(dataset_name, inter, catalogue, source=data.source)


@register("ml-1m")
def load_ml1m(path: str | Path, *, dataset_name: str = "ml-1m") -> RecDataset:
    """MovieLens-1M from ``ratings.dat`` + ``movies.dat`` (directory or the official zip)."""
    files = locate_files(path, ("ratings.dat", "movies.dat"), "MovieLens-1M")
    data = DelimitedTable(
        files["ratings.dat"],
        sep="::",
        columns=["user", "item", "rating", "timestamp"],
        required=["user", "item", "rating", "timestamp"],
        numeric=["rating", "timestamp"],
        encoding="latin-1",
    )
    movies = DelimitedTable(
        files["movies.dat"],
        sep="::",
        columns=["item", "title", "genres"],
        required=["item", "title"],
        encoding="latin-1",
    )
    _check_unique(movies, "item")
    titles = movies.text_column("title").str.strip()
    catalogue = pd.DataFrame(
        {
            "item": movies.frame["item"].astype(str),
            "title": titles,
            "year": [year_from_title(t) or "" for t in titles],
            "genres": movies.text_column("genres").str.strip(),
        }
    )
    inter = pd.DataFrame(
        {
            "user": data.frame["user"],
            "item": data.frame["item"],
            "timestamp": to_seconds(data.numeric("timestamp"), "s", data.source),
            "rating": data.numeric("rating"),
        }
    )
    check_known_items(data, inter["item"], pd.Index(catalogue["item"]), "movies.dat", data.source)
    return RecDataset.from_frames(dataset_name, inter, catalogue, source=data.source)


def _check_unique(table: DelimitedTable, col: str) -> None:
    dup = table.frame[col].duplicated().to_numpy()
    if dup.any():
        row = int(dup.nonzero()[0][0])
        raise RecalignInputError(
            f"item id {table.frame[col].iloc[row]!r} appears twice in the catalogue",
            source=table.source,
            line=table.line_of_row(row),
        )
