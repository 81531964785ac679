"""Writers for tiny datasets in the real on-disk formats (the tests make their own files; no downloads).

Each writer returns the path to hand to the loader. Contents are small enough to reason about by hand.
"""

from __future__ import annotations

import gzip
import json
import zipfile
from pathlib import Path

# ---------------------------------------------------------------------- MovieLens-100K
# u.data: user \t item \t rating \t timestamp
ML100K_RATINGS = [
    (1, 1, 5, 881250949),
    (1, 2, 3, 881250950),
    (1, 3, 4, 881250951),
    (2, 1, 4, 881250960),
    (2, 4, 2, 881250961),
    (2, 5, 5, 881250962),
    (3, 2, 1, 881250970),
    (3, 3, 5, 881250971),
]
# u.item: id|title|release|video release|url|19 flags ; genre index 3 = Animation, 5 = Comedy
ML100K_ITEMS = [
    (1, "Toy Story (1995)", [3, 4, 5]),
    (2, "GoldenEye (1995)", [1, 2, 16]),
    (3, "Café au lait (1994)", [5]),  # non-ASCII: the real file is Latin-1
    (4, "Get Shorty (1995)", [1, 5, 8]),
    (5, "Shanghai Triad (Yao a yao yao dao waipo qiao) (1995)", [8]),
    (6, "Unrated Movie (1996)", [0]),  # in the catalogue, never rated
]


def ml100k_udata(rows=ML100K_RATINGS) -> bytes:
    return "".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in rows).encode("latin-1")


def ml100k_uitem(items=ML100K_ITEMS) -> bytes:
    lines = []
    for iid, title, genres in items:
        flags = ["1" if g in genres else "0" for g in range(19)]
        lines.append("|".join([str(iid), title, "01-Jan-1995", "", "http://us.imdb.com/M/x", *flags]))
    return ("\n".join(lines) + "\n").encode("latin-1")


def write_ml100k_dir(root: Path, udata: bytes | None = None, uitem: bytes | None = None) -> Path:
    d = root / "ml-100k"
    d.mkdir(parents=True, exist_ok=True)
    (d / "u.data").write_bytes(ml100k_udata() if udata is None else udata)
    (d / "u.item").write_bytes(ml100k_uitem() if uitem is None else uitem)
    return d


def write_ml100k_zip(root: Path) -> Path:
    z = root / "ml-100k.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("ml-100k/u.data", ml100k_udata())
        zf.writestr("ml-100k/u.item", ml100k_uitem())
        zf.writestr("ml-100k/README", "GroupLens sample\n")
    return z


# ---------------------------------------------------------------------- MovieLens-1M
ML1M_RATINGS = [
    (1, 1193, 5, 978300760),
    (1, 661, 3, 978302109),
    (2, 1193, 4, 978298413),
    (2, 3408, 4, 978299000),
]
ML1M_MOVIES = [
    (1193, "One Flew Over the Cuckoo's Nest (1975)", "Drama"),
    (661, "James and the Giant Peach (1996)", "Animation|Children's|Musical"),
    (3408, "Erin Brockovich (2000)", "Drama"),
    (1, "Toy Story (1995)", "Animation|Children's|Comedy"),
]


def write_ml1m_dir(root: Path, ratings: bytes | None = None, movies: bytes | None = None) -> Path:
    d = root / "ml-1m"
    d.mkdir(parents=True, exist_ok=True)
    if ratings is None:
        ratings = "".join(f"{u}::{i}::{r}::{t}\n" for u, i, r, t in ML1M_RATINGS).encode("latin-1")
    if movies is None:
        movies = "".join(f"{i}::{t}::{g}\n" for i, t, g in ML1M_MOVIES).encode("latin-1")
    (d / "ratings.dat").write_bytes(ratings)
    (d / "movies.dat").write_bytes(movies)
    return d


# ---------------------------------------------------------------------- Amazon 2014
AMZ14_RATINGS = [
    ("A1", "B001", 5.0, 1356998400),
    ("A1", "B002", 4.0, 1357084800),
    ("A2", "B001", 3.0, 1357171200),
    ("A2", "B003", 5.0, 1357257600),  # B003 has no metadata
]
AMZ14_META = [
    {
        "asin": "B001",
        "title": "Lip Balm",
        "categories": [["Beauty", "Skin Care"], ["Beauty", "Lips"]],
        "brand": "Acme",
    },
    {"asin": "B002", "title": "Shampoo 'Fresh'", "description": "Cleans hair.", "categories": [["Beauty"]]},
    {"asin": "B999", "title": "Never Rated", "categories": [["Beauty"]]},
]


