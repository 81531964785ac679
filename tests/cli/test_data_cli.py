"""``recalign data``: stats (the issue's acceptance check), prepare, convert, and bad input.

Bad input must give exit code 2 and exactly one stderr line naming the file and the problem (never a
traceback, never a silent drop). Each malformed case below writes its own small file in the real
on-disk format and breaks it in one specific way.
"""

from __future__ import annotations

import gzip
import json
import zipfile
from pathlib import Path

import pandas as pd
import pytest
import yaml

from recalign.cli.main import main
from recalign.data.splits import Split

# ---------------------------------------------------------------------- tiny well-formed files
UDATA = "1\t1\t5\t881250949\n1\t2\t3\t881250950\n2\t1\t4\t881250960\n2\t3\t2\t881250961\n"


def uitem(rows: list[tuple[int, str]] | None = None, flags: str = "|0" * 19) -> str:
    rows = rows or [(1, "Toy Story (1995)"), (2, "GoldenEye (1995)"), (3, "Four Rooms (1995)")]
    return "".join(f"{i}|{t}|01-Jan-1995||http://us.imdb.com/M/x{flags}\n" for i, t in rows)


def ml100k(tmp: Path, udata: str | bytes = UDATA, items: str | bytes | None = None) -> Path:
    d = tmp / "ml-100k"
    d.mkdir(exist_ok=True)
    (d / "u.data").write_bytes(udata.encode("latin-1") if isinstance(udata, str) else udata)
    items = uitem() if items is None else items
    (d / "u.item").write_bytes(items.encode("latin-1") if isinstance(items, str) else items)
    return d


def ml1m(
    tmp: Path, ratings: str, movies: str = "1::Toy Story (1995)::Animation\n2::Heat (1995)::Action\n"
) -> Path:
    d = tmp / "ml-1m"
    d.mkdir(exist_ok=True)
    (d / "ratings.dat").write_text(ratings, encoding="latin-1")
    (d / "movies.dat").write_text(movies, encoding="latin-1")
    return d


AMZ23_HEADER = "user_id,parent_asin,rating,timestamp\n"
AMZ23_ROWS = "U1,P1,5.0,1588615855000\nU1,P2,4.0,1588615856000\nU2,P1,3.0,1600000000000\n"
AMZ23_META = '{"parent_asin": "P1", "title": "Cover"}\n{"parent_asin": "P2", "title": "Cable"}\n'


def amazon2023(
    tmp: Path, ratings: str | bytes = AMZ23_HEADER + AMZ23_ROWS, meta: bytes | None = None
) -> Path:
    d = tmp / "amz"
    d.mkdir(exist_ok=True)
    (d / "Books.csv").write_bytes(ratings.encode() if isinstance(ratings, str) else ratings)
    (d / "meta_Books.jsonl.gz").write_bytes(gzip.compress(AMZ23_META.encode()) if meta is None else meta)
    return d


def lastfm(tmp: Path, artists: bytes | None = None, skip: str | None = None) -> Path:
    d = tmp / "lastfm"
    d.mkdir(exist_ok=True)
    files = {
        "user_artists.dat": b"userID\tartistID\tweight\n2\t51\t100\n2\t52\t50\n",
        "user_taggedartists-timestamps.dat": b"userID\tartistID\ttagID\ttimestamp\n2\t51\t1\t1000000\n",
        "artists.dat": artists or "id\tname\turl\tpictureURL\n51\tA\tu\tp\n52\tBjörk\tu\tp\n".encode(),
    }
    for name, data in files.items():
        if name != skip:
            (d / name).write_bytes(data)
    return d


def recbole(tmp: Path, inter: str) -> Path:
    d = tmp / "toy"
    d.mkdir(exist_ok=True)
    (d / "toy.inter").write_text(inter, encoding="utf-8")
    return d


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------------- acceptance: embedded ML-100K
def test_stats_embedded_ml100k_json(capsys):
    code, out, err = run(capsys, "data", "stats", "--dataset", "ml-100k", "--json")
    assert code == 0, err
    stats = json.loads(out)
    assert (stats["users"], stats["items"], stats["interactions"]) == (943, 1682, 100000)
    assert stats["has_ratings"] is True


