"""Loaders on tiny files in the real on-disk formats, written by the tests themselves."""

from __future__ import annotations

import gzip

import numpy as np
import pandas as pd
import pytest
from _samples import (
    write_amazon2014,
    write_amazon2023,
    write_csv,
    write_lastfm,
    write_ml1m_dir,
    write_ml100k_dir,
    write_ml100k_zip,
    write_recbole,
)

from recalign.data.loaders import load_dataset
from recalign.data.loaders.recbole import load_recbole
from recalign.data.loaders.recbole import write_recbole as save_recbole
from recalign.errors import RecalignInputError


def events(ds) -> list[tuple]:
    """(user id, item id, timestamp, rating) by original ids, in chronological order per user."""
    inter = ds.interactions
    users = ds.user_ids[inter["user_idx"].to_numpy()]
    items = ds.items["item_id"].to_numpy()[inter["item_idx"].to_numpy()]
    rows = [
        (str(u), str(i), int(t), None if np.isnan(r) else float(r))
        for u, i, t, r in zip(users, items, inter["timestamp"], inter["rating"])
    ]
    return sorted(rows, key=lambda r: (r[0], r[2]))


def item_row(ds, item_id: str) -> pd.Series:
    return ds.items.set_index("item_id").loc[item_id]


# ---------------------------------------------------------------------- MovieLens
@pytest.mark.parametrize("kind", ["dir", "zip"])
def test_ml100k_raw_directory_and_zip(tmp_path, kind):
    path = write_ml100k_dir(tmp_path) if kind == "dir" else write_ml100k_zip(tmp_path)
    ds = load_dataset("ml-100k", path=path)  # a path turns the embedded name into the raw loader
    assert (ds.n_users, ds.n_items, ds.n_interactions) == (3, 5, 8)
    assert ds.name == "ml-100k"
    assert item_row(ds, "1")["title"] == "Toy Story (1995)"
    assert item_row(ds, "1")["genres"] == "Animation|Children's|Comedy"
    assert item_row(ds, "3")["title"] == "Café au lait (1994)"  # Latin-1 decoded
    assert item_row(ds, "3")["year"] == "1994"
    assert "6" not in set(ds.items["item_id"])  # never rated: not indexed ...
    assert any("1 catalogue items never interacted" in n for n in ds.notes)  # ... but counted
    assert events(ds)[0] == ("1", "1", 881250949, 5.0)
    assert ds.interactions["timestamp"].dtype == np.int64


def test_ml100k_directory_guessed_from_path(tmp_path):
    d = write_ml100k_dir(tmp_path)
    ds = load_dataset(str(d))
    assert ds.n_interactions == 8


def test_ml100k_directory_above_the_unpacked_folder(tmp_path):
    write_ml100k_dir(tmp_path)  # tmp_path/ml-100k/u.data
    ds = load_dataset("ml-100k-raw", path=tmp_path)
    assert ds.n_users == 3


def test_ml1m(tmp_path):
    ds = load_dataset("ml-1m", path=write_ml1m_dir(tmp_path))
    assert (ds.n_users, ds.n_items, ds.n_interactions) == (2, 3, 4)
    row = item_row(ds, "661")
    assert row["title"] == "James and the Giant Peach (1996)"
    assert row["year"] == "1996"
    assert row["genres"] == "Animation|Children's|Musical"
    assert ("1", "1193", 978300760, 5.0) in events(ds)


def test_ml1m_unknown_movie_is_an_error_with_line(tmp_path):
    d = write_ml1m_dir(tmp_path, ratings=b"1::1193::5::978300760\n1::7777::3::978302109\n")
    with pytest.raises(RecalignInputError, match=r"ratings\.dat:2: item id '7777' is not in movies\.dat"):
        load_dataset("ml-1m", path=d)


# ---------------------------------------------------------------------- Amazon
def test_amazon_2014_literal_metadata(tmp_path):
    ds = load_dataset("amazon-2014", path=write_amazon2014(tmp_path))
    assert (ds.n_users, ds.n_items, ds.n_interactions) == (2, 3, 4)
    assert item_row(ds, "B001")["categories"] == "Beauty|Skin Care|Lips"
    assert item_row(ds, "B001")["brand"] == "Acme"
    assert item_row(ds, "B002")["title"] == "Shampoo 'Fresh'"
    assert item_row(ds, "B002")["description"] == "Cleans hair."
    assert item_row(ds, "B003")["title"] == "Item B003"  # rated but no metadata: kept, titled by id
    assert any("1 interacted items had no metadata" in n for n in ds.notes)
    assert any("1 catalogue items never interacted" in n for n in ds.notes)  # B999
    assert ("A1", "B001", 1356998400, 5.0) in events(ds)


def test_amazon_2014_can_refuse_items_without_metadata(tmp_path):
    d = write_amazon2014(tmp_path)
    with pytest.raises(
        RecalignInputError, match=r"ratings_Beauty\.csv:4: item id 'B003' is not in meta_Beauty"
    ):
        load_dataset("amazon-2014", path=d, unknown_items="error")


