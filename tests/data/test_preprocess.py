"""Preprocessing on hand-built logs whose survivors are worked out by hand in the comments."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from recalign.config import describe_config, load_config
from recalign.data.dataset import RecDataset
from recalign.data.preprocess import (
    PreprocessConfig,
    drop_duplicates,
    k_core,
    preprocess,
    rating_threshold,
    truncate_history,
)
from recalign.errors import RecalignInputError


def make(rows: list[tuple], with_rating: bool = True) -> RecDataset:
    cols = ["user", "item", "timestamp", "rating"] if with_rating else ["user", "item", "timestamp"]
    return RecDataset.from_frames("toy", pd.DataFrame(rows, columns=cols))


def survivors(ds: RecDataset) -> set[tuple]:
    inter = ds.interactions
    users = ds.user_ids[inter["user_idx"].to_numpy()]
    items = ds.items["item_id"].to_numpy()[inter["item_idx"].to_numpy()]
    rating = inter["rating"].to_numpy()
    return {
        (str(u), str(i), int(t), None if np.isnan(r) else float(r))
        for u, i, t, r in zip(users, items, inter["timestamp"], rating)
    }


def test_drop_duplicates_keeps_earliest_and_first_on_ties():
    ds = make(
        [
            ("u1", "a", 10, 1.0),  # later duplicate of (u1, a): removed
            ("u1", "b", 20, 2.0),
            ("u1", "a", 5, 3.0),  # earliest (u1, a): kept
            ("u2", "a", 7, 4.0),  # tie in time: first in file order kept
            ("u2", "a", 7, 5.0),  # removed
            ("u2", "c", 8, 6.0),
        ]
    )
    out, rep = drop_duplicates(ds)
    assert survivors(out) == {
        ("u1", "b", 20, 2.0),
        ("u1", "a", 5, 3.0),
        ("u2", "a", 7, 4.0),
        ("u2", "c", 8, 6.0),
    }
    assert (rep.rows_removed, rep.users_removed, rep.items_removed) == (2, 0, 0)
    assert (rep.rows_left, rep.users_left, rep.items_left) == (4, 2, 3)
    assert out.notes[-1] == rep.summary() and "removed 2 rows" in rep.summary()
    assert ds.n_interactions == 6  # the input is not modified


# u1: a b c | u2: a b | u3: a d | u4: e       (8 rows)
# item counts a3 b2 c1 d1 e1; user counts u1 3, u2 2, u3 2, u4 1
# 2-core round 1: drop u4 and items c, d, e  -> u1: a b | u2: a b | u3: a
# round 2: u3 now has 1 interaction -> dropped -> u1: a b | u2: a b ; round 3: stable.
KCORE_LOG = [
    ("u1", "a", 1, 1.0),
    ("u1", "b", 2, 1.0),
    ("u1", "c", 3, 1.0),
    ("u2", "a", 4, 1.0),
    ("u2", "b", 5, 1.0),
    ("u3", "a", 6, 1.0),
    ("u3", "d", 7, 1.0),
    ("u4", "e", 8, 1.0),
]


def test_k_core_iterates_to_a_fixed_point():
    out, rep = k_core(make(KCORE_LOG), 2, 2)
    assert {(u, i) for u, i, _, _ in survivors(out)} == {("u1", "a"), ("u1", "b"), ("u2", "a"), ("u2", "b")}
    assert (rep.rows_removed, rep.users_removed, rep.items_removed) == (4, 2, 3)
    assert (out.n_users, out.n_items) == (2, 2)
    # Indices are contiguous again after filtering.
    assert sorted(out.interactions["user_idx"].unique()) == [0, 1]
    assert sorted(out.interactions["item_idx"].unique()) == [0, 1]
    # The result really is a 2-core.
    assert out.interactions.groupby("user_idx").size().min() >= 2
    assert out.interactions.groupby("item_idx").size().min() >= 2


def test_k_core_per_side_and_off():
    out, rep = k_core(make(KCORE_LOG), 3, 0)  # only u1 has 3 interactions; items unconstrained
    assert {(u, i) for u, i, _, _ in survivors(out)} == {("u1", "a"), ("u1", "b"), ("u1", "c")}
    assert rep.users_removed == 3
    same, rep0 = k_core(make(KCORE_LOG), 0, 0)
    assert same.n_interactions == 8 and rep0.rows_removed == 0


def test_k_core_that_removes_everything_is_an_error():
    with pytest.raises(RecalignInputError, match="would remove every interaction"):
        k_core(make(KCORE_LOG), 10, 10)


def test_rating_threshold():
    ds = make([("u1", "a", 1, 5.0), ("u1", "b", 2, 3.0), ("u2", "a", 3, 4.0), ("u2", "c", 4, 1.0)])
    out, rep = rating_threshold(ds, 4)
    assert survivors(out) == {("u1", "a", 1, 5.0), ("u2", "a", 3, 4.0)}  # 4.0 passes (>=)
    assert (rep.rows_removed, rep.users_removed, rep.items_removed) == (2, 0, 2)


def test_rating_threshold_needs_ratings():
    ds = make([("u1", "a", 1), ("u1", "b", 2)], with_rating=False)
    with pytest.raises(RecalignInputError, match="has no ratings"):
        rating_threshold(ds, 4)


def test_truncate_history():
    h = list(range(1, 13))
    assert truncate_history(h) == list(range(3, 13))  # default: the 10 most recent
    assert truncate_history(h, 3) == [10, 11, 12]
    assert truncate_history([1, 2], 10) == [1, 2]
    assert truncate_history(h, 0) == []
    arr = np.arange(5)
    assert truncate_history(arr, 2).tolist() == [3, 4]
    with pytest.raises(RecalignInputError):
        truncate_history(h, -1)


def test_preprocess_order_threshold_then_dedup_then_kcore():
    # (u1, a) rated 2 then 5: thresholding first keeps the 5-star event; deduplicating first would keep
    # the 2-star one and then lose the pair entirely.
    ds = make(
        [
            ("u1", "a", 1, 2.0),
            ("u1", "a", 2, 5.0),
            ("u1", "b", 3, 5.0),
            ("u2", "a", 4, 4.0),
            ("u2", "b", 5, 4.0),
            ("u3", "c", 6, 5.0),  # u3 and c fall to the 2-core
        ]
    )
    cfg = PreprocessConfig(kcore=2, min_rating=4)
    out, reports = preprocess(ds, cfg)
    assert [r.step for r in reports] == ["rating_threshold", "drop_duplicates", "k_core"]
    assert survivors(out) == {
        ("u1", "a", 2, 5.0),
        ("u1", "b", 3, 5.0),
        ("u2", "a", 4, 4.0),
        ("u2", "b", 5, 4.0),
    }
    assert [r.rows_removed for r in reports] == [1, 0, 1]
    assert len(out.notes) == 3


def test_preprocess_defaults_only_dedup():
    out, reports = preprocess(make(KCORE_LOG))
    assert [r.step for r in reports] == ["drop_duplicates"]
    assert out.n_interactions == 8


def test_preprocess_config_typed_and_documented(tmp_path):
    assert (
        PreprocessConfig().dedup is True
        and PreprocessConfig().kcore == 0
        and PreprocessConfig().min_rating is None
    )
    assert all(line.split(": ", 1)[1] for line in describe_config(PreprocessConfig))  # every field has help
    cfg = load_config(PreprocessConfig, None, ["kcore=5", "item_core=2", "min_rating=3.5"])
    assert (cfg.user_k, cfg.item_k, cfg.min_rating) == (5, 2, 3.5)
    with pytest.raises(RecalignInputError, match="kcore"):
        load_config(PreprocessConfig, None, ["kcore=-1"])
    with pytest.raises(RecalignInputError, match="unknown key 'k_core'"):
        load_config(PreprocessConfig, None, ["k_core=5"])