def write_amazon2014(root: Path, meta_lines: list[str] | None = None, ratings: bytes | None = None) -> Path:
    d = root / "amazon2014"
    d.mkdir(parents=True, exist_ok=True)
    if ratings is None:
        ratings = "".join(f"{u},{i},{r},{t}\n" for u, i, r, t in AMZ14_RATINGS).encode()
    (d / "ratings_Beauty.csv").write_bytes(ratings)
    lines = (
        meta_lines if meta_lines is not None else [repr(m) for m in AMZ14_META]
    )  # Python literals, as released
    with gzip.open(d / "meta_Beauty.json.gz", "wt", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return d


# ---------------------------------------------------------------------- Amazon 2023
AMZ23_RATINGS = [
    ("U1", "P1", 5.0, 1588615855123),
    ("U1", "P2", 4.0, 1588615856999),
    ("U2", "P1", 2.0, 1600000000000),
    ("U2", "P3", 5.0, 1600000001000),
]
AMZ23_META = [
    {
        "parent_asin": "P1",
        "title": "Kindle Cover",
        "description": ["Fits all.", "Leather."],
        "categories": ["Electronics", "Cases"],
        "main_category": "All Electronics",
        "store": "Acme",
    },  # fmt: skip
    {"parent_asin": "P2", "title": "USB Cable", "description": [], "categories": []},
    {"parent_asin": "P3", "title": "Charger", "description": ["Fast."], "categories": ["Electronics"]},
    {"parent_asin": "P9", "title": "Unrated Gadget"},
]
AMZ23_REVIEWS = [
    {"user_id": "U1", "parent_asin": "P1", "rating": 5.0, "title": "Great", "text": "Fits my Kindle."},
    {"user_id": "U2", "parent_asin": "P3", "rating": 5.0, "title": "Fast", "text": "Charges quickly."},
    {"user_id": "U9", "parent_asin": "P1", "rating": 1.0, "title": "", "text": "Not in ratings."},
]


def write_amazon2023(
    root: Path, ratings: bytes | None = None, meta: bytes | None = None, gz: bool = True, reviews: bool = True
) -> Path:
    d = root / "amazon2023"
    d.mkdir(parents=True, exist_ok=True)
    if ratings is None:
        ratings = (
            "user_id,parent_asin,rating,timestamp\n"
            + "".join(f"{u},{i},{r},{t}\n" for u, i, r, t in AMZ23_RATINGS)
        ).encode()
    (d / "Electronics.csv").write_bytes(ratings)
    if meta is None:
        meta = ("\n".join(json.dumps(m) for m in AMZ23_META) + "\n").encode()
    if gz:
        (d / "meta_Electronics.jsonl.gz").write_bytes(gzip.compress(meta))
    else:
        (d / "meta_Electronics.jsonl").write_bytes(meta)
    if reviews:
        (d / "Electronics.jsonl").write_text("\n".join(json.dumps(r) for r in AMZ23_REVIEWS) + "\n")
    return d


# ---------------------------------------------------------------------- LastFM hetrec-2k
def write_lastfm(
    root: Path, user_artists: str | None = None, tags: str | None = None, artists: str | None = None
) -> Path:
    d = root / "hetrec2011-lastfm-2k"
    d.mkdir(parents=True, exist_ok=True)
    if user_artists is None:
        user_artists = (
            "userID\tartistID\tweight\n"
            "2\t51\t13883\n"  # tagged at 2000 s and 1000 s -> first tag 1000 s
            "2\t52\t11690\n"  # untagged, heavier
            "2\t53\t500\n"  # untagged, lighter
            "2\t54\t700\n"  # tagged at 3000 s
            "3\t51\t100\n"  # user 3 never tagged anything
            "3\t55\t200\n"
        )
    if tags is None:
        tags = (
            "userID\tartistID\ttagID\ttimestamp\n"
            "2\t51\t13\t2000000\n"
            "2\t51\t15\t1000000\n"
            "2\t54\t13\t3000000\n"
            "2\t99\t13\t500000\n"  # tagged artist the user never listened to: ignored, counted
        )
    if artists is None:
        artists = (
            "id\tname\turl\tpictureURL\n"
            "51\tDuran Duran\thttp://www.last.fm/music/Duran+Duran\thttp://x/1.jpg\n"
            "52\tMorcheeba\thttp://www.last.fm/music/Morcheeba\thttp://x/2.jpg\n"
            "53\tAir\thttp://www.last.fm/music/Air\thttp://x/3.jpg\n"
            "54\tHooverphonic\thttp://www.last.fm/music/Hooverphonic\t\n"
            "55\tBjörk\thttp://www.last.fm/music/Bj%C3%B6rk\thttp://x/5.jpg\n"
            "99\tTagged Only\thttp://www.last.fm/music/T\thttp://x/9.jpg\n"
        )
    (d / "user_artists.dat").write_text(user_artists, encoding="utf-8")
    (d / "user_taggedartists-timestamps.dat").write_text(tags, encoding="utf-8")
    (d / "artists.dat").write_text(artists, encoding="utf-8")
    return d


# ---------------------------------------------------------------------- RecBole atomic files
def write_recbole(root: Path, inter: str | None = None, item: str | None = None, name: str = "toy") -> Path:
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    if inter is None:
        inter = (
            "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
            "196\t242\t3\t881250949\n"
            "196\t302\t4.5\t881250950\n"
            "186\t242\t1\t891717742\n"
        )
    if item is None:
        item = (
            "item_id:token\tmovie_title:token_seq\trelease_year:token\tgenre:token_seq\n"
            "242\tKolya\t1996\tComedy\n"
            "302\tL.A. Confidential\t1997\tCrime Film-Noir Mystery Thriller\n"
        )
    (d / f"{name}.inter").write_text(inter, encoding="utf-8")
    if item:
        (d / f"{name}.item").write_text(item, encoding="utf-8")
    return d


# ---------------------------------------------------------------------- generic CSV
def write_csv(root: Path, text: str, name: str = "log.csv") -> Path:
    p = root / name
    p.write_text(text, encoding="utf-8")
    return p
