"""Negative sampling and preference tuples on hand-built examples."""

import numpy as np
import pandas as pd
import pytest

from recalign.data.dataset import RecDataset
from recalign.data.splits import build_split
from recalign.errors import RecalignInputError
from recalign.methods.preference_data import (
    build_preference_data,
    sample_negatives,
    training_popularity,
)


def examples_frame():
    """Three examples, six candidates each; the target sits in a different slot in each."""
    return pd.DataFrame(
        {
            "user": [0, 0, 1],
            "position": [1, 2, 1],
            "target": [10, 11, 12],
            "history": [np.array([1]), np.array([1, 10]), np.array([2])],
            "candidates": [
                np.array([10, 20, 21, 22, 23, 24]),
                np.array([30, 31, 11, 32, 33, 34]),
                np.array([40, 41, 42, 43, 44, 12]),
            ],
        }
    )


def distractors(ex, row):
    c = ex["candidates"][row]
    return set(c[c != ex["target"][row]].tolist())


# ---------------------------------------------------------------------- hard
def test_hard_negatives_are_the_top_scored_wrong_candidates():
    ex = examples_frame()
    scores = np.array(
        [
            # slot 0 is the target (score 9, must be skipped); best wrong: 23 (5), 21 (4), then 20/24 tie (1)
            [9.0, 1.0, 4.0, 0.0, 5.0, 1.0],
            # target in slot 2 scores lowest; best wrong: 34 (8), 30 (7), 33 (6)
            [7.0, 2.0, -1.0, 3.0, 6.0, 8.0],
            # all wrong tie at 0 → slot order: 40, 41, 42
            [0.0, 0.0, 0.0, 0.0, 0.0, 5.0],
        ]
    )
    neg = sample_negatives(ex, 3, "hard", scores=scores)
    assert neg.tolist() == [[23, 21, 20], [34, 30, 33], [40, 41, 42]]
    # K = 4 on row 0 reaches the tie: 20 (slot 1) before 24 (slot 5)
    assert sample_negatives(ex, 4, "hard", scores=scores)[0].tolist() == [23, 21, 20, 24]


def test_hard_needs_aligned_scores():
    ex = examples_frame()
    with pytest.raises(RecalignInputError, match="needs candidate scores"):
        sample_negatives(ex, 3, "hard")
    with pytest.raises(RecalignInputError, match="scores must be"):
        sample_negatives(ex, 3, "hard", scores=np.zeros((2, 6)))
    with pytest.raises(RecalignInputError, match="columns"):
        sample_negatives(ex, 3, "hard", scores=np.zeros((3, 5)))
    with pytest.raises(RecalignInputError, match="NaN"):
        sample_negatives(ex, 3, "hard", scores=np.full((3, 6), np.nan))


# ---------------------------------------------------------------------- random
def test_random_negatives_are_distinct_distractors_and_deterministic():
    ex = examples_frame()
    a = sample_negatives(ex, 3, "random", seed=7)
    b = sample_negatives(ex, 3, "random", seed=7)
    assert np.array_equal(a, b)
    for row in range(3):
        assert len(set(a[row].tolist())) == 3
        assert set(a[row].tolist()) <= distractors(ex, row)
    # per (seed, user, position): the same example gets the same negatives in any order or company
    rev = sample_negatives(ex.iloc[::-1].reset_index(drop=True), 3, "random", seed=7)
    assert np.array_equal(rev[::-1], a)
    alone = sample_negatives(ex.iloc[[2]].reset_index(drop=True), 3, "random", seed=7)
    assert np.array_equal(alone[0], a[2])


def test_random_negatives_change_with_seed_and_cover_all_distractors():
    ex = examples_frame().iloc[[0]].reset_index(drop=True)
    draws = [tuple(sample_negatives(ex, 2, "random", seed=s)[0]) for s in range(200)]
    assert len(set(draws)) > 10  # not a constant
    seen = {i for d in draws for i in d}
    assert seen == distractors(ex, 0)  # every distractor is reachable, the target never


# ---------------------------------------------------------------------- popularity
def big_uniform_sample(n=4000):
    """n examples (distinct users) sharing one candidate list: target 0, distractors 1..19."""
    cands = np.arange(20)
    return pd.DataFrame(
        {
            "user": np.arange(n),
            "position": np.ones(n, dtype=int),
            "target": np.zeros(n, dtype=int),
            "candidates": [cands] * n,
        }
    )


def test_popularity_weighting_skews_draws():
    ex = big_uniform_sample()
    # distractor j (1..19) has popularity j − 1, so with smoothing 1 its weight is j:
    # P(j) = j / Σ_{1..19} j = j / 190 → E[j] = Σ j² / 190 = 2470 / 190 = 13.0; uniform: E[j] = 10.0
    pop = np.arange(20, dtype=float) - 1
    pop[0] = 0
    pop_draws = sample_negatives(ex, 1, "popularity", seed=0, popularity=pop)[:, 0]
    rnd_draws = sample_negatives(ex, 1, "random", seed=0)[:, 0]
    # standard error of the mean ≈ 5.5 / √4000 ≈ 0.09, so these bounds are > 10 s.e. from the other mean
    assert pop_draws.mean() == pytest.approx(13.0, abs=0.4)
    assert rnd_draws.mean() == pytest.approx(10.0, abs=0.4)
    # the most popular distractor is drawn ~19/190 = 10% of the time, the least ~1/190 = 0.5%
    counts = np.bincount(pop_draws, minlength=20)
    assert counts[19] > 5 * counts[1]
    assert counts[0] == 0  # the target is never a negative


