"""Splits and candidate sets (recalign.data.splits) on a hand-written log.

Log (items are 0..39, catalogue in that order, so item id == item index; users indexed by first
appearance: u0=0 ... u4=4):

- u0: items 0, 1, 2, 3 at t = 1, 2, 3, 4          -> loo: train pos 1, valid pos 2 (item 2), test pos 3 (item 3)
- u1: items 4, 5, 6 at t = 10, 11, 12             -> loo: valid pos 1 (item 5), test pos 2 (item 6), no train
- u2: items 0..19 at t = 100..119 (fills the catalogue, 20 unseen items left)
- u3: items 20..39 at t = 200..219
- u4: items 7, 8 at t = 30, 31                    -> fewer than 3: training only, noted
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from recalign.data.dataset import RecDataset
from recalign.data.splits import STAGES, Split, build_split, sample_candidates
from recalign.errors import RecalignInputError

N_ITEMS = 40


def log_rows(extra_user: bool = False) -> list[tuple]:
    rows = [("u0", i, 1 + k) for k, i in enumerate([0, 1, 2, 3])]
    rows += [("u1", i, 10 + k) for k, i in enumerate([4, 5, 6])]
    rows += [("u2", i, 100 + i) for i in range(20)]
    rows += [("u3", i, 200 + i - 20) for i in range(20, 40)]
    rows += [("u4", 7, 30), ("u4", 8, 31)]
    if extra_user:
        rows += [("u5", i, 300 + i) for i in (3, 9, 27)]
    return rows


def make(extra_user: bool = False) -> RecDataset:
    inter = pd.DataFrame(log_rows(extra_user), columns=["user", "item", "timestamp"])
    items = pd.DataFrame(
        {"item": [str(i) for i in range(N_ITEMS)], "title": [f"Item {i}" for i in range(N_ITEMS)]}
    )
    return RecDataset.from_frames("toy", inter, items)


def seen_by_user(ds: RecDataset) -> list[set[int]]:
    return [set(map(int, s)) for s in ds.sequences()]


def row(split: Split, user: int, position: int) -> pd.Series:
    ex = split.examples
    return ex[(ex["user"] == user) & (ex["position"] == position)].iloc[0]


def test_fixture_indices_are_as_documented():
    ds = make()
    assert ds.n_items == N_ITEMS and ds.n_users == 5
    assert list(ds.items["item_id"][:3]) == ["0", "1", "2"]
    assert ds.sequences()[0].tolist() == [0, 1, 2, 3]


def test_loo_last_is_test_second_last_is_valid():
    split = build_split(make(), "loo")
    test, valid, train = split.stage("test"), split.stage("valid"), split.stage("train")
    assert dict(zip(test["user"], test["target"])) == {0: 3, 1: 6, 2: 19, 3: 39}
    assert dict(zip(valid["user"], valid["target"])) == {0: 2, 1: 5, 2: 18, 3: 38}
    r = row(split, 0, 3)
    assert r["stage"] == "test" and r["history"].tolist() == [0, 1, 2]
    assert row(split, 0, 1)["stage"] == "train" and row(split, 0, 1)["history"].tolist() == [0]
    # u1 has 3 items: valid and test only; u4 has 2: one training example, no valid/test.
    assert 1 not in set(train["user"])
    assert train[train["user"] == 4]["target"].tolist() == [8]
    assert 4 not in set(test["user"]) and 4 not in set(valid["user"])
    assert any("1 users with fewer than 3" in n for n in split.notes)
    # Every position >= 1 of every user is an example exactly once.
    assert len(split.examples) == 3 + 2 + 19 + 19 + 1


def test_loo_train_sequences_exclude_valid_and_test_targets():
    ds = make()
    seqs = build_split(ds, "loo").train_sequences(ds)
    assert seqs[0].tolist() == [0, 1]
    assert seqs[1].tolist() == []  # only valid/test examples
    assert seqs[4].tolist() == [7, 8]


def test_llara_chronological_8_1_1():
    split = build_split(make(), "llara")
    n = 3 + 2 + 19 + 19 + 1  # 44 next-item examples
    counts = {s: len(split.stage(s)) for s in STAGES}
    assert counts == {
        "train": round(n * 0.8),
        "valid": round(n * 0.1),
        "test": n - round(n * 0.8) - round(n * 0.1),
    }
    tr, va, te = (split.stage(s)["timestamp"] for s in STAGES)
    assert tr.max() < va.min() and va.max() < te.min()  # strictly chronological cut (distinct times)
    # The latest examples are u3's last items (t = 215..219), so the test stage is all u3.
    assert set(split.stage("test")["user"]) == {3}
    assert sorted(split.stage("test")["target"]) == [35, 36, 37, 38, 39]
    # Histories are the full chronological prefix.
    r = row(split, 2, 5)
    assert r["history"].tolist() == [0, 1, 2, 3, 4] and r["target"] == 5


@pytest.mark.parametrize("name", ["loo", "llara"])
def test_candidates_contain_target_once_and_only_unseen_items(name):
    ds = make()
    split = build_split(ds, name, seed=0, n_candidates=20)
    seen = seen_by_user(ds)
    assert len(split.examples) > 0
    for u, t, cands in zip(split.examples["user"], split.examples["target"], split.examples["candidates"]):
        c = cands.tolist()
        assert len(c) == 20 and len(set(c)) == 20
        assert c.count(t) == 1
        others = set(c) - {t}
        assert not (others & seen[u]), f"user {u} has seen {others & seen[u]}"
        assert all(0 <= x < N_ITEMS for x in c)
    assert split.candidate_matrix("test").shape == (len(split.stage("test")), 20)


def test_target_position_varies():
    split = build_split(make(), "loo")
    slots = {
        int(np.flatnonzero(c == t)[0]) for t, c in zip(split.examples["target"], split.examples["candidates"])
    }
    assert len(slots) > 1  # the answer is not always in the same place in the list


def test_candidates_deterministic_and_independent_of_other_users():
    a1 = build_split(make(), "loo", seed=0)
    a2 = build_split(make(), "loo", seed=0)
    b = build_split(make(extra_user=True), "loo", seed=0)  # one more user; u0..u4 keep their indices
    for u, p in [(0, 3), (0, 2), (1, 2), (2, 10), (4, 1)]:
        assert row(a1, u, p)["candidates"].tolist() == row(a2, u, p)["candidates"].tolist()
        assert row(a1, u, p)["candidates"].tolist() == row(b, u, p)["candidates"].tolist()
    other_seed = build_split(make(), "loo", seed=1)
    assert row(a1, 0, 3)["candidates"].tolist() != row(other_seed, 0, 3)["candidates"].tolist()


def test_sample_candidates_same_key_same_set():
    seen = np.array([0, 1, 2, 3])
    first = sample_candidates(0, 3, 3, seen, N_ITEMS, 20, seed=7)
    sample_candidates(1, 5, 9, np.array([9]), N_ITEMS, 20, seed=7)  # unrelated call in between
    again = sample_candidates(0, 3, 3, seen, N_ITEMS, 20, seed=7)
    assert first.tolist() == again.tolist()
    assert (
        sample_candidates(0, 2, 3, seen, N_ITEMS, 20, seed=7).tolist() != first.tolist()
    )  # position matters


def test_not_enough_unseen_items_is_an_input_error():
    with pytest.raises(RecalignInputError, match="cannot draw 19 unseen candidates"):
        sample_candidates(0, 1, 0, np.arange(30), 40, 20, seed=0)


def test_only_requested_stages_get_candidates():
    split = build_split(make(), "loo", stages_with_candidates=("test",))
    assert all(len(c) == 0 for c in split.stage("train")["candidates"])
    assert all(len(c) == 20 for c in split.stage("test")["candidates"])


def test_unknown_split_name():
    with pytest.raises(RecalignInputError, match="unknown split 'random'"):
        build_split(make(), "random")


@pytest.mark.parametrize("name", ["loo", "llara"])
def test_save_load_round_trip(tmp_path, name):
    split = build_split(make(), name, seed=3, n_candidates=10)
    split.save(tmp_path / "s")
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["examples.parquet", "split.json"]
    back = Split.load(tmp_path / "s")
    assert (back.dataset, back.name, back.seed, back.n_candidates, back.n_items) == (
        "toy",
        name,
        3,
        10,
        N_ITEMS,
    )
    assert back.notes == split.notes
    a, b = split.examples, back.examples
    assert len(a) == len(b)
    for col in ("stage", "user", "position", "target", "timestamp"):
        assert a[col].tolist() == b[col].tolist()
    assert all(np.array_equal(x, y) for x, y in zip(a["history"], b["history"]))
    assert all(np.array_equal(x, y) for x, y in zip(a["candidates"], b["candidates"]))
    assert b["candidates"].iloc[0].dtype == np.int64


def test_load_rejects_a_directory_that_is_not_a_split(tmp_path):
    with pytest.raises(RecalignInputError, match="not a prepared split"):
        Split.load(tmp_path)
