"""DMPO's settings: the pairwise prompt (exact text), pairwise accuracy (against a naive recomputation),
the genre-domain filter (exact survivors on a hand-written log) and ``recalign align prompt=pairwise``."""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
import _lm_tiny  # noqa: E402

from recalign.config import load_config  # noqa: E402
from recalign.data.dataset import RecDataset  # noqa: E402
from recalign.data.preprocess import PreprocessConfig, genre_filter, preprocess  # noqa: E402
from recalign.errors import RecalignInputError  # noqa: E402
from recalign.lm.prompts import choose_template, display_titles  # noqa: E402
from recalign.methods.dmpo import (  # noqa: E402
    option_order,
    pairwise_accuracy,
    pairwise_metrics,
    pairwise_prompt,
    preference_pairwise_prompts,
)


# ---------------------------------------------------------------------- prompt
def _four_movies() -> RecDataset:
    inter = pd.DataFrame({"user": ["u1"] * 4, "item": ["m1", "m2", "m3", "m4"], "timestamp": [1, 2, 3, 4]})
    items = pd.DataFrame(
        {
            "item": ["m1", "m2", "m3", "m4"],
            "title": ["Heat (1995)", "Fargo (1996)", "Babe (1995)", "Jaws (1975)"],
            "genres": ["Action", "Drama", "Comedy", "Horror"],
        }
    )
    return RecDataset.from_frames("ml-100k", inter, items)


def test_pairwise_prompt_exact_text_and_seeded_order():
    ds = _four_movies()
    prompt, shown = pairwise_prompt(ds, [0, 1], [2, 3], seed=1, user=1, position=2, template="pairwise_rank")
    assert shown == [2, 3]
    assert prompt == (
        "This user has watched these movies, oldest first:\n1. Heat (1995)\n2. Fargo (1996)\n\n"
        "Rank the likelihood of the user watching A and B:\nA. Babe (1995)\nB. Jaws (1975)\n\n"
        "Which movie is the user most likely to watch next? Reply with its title only.\nAnswer:"
    )
    prompt, shown = pairwise_prompt(
        ds, [0, 1], [2, 3], seed=0, user=1, position=2, template="pairwise_choose"
    )
    assert shown == [3, 2]  # seed 0 shows the pair the other way round
    assert prompt == (
        'A user\'s most recent movies: "Heat (1995)", "Fargo (1996)".\n'
        "Is the user more likely to watch A or B?\nA. Jaws (1975)\nB. Babe (1995)\n\n"
        "Give the exact title of the more likely movie.\nAnswer:"
    )
    # the order depends on the option set, not on the order it is passed in
    assert pairwise_prompt(ds, [0, 1], [3, 2], seed=0, user=1, position=2)[1] == [3, 2]
    # over many seeds both orders occur (the position of the watched item carries no signal)
    firsts = {int(option_order(s, 1, 2, [2, 3])[0]) for s in range(20)}
    assert firsts == {0, 1}
    # without an explicit template the phrasing is chosen per example by seed, like next_item
    _, t = choose_template(5, 1, 2, task="pairwise")
    assert pairwise_prompt(ds, [0], [2, 3], seed=5, user=1, position=2)[0].endswith(t.text[-40:])


def test_pairwise_prompt_with_k_negatives_lists_all_options():
    ds = _four_movies()
    frame = pd.DataFrame({"user": [1], "position": [3], "history": [np.array([0])], "target": [1]})
    (prompt,) = preference_pairwise_prompts(ds, frame, np.array([[2, 3]]), seed=0, max_history=10)
    assert "A, B and C" in prompt or "A, B or C" in prompt
    for title in ("Fargo (1996)", "Babe (1995)", "Jaws (1975)"):
        assert prompt.count(title) == 1
    with pytest.raises(RecalignInputError, match="distinct"):
        pairwise_prompt(ds, [0], [2, 2])


# ---------------------------------------------------------------------- metrics
def test_pairwise_metrics_by_hand():
    # pairs of example 0: correct, tie (1/2); example 1: wrong, correct
    m = pairwise_metrics(
        np.array([1.0, 0.0, 2.0, 5.0]), np.array([0.0, 0.0, 3.0, 4.0]), np.array([0, 0, 1, 1])
    )
    assert m["PairAcc"] == pytest.approx(2.5 / 4)
    assert m["PairAcc (per-example)"] == pytest.approx((0.75 + 0.5) / 2)
    assert m["n_pairs"] == 4
    m = pairwise_metrics(np.array([1.0, 1.0, 1.0]), np.array([0.0, 0.0, 2.0]), np.array([0, 0, 1]))
    assert m["PairAcc"] == pytest.approx(2 / 3) and m["PairAcc (per-example)"] == pytest.approx(0.5)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("dmpo")
    return root, _lm_tiny.write_ml100k_dir(root / "ml"), _lm_tiny.write_tiny_model(root / "model")