def test_stats_embedded_ml100k_text(capsys):
    code, out, _ = run(capsys, "data", "stats")
    assert code == 0
    lines = out.splitlines()
    assert "users: 943" in lines and "items: 1682" in lines and "interactions: 100000" in lines


# ---------------------------------------------------------------------- stats / prepare / convert
def synthetic_csv(tmp: Path) -> Path:
    """6 users x 8 of 24 items (every item taken by exactly 2 users), one duplicate event, and one user
    with a single interaction (so a 2-core removes exactly that user and nothing else)."""
    lines = ["user,item,timestamp,rating"]
    t = 0
    for u in range(6):
        for k in range(8):
            t += 1
            lines.append(f"u{u},i{(u * 4 + k) % 24},{t},{1 + (k % 5)}")
    lines.append("u0,i0,999,5")  # duplicate of (u0, i0): removed by dedup, keeping the earlier one
    lines.append("lonely,i23,1000,5")  # removed by a 2-core
    p = tmp / "log.csv"
    p.write_text("\n".join(lines) + "\n")
    return p


def test_prepare_writes_split_config_and_reports_filtering(tmp_path, capsys):
    log = synthetic_csv(tmp_path)
    out_dir = tmp_path / "prepared"
    code, out, err = run(
        capsys,
        "data", "prepare", "--dataset", "csv", "--path", str(log), "--opt", "rating_col=rating",
        "--split", "loo", "--seed", "3", "--candidates", "10", "--kcore", "2", "--output", str(out_dir),
    )  # fmt: skip
    assert code == 0, err
    # 6 users x 8 items: positions 1..7 are examples; per user 1 test, 1 valid, 5 train.
    assert "drop_duplicates (same user and item, earliest kept): removed 1 rows" in out
    assert "k_core" in out and "removed 1 rows, 1 users" in out
    assert "split loo (seed 3, 10 candidates): train 30, valid 6, test 6" in out
    split = Split.load(out_dir)
    assert (split.name, split.seed, split.n_candidates) == ("loo", 3, 10)
    assert len(split.stage("test")) == 6
    assert any("drop_duplicates" in n for n in split.notes)  # filtering recorded with the split
    cfg = yaml.safe_load((out_dir / "config.yaml").read_text())
    assert cfg["preprocess"]["kcore"] == 2 and cfg["options"] == {"rating_col": "rating"}
    items = pd.read_parquet(out_dir / "items.parquet")
    assert items["item_idx"].tolist() == list(range(split.n_items))
    users = pd.read_parquet(out_dir / "users.parquet")
    assert "lonely" not in set(users["user_id"])


def test_dataset_name_option_names_the_dataset_and_old_spelling_is_refused(tmp_path, capsys):
    """The loader option that names the dataset is ``dataset_name``. Its old spelling ``name`` collided
    with the format name inside ``load_dataset`` (a TypeError traceback); it is now a one-line error."""
    log = synthetic_csv(tmp_path)
    base = ["data", "stats", "--dataset", "csv", "--path", str(log), "--json"]
    code, out, err = run(capsys, *base, "--opt", "dataset_name=books")
    assert code == 0, err
    assert json.loads(out)["dataset"] == "books"
    code, out, err = run(capsys, *base, "--opt", "name=books")
    assert code == 2 and err.count("\n") == 1
    assert "'name' is now called 'dataset_name'" in err and "Traceback" not in err
    # the same through a YAML config of `data prepare` and through the Python API
    conf = tmp_path / "prep.yaml"
    conf.write_text(yaml.safe_dump({"dataset": "csv", "path": str(log), "options": {"name": "x"}}))
    code, _, err = run(capsys, "data", "prepare", "--config", str(conf), "--output", str(tmp_path / "p"))
    assert code == 2 and "dataset_name" in err
    from recalign.data.loaders import load_dataset
    from recalign.errors import RecalignInputError

    with pytest.raises(RecalignInputError, match="dataset_name"):
        load_dataset("csv", log, name="x")
    assert load_dataset("csv", log, dataset_name="x").name == "x"