def test_amazon_2014_literal_eval_never_executes_code(tmp_path):
    marker = tmp_path / "pwned"
    lines = [repr({"asin": "B001", "title": "ok"}), f"__import__('pathlib').Path({str(marker)!r}).touch()"]
    d = write_amazon2014(tmp_path, meta_lines=lines)
    with pytest.raises(
        RecalignInputError, match=r"meta_Beauty\.json\.gz:2: not a JSON object or Python literal"
    ):
        load_dataset("amazon-2014", path=d)
    assert not marker.exists()


@pytest.mark.parametrize("gz", [True, False])
def test_amazon_2023_ms_timestamps_metadata_and_reviews(tmp_path, gz):
    ds = load_dataset("amazon-2023", path=write_amazon2023(tmp_path, gz=gz))
    assert (ds.n_users, ds.n_items, ds.n_interactions) == (2, 3, 4)
    ev = events(ds)
    assert ("U1", "P1", 1588615855, 5.0) in ev  # milliseconds -> seconds (floor)
    assert ("U1", "P2", 1588615856, 4.0) in ev
    p1 = item_row(ds, "P1")
    assert p1["title"] == "Kindle Cover"
    assert p1["description"] == "Fits all. Leather."
    assert p1["categories"] == "Electronics|Cases"
    assert p1["store"] == "Acme"
    # Reviews: U9 never rated P1, so that review is left out and counted.
    assert ds.reviews is not None and len(ds.reviews) == 2
    texts = dict(zip(ds.user_ids[ds.reviews["user_idx"]], ds.reviews["text"]))
    assert texts["U1"] == "Great. Fits my Kindle."
    assert any("1 reviews of (user, item) pairs absent" in n for n in ds.notes)


def test_amazon_2023_without_metadata_titles_by_id(tmp_path):
    d = write_amazon2023(tmp_path, reviews=False)
    ds = load_dataset("amazon-2023", path=d / "Electronics.csv")  # the ratings file alone
    assert item_row(ds, "P3")["title"] == "Item P3"
    assert any("no metadata file" in n for n in ds.notes)


# ---------------------------------------------------------------------- LastFM
def _sequence(ds, user: str) -> list[str]:
    u = list(ds.user_ids).index(user)
    return [str(ds.items["item_id"].iloc[i]) for i in ds.sequences()[u]]


def test_lastfm_first_tag_time_and_untagged_fallback(tmp_path):
    ds = load_dataset("lastfm", path=write_lastfm(tmp_path))
    assert (ds.n_users, ds.n_items, ds.n_interactions) == (2, 5, 6)  # nothing silently dropped
    ts = {(u, i): t for u, i, t, _ in events(ds)}
    assert ts[("2", "51")] == 1000  # earliest of its two taggings (ms -> s)
    assert ts[("2", "54")] == 3000
    # Untagged pairs take the seconds just before the user's first tag, heaviest listening first.
    assert (ts[("2", "52")], ts[("2", "53")]) == (998, 999)
    assert _sequence(ds, "2") == ["52", "53", "51", "54"]
    # User 3 never tagged: placed before the earliest tag in the file (1000 s), heaviest first.
    assert _sequence(ds, "3") == ["55", "51"]
    assert item_row(ds, "55")["title"] == "Björk"
    assert not ds.has_ratings
    notes = " ".join(ds.notes)
    assert "4 of 6 user–artist pairs were never tagged" in notes
    assert "1 users never tagged" in notes
    assert "1 tagged user–artist pairs have no listening record" in notes


def test_lastfm_drop_untagged_is_reported(tmp_path):
    ds = load_dataset("lastfm", path=write_lastfm(tmp_path), untagged="drop", weight_as_rating=True)
    assert (ds.n_users, ds.n_interactions) == (1, 2)
    assert sorted(r for *_, r in events(ds)) == [700.0, 13883.0]
    assert any("4 of 6 user–artist pairs were never tagged (no time); dropped" in n for n in ds.notes)


# ---------------------------------------------------------------------- RecBole
def test_recbole_read(tmp_path):
    ds = load_dataset("recbole", path=write_recbole(tmp_path))
    assert ds.name == "toy"
    assert (ds.n_users, ds.n_items, ds.n_interactions) == (2, 2, 3)
    assert ("196", "302", 881250950, 4.5) in events(ds)
    row = item_row(ds, "302")
    assert row["title"] == "L.A. Confidential"
    assert row["year"] == "1997"
    assert row["genres"] == "Crime|Film-Noir|Mystery|Thriller"


def test_recbole_without_timestamp_uses_file_order(tmp_path):
    d = write_recbole(tmp_path, inter="user_id:token\titem_id:token\n1\ta\n1\tb\n2\ta\n", item="")
    ds = load_recbole(d)
    assert _sequence(ds, "1") == ["a", "b"]
    assert not ds.has_ratings
    assert any("file order is used as time order" in n for n in ds.notes)