def _data(env):
    from recalign.data.prepare import DataPrepareConfig
    from recalign.methods import load_data

    return load_data(DataPrepareConfig(dataset="ml-100k", path=str(env[1]), split="llara", candidates=5))


def test_pairwise_accuracy_matches_naive_scoring(env):
    from recalign.lm.loading import load_model
    from recalign.lm.prompts import encode_answer, encode_prompt
    from recalign.lm.scoring import naive_answer_logprobs

    model, tok = load_model(env[2])
    data = _data(env)
    test = data.split.stage("test").head(5).reset_index(drop=True)
    res = pairwise_accuracy(model, tok, data.dataset, test, seed=0, max_history=4, max_pairs=2, batch_size=3)
    assert len(res.items) == 10 and res.metrics["n_pairs"] == 10
    titles = display_titles(data.dataset)
    correct = []
    for k, it in enumerate(res.items):
        row = test.iloc[it.row]
        assert it.target == row["target"] and it.negative in set(row["candidates"]) - {it.target}
        # the prompt names exactly the two items of the pair
        assert titles[it.target] in it.prompt and titles[it.negative] in it.prompt
        with torch.no_grad():
            s = naive_answer_logprobs(
                model,
                [encode_prompt(tok, it.prompt)],
                [[encode_answer(tok, titles[it.target]), encode_answer(tok, titles[it.negative])]],
            ).sum[0]
        assert res.target_scores[k] == pytest.approx(s[0].item(), abs=1e-4)
        assert res.negative_scores[k] == pytest.approx(s[1].item(), abs=1e-4)
        correct.append(1.0 if s[0] > s[1] else 0.5 if s[0] == s[1] else 0.0)
    assert res.metrics["PairAcc"] == pytest.approx(np.mean(correct))
    # max_pairs=0: every negative candidate (candidates - 1 = 4 per example)
    full = pairwise_accuracy(model, tok, data.dataset, test.head(2), seed=0, max_history=4)
    assert full.metrics["n_pairs"] == 8


def test_pairwise_accuracy_uses_the_seq2seq_tokenisation_for_encoder_decoders(env):
    """A T5-family model is scored on encoder source / decoder target ids (no BOS, EOS-terminated), as
    its candidate-ranking protocol is, not on the causal prompt rule."""
    from recalign.lm.seq2seq import build_tiny_t5, encode_source, encode_target, naive_seq2seq_answer_logprobs

    tok = _lm_tiny.tiny_tokenizer()
    model = build_tiny_t5(tok, seed=1).eval()
    data = _data(env)
    test = data.split.stage("test").head(2).reset_index(drop=True)
    res = pairwise_accuracy(model, tok, data.dataset, test, seed=0, max_history=4, max_pairs=2)
    titles = display_titles(data.dataset)
    for k, it in enumerate(res.items):
        with torch.no_grad():
            s = naive_seq2seq_answer_logprobs(
                model,
                [encode_source(tok, it.prompt)],
                [[encode_target(tok, titles[it.target]), encode_target(tok, titles[it.negative])]],
            ).sum[0]
        assert res.target_scores[k] == pytest.approx(s[0].item(), abs=1e-4)
        assert res.negative_scores[k] == pytest.approx(s[1].item(), abs=1e-4)


# ---------------------------------------------------------------------- genre domains
GENRE_LOG = [  # (user, item, timestamp)
    ("u1", "m1", 1), ("u1", "m2", 2), ("u1", "m3", 3),
    ("u2", "m2", 1), ("u2", "m4", 2),
    ("u3", "m5", 1), ("u3", "m3", 2),
    ("u4", "m4", 1),
]  # fmt: skip
GENRES = {"m1": "Action|Drama", "m2": "Drama", "m3": "Action", "m4": "", "m5": "Comedy|Romance"}


def _genre_ds() -> RecDataset:
    inter = pd.DataFrame(GENRE_LOG, columns=["user", "item", "timestamp"])
    items = pd.DataFrame(
        {"item": list(GENRES), "title": [f"T{k}" for k in GENRES], "genres": list(GENRES.values())}
    )
    return RecDataset.from_frames("toy", inter, items)


def _pairs(ds: RecDataset) -> set[tuple[str, str]]:
    inter = ds.interactions
    users = ds.user_ids[inter["user_idx"].to_numpy()]
    items = ds.items["item_id"].to_numpy()[inter["item_idx"].to_numpy()]
    return {(str(u), str(i)) for u, i in zip(users, items)}