def test_recbole_directory_with_several_files_is_chosen_by_dataset_name(tmp_path, capsys):
    d = ml100k(tmp_path)
    for n in ("a", "b"):
        code, _, err = run(capsys, "data", "convert", "--dataset", "ml-100k", "--path", str(d),
                           "--to", "recbole", "--output", str(tmp_path / "rb"), "--name", n)  # fmt: skip
        assert code == 0, err
    base = ["data", "stats", "--dataset", "recbole", "--path", str(tmp_path / "rb"), "--json"]
    code, _, err = run(capsys, *base)
    assert code == 2 and "pass dataset_name=" in err  # the error names the option that fixes it
    code, out, err = run(capsys, *base, "--opt", "dataset_name=b")
    assert code == 0, err
    assert json.loads(out)["dataset"] == "b"


def test_prepare_from_yaml_with_dotted_overrides(tmp_path, capsys):
    log = synthetic_csv(tmp_path)
    conf = tmp_path / "prep.yaml"
    conf.write_text(
        yaml.safe_dump(
            {"dataset": "csv", "path": str(log), "split": "llara", "seed": 5, "candidates": 8,
             "preprocess": {"kcore": 2}, "output": str(tmp_path / "a")}
        )
    )  # fmt: skip
    code, out, err = run(capsys, "data", "prepare", "--config", str(conf), "seed=7", "preprocess.dedup=false")
    assert code == 0, err
    split = Split.load(tmp_path / "a")
    assert (split.name, split.seed, split.n_candidates) == ("llara", 7, 8)  # override beats the file
    saved = yaml.safe_load((tmp_path / "a" / "config.yaml").read_text())
    assert saved["preprocess"] == {
        "dedup": False,
        "kcore": 2,
        "user_core": None,
        "item_core": None,
        "min_rating": None,
        "item_genres_include": [],
        "item_genres_exclude": [],
    }
    assert "drop_duplicates" not in out


def test_prepare_help_config_lists_documented_fields(capsys):
    code, out, _ = run(capsys, "data", "prepare", "--help-config")
    assert code == 0
    assert "preprocess.kcore (int, default 0): k-core" in out
    assert "split (" in out


def test_convert_to_recbole_and_read_back(tmp_path, capsys):
    d = ml100k(tmp_path)
    code, out, err = run(capsys, "data", "convert", "--dataset", "ml-100k", "--path", str(d), "--to", "recbole",
                         "--output", str(tmp_path / "rb"), "--name", "ml100k")  # fmt: skip
    assert code == 0, err
    assert (tmp_path / "rb" / "ml100k.inter").is_file() and (tmp_path / "rb" / "ml100k.item").is_file()
    code, out, err = run(
        capsys, "data", "stats", "--dataset", "recbole", "--path", str(tmp_path / "rb"), "--json"
    )
    assert code == 0, err
    stats = json.loads(out)
    assert (stats["users"], stats["items"], stats["interactions"]) == (2, 3, 4)


def test_stats_on_raw_ml100k_reports_notes(tmp_path, capsys):
    d = ml100k(
        tmp_path, items=uitem([(1, "A (1995)"), (2, "B (1995)"), (3, "C (1995)"), (4, "Unrated (1995)")])
    )
    code, out, _ = run(capsys, "data", "stats", "--dataset", "ml-100k", "--path", str(d))
    assert code == 0
    assert "note: 1 catalogue items never interacted with; left out of the index" in out


