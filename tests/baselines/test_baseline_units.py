"""Behaviour specific to each baseline and to the shared sequence-training machinery."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from recalign.baselines import (
    BPRMFConfig,
    BPRMFRecommender,
    PopRecommender,
    SASRec,
    SASRecConfig,
    load_baseline_config,
    make_baseline,
)
from recalign.baselines.bprmf import sample_negatives
from recalign.baselines.common import pad_histories
from recalign.baselines.sequential import IGNORE, training_windows
from recalign.data.dataset import RecDataset
from recalign.data.splits import build_split
from recalign.errors import RecalignInputError
from recalign.evaluation.protocols import evaluate_full
from recalign.testing import chain_data

TINY_SASREC = dict(
    epochs=6, batch_size=32, lr=5e-3, patience=2, threads=1, max_len=6, hidden_size=16, inner_size=32
)


@pytest.fixture(scope="module")
def data():
    return chain_data("loo")


@pytest.fixture(scope="module")
def sasrec(data):
    return SASRec(SASRecConfig(**TINY_SASREC)).fit(*data)


# ---------------------------------------------------------------------- windows and padding
@pytest.mark.parametrize("seed", [None, 0, 1, 2])
def test_training_windows_target_every_position_once_with_its_true_context(seed):
    rng = None if seed is None else np.random.default_rng(seed)
    seqs = [np.arange(100, 100 + n) for n in (1, 2, 5, 9, 23)]  # item value = 100 + position
    inputs, targets = training_windows(seqs, max_len=4, rng=rng)
    assert inputs.shape == targets.shape and inputs.shape[1] == 4
    hit = []
    for inp, tgt in zip(inputs, targets):
        real = inp[inp > 0] - 1
        assert (inp[len(real) :] == 0).all()  # right padded
        assert (np.diff(real) == 1).all()  # a contiguous run of the sequence
        for t, y in enumerate(tgt):
            if y == IGNORE:
                continue
            assert y == real[t] + 1  # the target follows its input
            hit.append(y)
    # positions >= 1 of every sequence, each exactly once; a length-1 sequence has no target
    expected = sorted(int(x) for s in seqs for x in s[1:])
    assert sorted(int(h) for h in hit) == expected


def test_random_windows_keep_full_context_for_the_most_recent_items():
    seq = [np.arange(100, 130)]
    for seed in range(5):
        inputs, targets = training_windows(seq, max_len=8, rng=np.random.default_rng(seed))
        # the last target (129) is predicted from the 8 items before it
        w = [i for i, t in enumerate(targets) if 129 in t][0]
        assert (inputs[w] - 1).tolist() == list(range(121, 129))


def test_pad_histories_keeps_the_last_items_right_padded_and_shifted():
    seqs, lengths = pad_histories([np.array([5, 6, 7, 8]), np.array([3]), np.array([], dtype=np.int64)], 3)
    assert seqs.tolist() == [[7, 8, 9], [4, 0, 0], [0, 0, 0]]
    assert lengths.tolist() == [3, 1, 1]


# ---------------------------------------------------------------------- SASRec
def test_sasrec_encode_and_item_embeddings_reproduce_the_scores(sasrec, data):
    test = data[1].stage("test")
    reps = sasrec.encode(list(test["history"]))
    assert reps.shape == (len(test), 16) and not reps.requires_grad
    manual = (reps @ sasrec.item_embeddings().T).numpy()
    np.testing.assert_allclose(sasrec.score_all(test), manual, rtol=1e-6)
    np.testing.assert_allclose(sasrec.score_representations(reps), manual, rtol=1e-6)


def test_sasrec_reads_only_the_last_max_len_items(sasrec, data):
    test = data[1].stage("test").iloc[:5].copy()
    longer = test.copy()
    longer["history"] = [np.concatenate([[0, 1, 2, 3], h]) for h in test["history"]]
    np.testing.assert_allclose(sasrec.score_all(longer), sasrec.score_all(test), rtol=1e-6)
    shorter = test.copy()
    shorter["history"] = [h[-2:] for h in test["history"]]  # within max_len: must matter
    assert not np.allclose(sasrec.score_all(shorter), sasrec.score_all(test))


def test_sasrec_encoder_is_causal(sasrec):
    seqs = torch.tensor([[1, 2, 3, 4, 5, 6], [1, 2, 3, 9, 9, 9]])
    with torch.no_grad():
        h = sasrec.module(seqs)
    torch.testing.assert_close(h[0, :3], h[1, :3])
    assert not torch.allclose(h[0, 3:], h[1, 3:])


def test_early_stopping_restores_the_best_validation_model(sasrec, data):
    info = sasrec.fit_info
    scores = [row["valid"] for row in info["history"]]
    assert info["best_epoch"] == 1 + int(np.argmax(scores))
    best = info["best_valid_full_NDCG@10"]
    assert best == pytest.approx(max(scores))
    # the fitted model *is* the best epoch's model, not the last one's
    assert evaluate_full(sasrec, data[1].stage("valid"), ks=(10,))["NDCG@10"] == pytest.approx(best)


def test_early_stopping_stops_after_patience(data):
    model = SASRec(SASRecConfig(**{**TINY_SASREC, "epochs": 40, "patience": 1, "lr": 0.05})).fit(*data)
    info = model.fit_info
    assert info["epochs_run"] < 40
    assert info["epochs_run"] == info["best_epoch"] + 1  # one evaluation without improvement


def test_fit_restores_threads_and_leaves_the_global_rng_alone(data):
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    try:
        SASRec(SASRecConfig(**{**TINY_SASREC, "epochs": 1, "threads": 1})).fit(*data)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(torch.rand(3), expected)


# ---------------------------------------------------------------------- popularity and BPR-MF
def _tiny_dataset() -> RecDataset:
    # user a: x y z w ; user b: y z x w ; user c: z y x   (timestamps give the order)
    rows = [("a", "x", 1), ("a", "y", 2), ("a", "z", 3), ("a", "w", 4)]
    rows += [("b", "y", 1), ("b", "z", 2), ("b", "x", 3), ("b", "w", 4)]
    rows += [("c", "z", 1), ("c", "y", 2), ("c", "x", 3)]
    return RecDataset.from_frames("tiny", pd.DataFrame(rows, columns=["user", "item", "timestamp"]))


def test_pop_counts_training_interactions_only():
    ds = _tiny_dataset()
    split = build_split(ds, "loo", n_candidates=2, stages_with_candidates=())
    pop = PopRecommender().fit(ds, split)
    # loo drops each user's last two items: training = a: x y, b: y z; c (3 items) has no training
    # example, so nothing of c is counted; w (a test target of both a and b) counts zero
    idx = {t: i for i, t in enumerate(ds.items["item_id"])}
    expected = np.zeros(ds.n_items)
    for item, count in {"x": 1, "y": 2, "z": 1, "w": 0}.items():
        expected[idx[item]] = count
    np.testing.assert_array_equal(pop.score_all(split.stage("test"))[0], expected)


def test_negative_sampling_never_returns_a_training_positive():
    rng = np.random.default_rng(0)
    n_items = 10
    users = np.repeat(np.arange(3), 2000)
    pos = {0: [0, 1, 2, 3, 4, 5, 6, 7], 1: [9], 2: []}  # user 0 has only items 8 and 9 left
    keys = np.sort(np.array([u * n_items + i for u, items in pos.items() for i in items]))
    neg = sample_negatives(users, keys, n_items, rng)
    for u, items in pos.items():
        drawn = set(neg[users == u].tolist())
        assert not drawn & set(items)
    assert set(neg[users == 0].tolist()) == {8, 9}
    assert len(set(neg[users == 2].tolist())) == n_items  # uniform over everything else


def test_bprmf_users_without_training_data_get_the_average_user():
    # 9 next-item examples: a's 4 and b's 3 are the first 7 in time = llara's 80% training share
    rows = [("a", i, t) for t, i in enumerate("xyzwv", start=1)] + [
        ("b", i, t) for t, i in enumerate("yzxw", 6)
    ]
    rows += [("late", "x", 100), ("late", "y", 101), ("late", "z", 102)]
    ds = RecDataset.from_frames("t", pd.DataFrame(rows, columns=["user", "item", "timestamp"]))
    split = build_split(ds, "llara", n_candidates=2, stages_with_candidates=())
    late = int(np.flatnonzero(ds.user_ids == "late")[0])
    assert late not in set(split.stage("train")["user"])  # llara's time cut leaves "late" untrained
    model = BPRMFRecommender(BPRMFConfig(epochs=2, dim=4, threads=1)).fit(ds, split)
    assert model.fit_info["users_without_training_data"] == 1
    trained = [u for u in range(ds.n_users) if u != late]
    torch.testing.assert_close(model.user_emb[late], model.user_emb[trained].mean(0))


# ---------------------------------------------------------------------- configs
def test_configs_reject_unknown_keys_and_bad_values(tmp_path):
    with pytest.raises(RecalignInputError, match="unknown key 'epoch'"):
        load_baseline_config("sasrec", None, ["epoch=3"])
    bad = tmp_path / "b.yaml"
    bad.write_text("dim: 0\n")
    with pytest.raises(RecalignInputError, match="must be >= 1") as e:
        load_baseline_config("bprmf", bad)
    assert e.value.field == "dim"
    with pytest.raises(RecalignInputError, match="unknown baseline"):
        make_baseline("itemknn")
    with pytest.raises(RecalignInputError, match="valid_metric"):
        make_baseline("gru4rec", valid_metric="AUC")


def test_make_baseline_applies_keyword_overrides():
    m = make_baseline("sasrec", epochs=3, hidden_size=32, n_heads=4)
    assert (m.config.epochs, m.config.hidden_size, m.config.n_heads, m.config.max_len) == (3, 32, 4, 50)
    assert m.name == "sasrec"


def test_scoring_items_outside_the_fitted_catalogue_is_an_input_error(sasrec, data):
    test = data[1].stage("test").iloc[:2].copy()
    test["history"] = [np.array([1, 10_000]), np.array([2])]
    with pytest.raises(RecalignInputError, match="outside the 60 items"):
        sasrec.score_all(test)