def test_genre_filter_exact_survivors_and_counts():
    ds = _genre_ds()
    a, rep_a = genre_filter(ds, include=["Action"])  # m1 (Action|Drama: has Action -> A) and m3
    assert _pairs(a) == {("u1", "m1"), ("u1", "m3"), ("u3", "m3")}
    assert (rep_a.rows_removed, rep_a.users_removed, rep_a.items_removed) == (5, 2, 3)
    assert (rep_a.rows_left, rep_a.users_left, rep_a.items_left) == (3, 2, 2)
    assert "2 of 5 catalogue items kept" in rep_a.detail and "1 items without genres removed" in rep_a.detail
    b, rep_b = genre_filter(ds, exclude=["Action"])  # the complement: m2, m4 (no genre), m5
    assert _pairs(b) == {("u1", "m2"), ("u2", "m2"), ("u2", "m4"), ("u3", "m5"), ("u4", "m4")}
    assert (rep_b.rows_removed, rep_b.users_removed, rep_b.items_removed) == (3, 0, 2)
    assert "1 items without genres kept" in rep_b.detail
    # the halves are disjoint and cover the whole log
    assert not (_pairs(a) & _pairs(b)) and len(_pairs(a) | _pairs(b)) == len(GENRE_LOG)
    # both lists: m1 carries an included and an excluded genre -> removed, and counted
    c, rep_c = genre_filter(ds, include=["Action"], exclude=["Drama"])
    assert _pairs(c) == {("u1", "m3"), ("u3", "m3")}
    assert "1 carrying both included and excluded genres removed" in rep_c.detail
    assert any(n.startswith("genre_filter") for n in c.notes)  # the record travels with the dataset


def test_genre_filter_through_preprocess_config_and_errors():
    cfg = load_config(PreprocessConfig, overrides={"item_genres_exclude": ["Action"]})
    out, reports = preprocess(_genre_ds(), cfg)
    assert reports[0].step == "genre_filter" and reports[0].rows_left == 5 and out.n_interactions == 5
    with pytest.raises(RecalignInputError, match="unknown genre"):
        genre_filter(_genre_ds(), include=["Acton"])
    no_genres = RecDataset.from_frames("toy", pd.DataFrame(GENRE_LOG, columns=["user", "item", "timestamp"]))
    with pytest.raises(RecalignInputError, match="no 'genres' column"):
        genre_filter(no_genres, include=["Action"])


# ---------------------------------------------------------------------- align prompt=pairwise
def _align_cfg(env, **over):
    from recalign.methods.align import AlignConfig

    o = {
        "model": str(env[2]),
        "loss": "dmpo",
        "negatives": 3,
        "nll_weight": 0.0,
        "prompt": "pairwise",
        "data": {"dataset": "ml-100k", "path": str(env[1]), "split": "llara", "candidates": 5},
        "n_train": 8,
        "max_history": 4,
        "dtype": "float32",
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        "training": {
            "learning_rate": 1e-2,
            "lr_scheduler": "constant",
            "max_steps": 3,
            "batch_size": 4,
            "save_steps": 3,
            "logging_steps": 1,
            "progress": False,
        },  # fmt: skip
        "eval": {"n_test": 0},
    }
    o.update(over)
    return load_config(AlignConfig, overrides=o)


def test_align_builds_pairwise_prompts_over_the_positive_and_its_negatives(env, tmp_path):
    from recalign.lm.loading import load_model
    from recalign.methods import load_data
    from recalign.methods.align import build_examples, training_frame

    cfg = _align_cfg(env, reference="adapter-disabled")
    data = load_data(cfg.data)
    frame = training_frame(cfg, data)
    model, tok = load_model(env[2])
    examples, pref = build_examples(cfg, model, tok, data, frame, tmp_path / "ref", progress=False)
    assert len(examples) == 8
    titles = display_titles(data.dataset)
    for i, prompt in enumerate(pref.prompts):
        assert "Rank the likelihood" in prompt or "more likely to watch" in prompt
        shown = re.findall(r"^[A-Z]\. (.+)$", prompt, flags=re.M)  # options are listed as "A. Title"
        assert len(shown) == 4 and all(t in titles for t in shown)
        assert sorted(shown) == sorted(pref.answers(i))  # exactly the positive and its 3 negatives


def test_align_with_pairwise_prompt_trains(env, tmp_path):
    import json

    from recalign.methods.align import run_align

    res = run_align(_align_cfg(env), tmp_path / "dmpo", progress=False)
    losses = [h["loss"] for h in res.log_history if "rewards/accuracies" in h]
    assert len(losses) == 3 and res.train_steps == 3
    # a fresh adapter equals the reference: DMPO's loss without the NLL term is exactly log 2
    assert losses[0] == pytest.approx(math.log(2), abs=1e-4)
    assert losses[-1] != pytest.approx(losses[0], abs=1e-6)  # and training moved it
    run = json.loads((tmp_path / "dmpo" / "metrics.json").read_text())["run"]
    assert run["prompt"] == "pairwise" and run["loss"] == "dmpo"