@pytest.mark.parametrize("source", ["ml100k", "amazon2023"])
def test_recbole_round_trip(tmp_path, source):
    if source == "ml100k":
        original = load_dataset("ml-100k", path=write_ml100k_dir(tmp_path))
    else:
        original = load_dataset("amazon-2023", path=write_amazon2023(tmp_path, reviews=False))
    inter_path, item_path = save_recbole(original, tmp_path / "out", name="rt")
    header = inter_path.read_text().splitlines()[0]
    assert header == "user_id:token\titem_id:token\trating:float\ttimestamp:float"
    back = load_recbole(tmp_path / "out")
    assert back.name == "rt"
    assert events(back) == events(original)
    a = original.items.set_index("item_id").sort_index()
    b = back.items.set_index("item_id").sort_index()
    assert sorted(a.columns) == sorted(b.columns)
    pd.testing.assert_frame_equal(a[sorted(a.columns)], b[sorted(a.columns)], check_dtype=False)
    if source == "ml100k":
        assert "genre:token_seq" in item_path.read_text().splitlines()[0]


def test_recbole_writer_keeps_fields_one_line(tmp_path):
    ds = load_dataset("recbole", path=write_recbole(tmp_path))
    ds.items.loc[0, "title"] = 'Tab\there "quoted"\nnewline'
    _, item_path = save_recbole(ds, tmp_path / "w", name="w")
    lines = item_path.read_text().splitlines()
    assert len(lines) == 3  # header + 2 items: no line break leaked
    back = load_recbole(tmp_path / "w")
    assert item_row(back, ds.items.loc[0, "item_id"])["title"] == 'Tab here "quoted" newline'


# ---------------------------------------------------------------------- CSV / Parquet
def test_csv_with_column_mapping_and_catalogue(tmp_path):
    log = write_csv(
        tmp_path,
        "uid;iid;when;stars\nu1;0012;2024-01-02T00:00:00Z;4\nu1;12;2024-01-01;5\nu2;0012;2024-01-03;1\n",
    )
    cat = write_csv(
        tmp_path, 'iid,name,genre\n0012,"Film, The",Drama\n12,Other,Comedy\n99,Unused,X\n', "items.csv"
    )
    ds = load_dataset(
        "csv",
        path=log,
        user_col="uid",
        item_col="iid",
        time_col="when",
        rating_col="stars",
        sep=";",
        time_unit="datetime",
        items=cat,
        items_sep=",",
        title_col="name",
    )
    assert (ds.n_users, ds.n_items, ds.n_interactions) == (2, 2, 3)
    assert item_row(ds, "0012")["title"] == "Film, The"  # "0012" and "12" stay distinct ids
    assert item_row(ds, "12")["genre"] == "Comedy"
    assert _sequence(ds, "u1") == ["12", "0012"]  # 2024-01-01 before 2024-01-02
    assert ("u1", "12", 1704067200, 5.0) in events(ds)


def test_csv_headerless_tab_separated_gz(tmp_path):
    p = tmp_path / "log.tsv.gz"
    p.write_bytes(gzip.compress(b"a\tx\t100\nb\tx\t200\na\ty\t300\n"))
    ds = load_dataset("csv", path=p, sep="\t", header=False, columns="user,item,timestamp")
    assert (ds.n_users, ds.n_items, ds.n_interactions) == (2, 2, 3)
    assert not ds.has_ratings


def test_parquet_with_mapping(tmp_path):
    p = tmp_path / "log.parquet"
    pd.DataFrame(
        {"u": [1, 1, 2], "i": ["a", "b", "a"], "t": [5000, 6000, 7000], "r": [1.0, 2.0, 3.0]}
    ).to_parquet(p)
    ds = load_dataset(
        "parquet", path=p, user_col="u", item_col="i", time_col="t", rating_col="r", time_unit="ms"
    )
    assert events(ds) == [("1", "a", 5, 1.0), ("1", "b", 6, 2.0), ("2", "a", 7, 3.0)]


def test_parquet_missing_column(tmp_path):
    p = tmp_path / "log.parquet"
    pd.DataFrame({"user": [1], "item": [2]}).to_parquet(p)
    with pytest.raises(RecalignInputError, match=r"log\.parquet: missing column 'timestamp'"):
        load_dataset("parquet", path=p)


def test_lastfm_artist_lines_may_omit_trailing_urls(tmp_path):
    # The first data line is short, which makes pandas infer too few columns: the loader must recover.
    artists = (
        "id\tname\turl\tpictureURL\n51\tDuran Duran\n52\tMorcheeba\thttp://m\n"
        "53\tAir\tu\tp\n54\tHooverphonic\tu\t\n55\tBjörk\tu\tp\n"
    )
    ds = load_dataset("lastfm", path=write_lastfm(tmp_path, artists=artists))
    assert ds.n_items == 5
    assert item_row(ds, "51")["title"] == "Duran Duran" and item_row(ds, "51")["url"] == ""
    assert item_row(ds, "52")["url"] == "http://m"


def test_lastfm_artist_line_with_extra_field_is_an_error(tmp_path):
    artists = "id\tname\turl\tpictureURL\n51\tA\tu\tp\n52\tB\tu\tp\textra\n"
    with pytest.raises(
        RecalignInputError, match=r"artists\.dat:3: expected 2 to 4 tab-separated fields, found 5"
    ):
        load_dataset("lastfm", path=write_lastfm(tmp_path, artists=artists))