# ---------------------------------------------------------------------- bad input: exit 2, one line
def _gz_truncated(text: str) -> bytes:
    data = gzip.compress(text.encode() * 50)
    return data[: len(data) // 2]


def case_missing_column(tmp):
    d = amazon2023(tmp, ratings="user_id,asin,rating,timestamp\nU1,P1,5,1\n")
    return ["--dataset", "amazon-2023", "--path", str(d)], "Books.csv:1: missing column 'parent_asin'"


def case_wrong_separator(tmp):
    d = ml100k(tmp, udata=UDATA.replace("\t", ","))
    return ["--dataset", "ml-100k", "--path", str(d)], "u.data:1: expected 4 tab-separated fields, found 1"


def case_non_numeric_timestamp(tmp):
    d = ml1m(tmp, "1::1::5::978300760\n1::2::3::978300761\n2::1::4::yesterday\n")
    return [
        "--dataset",
        "ml-1m",
        "--path",
        str(d),
    ], "ratings.dat:3, field 'timestamp': non-numeric timestamp 'yesterday'"


def case_truncated_gzip(tmp):
    d = amazon2023(tmp, meta=_gz_truncated(AMZ23_META))
    return ["--dataset", "amazon-2023", "--path", str(d)], "meta_Books.jsonl.gz: truncated gzip file"


def case_truncated_gzip_ratings(tmp):
    p = tmp / "log.csv.gz"
    p.write_bytes(_gz_truncated("user,item,timestamp\na,b,1\n"))
    return ["--dataset", "csv", "--path", str(p)], "log.csv.gz: truncated gzip file"


def case_bad_encoding(tmp):
    artists = "id\tname\turl\tpictureURL\n51\tA\tu\tp\n52\tBjörk\tu\tp\n".encode("latin-1")  # not UTF-8
    d = lastfm(tmp, artists=artists)
    return ["--dataset", "lastfm", "--path", str(d)], "artists.dat:3: not valid utf-8 text: byte 0xf6"


def case_empty_file(tmp):
    d = ml100k(tmp, items="")
    return ["--dataset", "ml-100k", "--path", str(d)], "u.item: empty file"


def case_unknown_item_ids(tmp):
    d = ml100k(tmp, udata=UDATA + "2\t99\t4\t881250999\n")
    return ["--dataset", "ml-100k", "--path", str(d)], "u.data:5: item id '99' is not in u.item"


def case_repeated_header(tmp):
    d = amazon2023(tmp, ratings=AMZ23_HEADER + AMZ23_ROWS + AMZ23_HEADER + "U3,P2,1.0,1600000001000\n")
    return ["--dataset", "amazon-2023", "--path", str(d)], "Books.csv:5: the header line is repeated"


def case_bad_json_metadata(tmp):
    meta = (AMZ23_META + '{"parent_asin": "P3", "title": "Broken\n').encode()
    d = amazon2023(tmp, meta=gzip.compress(meta))
    return ["--dataset", "amazon-2023", "--path", str(d)], "meta_Books.jsonl.gz:3: invalid JSON"


def case_bad_literal_metadata(tmp):
    d = tmp / "amz14"
    d.mkdir()
    (d / "ratings_Beauty.csv").write_text("A1,B1,5.0,1356998400\n")
    meta = "{'asin': 'B1', 'title': 'Balm'}\n{'asin': 'B2', 'title': 'Oops',\n"
    (d / "meta_Beauty.json.gz").write_bytes(gzip.compress(meta.encode()))
    return [
        "--dataset",
        "amazon-2014",
        "--path",
        str(d),
    ], "meta_Beauty.json.gz:2: not a JSON object or Python literal"


def case_missing_file_in_directory(tmp):
    d = lastfm(tmp, skip="artists.dat")
    return ["--dataset", "lastfm", "--path", str(d)], "missing file 'artists.dat'"


def case_bad_recbole_type(tmp):
    d = recbole(tmp, "user_id:token\titem_id:token\trating:floot\ttimestamp:float\n1\t2\t3\t4\n")
    return [
        "--dataset",
        "recbole",
        "--path",
        str(d),
    ], "toy.inter:1: header column 3 'rating:floot' has unknown type 'floot'"


def case_ragged_rows(tmp):
    d = recbole(tmp, "user_id:token\titem_id:token\ttimestamp:float\n1\t2\t3\n1\t3\n2\t2\t5\n")
    return ["--dataset", "recbole", "--path", str(d)], "toy.inter:3: expected 3 tab-separated fields, found 2"


def case_too_many_fields(tmp):
    d = ml1m(tmp, "1::1::5::978300760\n1::2::3::978300761::extra\n")
    return [
        "--dataset",
        "ml-1m",
        "--path",
        str(d),
    ], "ratings.dat:2: expected 4 '::'-separated fields, found 5"


def case_empty_user_id(tmp):
    p = tmp / "log.csv"
    p.write_text("user,item,timestamp\na,x,1\n,y,2\n")
    return ["--dataset", "csv", "--path", str(p)], "log.csv:3: empty value in column 'user'"


def case_bad_genre_flag(tmp):
    d = ml100k(tmp, items=uitem(flags="|0" * 18 + "|x"))
    return [
        "--dataset",
        "ml-100k",
        "--path",
        str(d),
    ], "u.item:1, field 'Western': non-numeric genre flag (Western) 'x'"


def case_duplicate_catalogue_id(tmp):
    d = ml1m(
        tmp, "1::1::5::978300760\n", movies="1::A (1990)::Drama\n2::B (1991)::Drama\n1::C (1992)::Drama\n"
    )
    return ["--dataset", "ml-1m", "--path", str(d)], "movies.dat:3: item id '1' appears twice"


def case_malformed_quote(tmp):
    p = tmp / "log.csv"
    p.write_text('user,item,timestamp\na,"x,1\nb,y,2\n')
    return ["--dataset", "csv", "--path", str(p)], "log.csv:3: malformed quoted field"


def case_header_only(tmp):
    p = tmp / "log.csv"
    p.write_text("user,item,timestamp\n")
    return ["--dataset", "csv", "--path", str(p)], "log.csv: no data rows"


def case_unknown_loader_option(tmp):
    p = tmp / "log.csv"
    p.write_text("user,item,timestamp\na,x,1\n")
    return [
        "--dataset",
        "csv",
        "--path",
        str(p),
        "--opt",
        "user_column=u",
    ], "unknown option 'user_column' for dataset 'csv'"


def case_missing_path(tmp):
    return ["--dataset", "ml-1m", "--path", str(tmp / "nope")], "nope: no such file or directory"


def case_corrupt_zip(tmp):
    z = tmp / "ml-100k.zip"
    buf = tmp / "full.zip"
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("ml-100k/u.data", UDATA * 20)
        zf.writestr("ml-100k/u.item", uitem())
    z.write_bytes(buf.read_bytes()[:-30])  # central directory cut off
    return ["--dataset", "ml-100k", "--path", str(z)], "ml-100k.zip: "


def case_unknown_dataset(tmp):
    return ["--dataset", "movielens-99"], "unknown dataset 'movielens-99'"


BAD_INPUT = [
    case_missing_column,
    case_wrong_separator,
    case_non_numeric_timestamp,
    case_truncated_gzip,
    case_truncated_gzip_ratings,
    case_bad_encoding,
    case_empty_file,
    case_unknown_item_ids,
    case_repeated_header,
    case_bad_json_metadata,
    case_bad_literal_metadata,
    case_missing_file_in_directory,
    case_bad_recbole_type,
    case_ragged_rows,
    case_too_many_fields,
    case_empty_user_id,
    case_bad_genre_flag,
    case_duplicate_catalogue_id,
    case_malformed_quote,
    case_header_only,
    case_unknown_loader_option,
    case_missing_path,
    case_corrupt_zip,
    case_unknown_dataset,
]


@pytest.mark.parametrize("case", BAD_INPUT, ids=[c.__name__.removeprefix("case_") for c in BAD_INPUT])
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, case):
    args, expected = case(tmp_path)
    code, out, err = run(capsys, "data", "stats", *args)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    assert expected in lines[0], lines[0]
    assert "Traceback" not in err
    assert out == ""


def test_bad_input_in_a_subprocess_has_no_traceback(tmp_path):
    """The installed entry point behaves the same (exit status and stderr of a real process)."""
    import subprocess
    import sys

    d = ml100k(tmp_path, udata=UDATA.replace("\t", ","))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "recalign.cli.main",
            "data",
            "stats",
            "--dataset",
            "ml-100k",
            "--path",
            str(d),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "expected 4 tab-separated fields, found 1" in proc.stderr


def test_prepare_without_output_is_an_input_error(capsys):
    code, _, err = run(capsys, "data", "prepare", "--dataset", "ml-100k")
    assert code == 2 and "output directory is required" in err


def test_prepare_bad_config_key(tmp_path, capsys):
    code, _, err = run(capsys, "data", "prepare", "--output", str(tmp_path), "preprocess.kcor=3")
    assert code == 2 and "unknown key 'preprocess.kcor'" in err
