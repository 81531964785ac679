"""LastFM hetrec-2011 (2K users) loader.

Files (tab-separated, UTF-8, each with a header line):

- ``user_artists.dat``: ``userID artistID weight`` (listening counts) — the interactions;
- ``user_taggedartists-timestamps.dat``: ``userID artistID tagID timestamp`` (milliseconds);
- ``artists.dat``: ``id name url pictureURL`` — the catalogue, titled by artist name.

The listening table has no time, yet sequential recommenders and chronological splits need one. The
only time signal in the release is when a user *tagged* an artist, so:

- a (user, artist) pair that was tagged gets the time of its **first** tagging;
- a pair that was never tagged (the majority) is, by default (``untagged="before-first-tag"``), kept
  and placed in the seconds just *before its user's first tagging* (n untagged pairs take first−n …
  first−1), ordered among themselves by listening weight, heaviest first (the release carries no
  order for them, so this is a deterministic convention, not a claim about real time). Users who never tagged anything get one second before
  the earliest tagging in the file. With ``untagged="drop"`` those pairs are removed instead. Either
  way the number of affected pairs is written to ``notes`` — nothing is dropped silently.
- tag assignments for pairs absent from ``user_artists.dat`` are ignored and counted in ``notes``.

``artists.dat`` is read as UTF-8 (``encoding=`` changes it); its trailing ``url``/``pictureURL`` fields
may be missing from a line. ``weight`` is a play count, not a rating, so ratings stay empty unless ``weight_as_rating=True``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from recalign.data.dataset import RecDataset
from recalign.data.loaders.delimited import DelimitedTable, check_known_items, to_seconds
from recalign.data.loaders.movielens import locate_files
from recalign.data.loaders.registry import register
from recalign.errors import RecalignInputError

LASTFM_FILES = ("user_artists.dat", "user_taggedartists-timestamps.dat", "artists.dat")


@register("lastfm")
def load_lastfm(
    path: str | Path,
    *,
    untagged: str = "before-first-tag",
    weight_as_rating: bool = False,
    encoding: str = "utf-8",
    dataset_name: str = "lastfm",
) -> RecDataset:
    """LastFM hetrec-2k from a directory (or zip) holding the three files above."""
    if untagged not in ("before-first-tag", "drop"):
        raise RecalignInputError(
            f"untagged must be 'before-first-tag' or 'drop', got {untagged!r}", field="untagged"
        )
    files = locate_files(path, LASTFM_FILES, "LastFM hetrec-2k")
    ua = DelimitedTable(
        files["user_artists.dat"],
        sep="\t",
        header=True,
        required=["userID", "artistID", "weight"],
        numeric=["weight"],
    )
    tags = DelimitedTable(
        files["user_taggedartists-timestamps.dat"],
        sep="\t",
        header=True,
        required=["userID", "artistID", "timestamp"],
        numeric=["tagID", "timestamp"],
    )
    # pictureURL (and url) may be left out at the end of a line: they are decoration, not data.
    artists = DelimitedTable(
        files["artists.dat"],
        sep="\t",
        header=True,
        required=["id", "name"],
        optional_trailing=2,
        encoding=encoding,
    )

    dup = artists.frame["id"].duplicated().to_numpy()
    if dup.any():
        row = int(dup.nonzero()[0][0])
        raise RecalignInputError(
            f"artist id {artists.frame['id'].iloc[row]!r} appears twice",
            source=artists.source,
            line=artists.line_of_row(row),
        )
    pair_dup = ua.frame.duplicated(["userID", "artistID"]).to_numpy()
    if pair_dup.any():
        row = int(pair_dup.nonzero()[0][0])
        raise RecalignInputError("user–artist pair listed twice", source=ua.source, line=ua.line_of_row(row))

    catalogue = pd.DataFrame(
        {"item": artists.frame["id"].astype(str), "title": artists.text_column("name").str.strip()}
    )
    if "url" in artists.names:
        catalogue["url"] = artists.text_column("url")
    check_known_items(
        ua, ua.frame["artistID"].astype(str), pd.Index(catalogue["item"]), "artists.dat", ua.source
    )

    weight = ua.numeric("weight")
    inter = pd.DataFrame(
        {
            "user": ua.frame["userID"].astype(str),
            "item": ua.frame["artistID"].astype(str),
            "weight": weight.to_numpy(),
        }
    )
    tag_frame = pd.DataFrame(
        {
            "user": tags.frame["userID"].astype(str),
            "item": tags.frame["artistID"].astype(str),
            "ts": to_seconds(tags.numeric("timestamp"), "ms", tags.source),
        }
    )
    first_tag = tag_frame.groupby(["user", "item"], sort=False)["ts"].min()
    notes: list[str] = []
    key = pd.MultiIndex.from_frame(inter[["user", "item"]])
    orphan = int((~first_tag.index.isin(key)).sum())
    if orphan:
        notes.append(
            f"{orphan} tagged user–artist pairs have no listening record in user_artists.dat; ignored"
        )

    ts = first_tag.reindex(key).to_numpy()
    tagged = ~np.isnan(ts)
    n_untagged = int((~tagged).sum())
    if untagged == "drop":
        inter = inter[tagged].copy()
        inter["timestamp"] = ts[tagged].astype("int64")
        if n_untagged:
            notes.append(
                f"{n_untagged} of {len(tagged)} user–artist pairs were never tagged (no time); dropped"
            )
        if len(inter) == 0:
            raise RecalignInputError(
                "no user–artist pair was ever tagged; nothing left with untagged='drop'", source=ua.source
            )
    else:
        global_first = int(np.nanmin(ts)) if tagged.any() else 0
        inter["timestamp"] = ts
        user_first = (
            inter.groupby("user", sort=False)["timestamp"].transform("min").fillna(global_first).to_numpy()
        )
        # Untagged pairs take the n seconds before their user's first tag, heaviest listening first;
        # distinct times make the order explicit (it does not rely on row order surviving later steps).
        untagged_rows = inter[~tagged]
        rank = untagged_rows.groupby("user", sort=False)["weight"].rank(method="first", ascending=False)
        count = untagged_rows.groupby("user", sort=False)["weight"].transform("size")
        fallback = np.zeros(len(inter))
        fallback[~tagged] = user_first[~tagged] - count.to_numpy() - 1 + rank.to_numpy()
        inter["timestamp"] = np.where(tagged, np.nan_to_num(ts), fallback).astype("int64")
        if n_untagged:
            never = inter["user"].nunique() - inter.loc[tagged, "user"].nunique()
            notes.append(
                f"{n_untagged} of {len(tagged)} user–artist pairs were never tagged; placed in the seconds just "
                f"before their user's first tag, heaviest listening first ({never} users never tagged: before "
                f"the earliest tag in the file)"
            )
    if weight_as_rating:
        inter["rating"] = inter["weight"].astype("float64")
    inter = inter.drop(columns="weight").reset_index(drop=True)
    ds = RecDataset.from_frames(dataset_name, inter, catalogue, source=ua.source)
    ds.notes.extend(notes)
    return ds