def test_popularity_draws_are_deterministic_and_distinct():
    ex = examples_frame()
    pop = np.zeros(50)
    pop[[20, 31, 44]] = 100
    a = sample_negatives(ex, 3, "popularity", seed=3, popularity=pop)
    assert np.array_equal(a, sample_negatives(ex, 3, "popularity", seed=3, popularity=pop))
    for row in range(3):
        assert len(set(a[row].tolist())) == 3
        assert set(a[row].tolist()) <= distractors(ex, row)
    # weight 101 vs 1: the popular distractor of each row is (almost surely) among its 3 draws
    assert 20 in a[0] and 31 in a[1] and 44 in a[2]
    with pytest.raises(RecalignInputError, match="non-zero popularity"):
        sample_negatives(ex, 3, "popularity", popularity=pop, popularity_smoothing=0.0)
    with pytest.raises(RecalignInputError, match="needs item popularity"):
        sample_negatives(ex, 3, "popularity")


# ---------------------------------------------------------------------- validation
def test_bad_requests_are_clear_errors():
    ex = examples_frame()
    with pytest.raises(RecalignInputError, match="unknown negative sampling strategy 'topk'"):
        sample_negatives(ex, 3, "topk")
    with pytest.raises(RecalignInputError, match="5 distractors; cannot draw k=6"):
        sample_negatives(ex, 6, "random")
    with pytest.raises(RecalignInputError, match="at least one negative"):
        sample_negatives(ex, 0, "random")
    bad = ex.copy()
    bad.at[1, "candidates"] = np.array([30, 31, 32])
    with pytest.raises(RecalignInputError, match="row 1: target 11 is not among"):
        sample_negatives(bad, 2, "random")
    bad.at[1, "candidates"] = np.zeros(0, dtype=np.int64)
    with pytest.raises(RecalignInputError, match="row 1 has no candidates"):
        sample_negatives(bad, 2, "random")


# ---------------------------------------------------------------------- assembling
def tiny_dataset():
    # user a: i1 i2 i3 i4 (in time order), user b: i2 i5 i6 i7; 8 items in the catalogue
    inter = pd.DataFrame(
        {
            "user": ["a"] * 4 + ["b"] * 4,
            "item": ["i1", "i2", "i3", "i4", "i2", "i5", "i6", "i7"],
            "timestamp": [1, 2, 3, 4, 1, 2, 3, 4],
        }
    )
    items = pd.DataFrame(
        {"item": [f"i{j}" for j in range(1, 9)], "title": [f"Movie {j} (199{j})" for j in range(1, 9)]}
    )
    return RecDataset.from_frames("tiny", inter, items)


def test_training_popularity_excludes_valid_and_test_targets():
    ds = tiny_dataset()  # i8 is never interacted with, so 7 indexed items
    split = build_split(ds, "loo", seed=0, n_candidates=3)
    pop = training_popularity(split, ds)
    # loo: the last two items of each user are valid/test → training parts: a: i1 i2, b: i2 i5
    titles = ds.titles()
    by_title = {titles[i]: pop[i] for i in range(ds.n_items)}
    assert by_title == {
        "Movie 1 (1991)": 1,
        "Movie 2 (1992)": 2,
        "Movie 3 (1993)": 0,
        "Movie 4 (1994)": 0,
        "Movie 5 (1995)": 1,
        "Movie 6 (1996)": 0,
        "Movie 7 (1997)": 0,
    }


def test_build_preference_data_aligns_prompts_titles_and_items():
    ds = tiny_dataset()
    split = build_split(ds, "loo", seed=0, n_candidates=3)
    train = split.stage("train")
    prompts = [f"prompt {u}/{p}" for u, p in zip(train["user"], train["position"])]
    data = build_preference_data(ds, train, k=2, strategy="random", seed=1, prompts=prompts)
    assert len(data) == len(train) == 2  # position 1 of each user
    assert data.k == 2
    titles = ds.titles()
    for i in range(len(data)):
        assert data.chosen[i] == train["target"][i]
        assert data.chosen_titles[i] == titles[train["target"][i]]
        assert data.rejected_titles[i] == [titles[j] for j in data.rejected[i]]
        assert data.answers(i)[0] == data.chosen_titles[i]
        assert data.chosen[i] not in data.rejected[i]
        assert data.prompts[i] == prompts[i]
    frame = data.to_frame()
    assert list(frame.columns[:3]) == ["user", "position", "prompt"]
    sub = data.subset([1])
    assert sub.prompts == [prompts[1]] and np.array_equal(sub.rejected[0], data.rejected[1])
    with pytest.raises(RecalignInputError, match="got 1 prompts for 2 examples"):
        build_preference_data(ds, train, k=2, prompts=prompts[:1])


def test_default_prompts_list_the_chosen_and_rejected_answers():
    # with no explicit prompts, the SFT prompts of recalign.lm.prompts are used and the answers are the
    # same display titles the prompt lists as candidates — so every answer text occurs in its prompt
    ds = tiny_dataset()
    split = build_split(ds, "loo", seed=0, n_candidates=3)
    train = split.stage("train")
    data = build_preference_data(ds, train, k=2, strategy="random", seed=0)
    for i in range(len(data)):
        for answer in data.answers(i):
            assert answer in data.prompts[i]
    assert data.prompts[0] != data.prompts[1]
