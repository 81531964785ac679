"""DMPO's settings: the pair-ranking prompt (exact text, answers each other's reversal), the pairwise
protocol (hand-worked metrics, against a naive recomputation), the few-shot recipe (records carry the rows
trained on), the genre-domain filter (exact survivors on a hand-written log) and the choice prompt of
``recalign align prompt=choice``."""

from __future__ import annotations

import math
import re
import shutil
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
from recalign.methods.dmpo import pairwise_accuracy  # noqa: E402
from recalign.methods.dmpo_metrics import pairwise_metrics  # noqa: E402
from recalign.methods.dmpo_prompts import (  # noqa: E402
    option_order,
    ordering_answer,
    pair_ranking_prompt,
    pair_ranking_rows,
    pairwise_prompt,
    parse_ordering,
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


# ---------------------------------------------------------------------- pair-ranking prompt
def test_pair_ranking_prompt_exact_text_and_reversed_answers():
    ds = _four_movies()
    prompt, shown = pair_ranking_prompt(
        ds, [0, 1], [2, 3], seed=1, user=1, position=2, template="pair_rank_list"
    )
    assert shown == [2, 3]
    assert prompt == (
        "This user has watched these movies, oldest first:\n1. Heat (1995)\n2. Fargo (1996)\n\n"
        "Rank the likelihood of the user watching A and B:\nA. Babe (1995)\nB. Jaws (1975)\n\n"
        "List both movies, the one the user is more likely to watch first.\nAnswer:"
    )
    prompt, shown = pair_ranking_prompt(
        ds, [0, 1], [2, 3], seed=0, user=1, position=2, template="pair_rank_quoted"
    )
    assert shown == [3, 2]
    assert prompt == (
        'A user\'s most recent movies: "Heat (1995)", "Fargo (1996)".\n'
        "Rank the likelihood of this user watching A and B, most likely first:\nA. Jaws (1975)\nB. Babe (1995)\n"
        "Answer:"
    )
    assert pair_ranking_prompt(ds, [0, 1], [3, 2], seed=0, user=1, position=2)[1] == [3, 2]
    with pytest.raises(RecalignInputError, match="exactly two"):
        pair_ranking_prompt(ds, [0], [2, 3, 1])
    assert ordering_answer(["Babe (1995)", "Jaws (1975)"], 1) == "B. Jaws (1975)\nA. Babe (1995)"


def test_pair_ranking_rows_k_prompts_and_answers_are_reversals():
    """Each negative gives one prompt naming exactly the positive and that negative; the rejected answer
    is the chosen one with its two lines reversed, the chosen one puts the positive first."""
    ds = _four_movies()
    titles = display_titles(ds)
    frame = pd.DataFrame({"user": [1, 2], "position": [3, 4], "history": [np.array([0]), np.array([0, 2])],
                          "target": [1, 3]})  # fmt: skip
    groups = pair_ranking_rows(ds, frame, [[2, 3], [1, 2]], seed=0)
    assert [len(g) for g in groups] == [2, 2]
    firsts = set()
    for g, target in zip(groups, [1, 3]):
        for r in g:
            options = re.findall(r"^([AB])\. (.+)$", r.prompt, flags=re.M)
            assert sorted(t for _, t in options) == sorted([titles[target], titles[r.negative]])
            assert r.rejected.splitlines() == r.chosen.splitlines()[::-1]
            assert parse_ordering(r.rejected) == parse_ordering(r.chosen)[::-1]
            assert sorted(parse_ordering(r.chosen)) == ["A", "B"]
            assert r.chosen.splitlines()[0].endswith(titles[target])  # positive ranked first
            letter = parse_ordering(r.chosen)[0]
            assert dict(options)[letter] == titles[target]
            firsts.add(r.positive_is_a)
    with pytest.raises(RecalignInputError, match="equals the target"):
        pair_ranking_rows(ds, frame.head(1), [[1]], seed=0)


# ---------------------------------------------------------------------- metrics
def test_pairwise_metrics_hand_worked():
    # four pairs: log-prob of ordering "positive first" / "negative first", positive shown as A or B
    pos = np.array([-1.0, -2.0, -3.0, -1.0])
    neg = np.array([-2.0, -2.0, -1.0, -4.0])
    rows = np.array([0, 0, 1, 1])
    pos_a = np.array([True, False, True, False])
    m = pairwise_metrics(pos, neg, rows, pos_a)
    # margins 1, 0 (tie: wrong), -2, 3 -> 2 of 4 correct
    assert m["PairAcc"] == pytest.approx(0.5)
    assert m["PairAcc SE"] == pytest.approx(math.sqrt(0.25 / 4))
    assert m["PairAcc (per-example)"] == pytest.approx((0.5 + 0.5) / 2)
    # A-first scores: pair0 (pos=A) +1, pair1 (pos=B) -0 = 0, pair2 (pos=A) -2, pair3 (pos=B) -3.
    # label-1 pairs {0: +1, 2: -2}, label-0 pairs {1: 0, 3: -3}: +1 beats both, -2 beats -3 -> 3 of 4
    assert m["AUC"] == pytest.approx(3 / 4)
    assert m["A-first rate"] == pytest.approx(1 / 4)  # only pair 0 prefers the A-first ordering
    assert m["n_pairs"] == 4
    # a model that always prefers the A-first ordering by the same amount: PairAcc is the share of
    # pairs showing the positive as A, AUC counts the ties as losses (0, never above chance)
    m = pairwise_metrics(
        np.array([0.0, -1.0]), np.array([-1.0, 0.0]), np.array([0, 1]), np.array([True, False])
    )
    assert m["PairAcc"] == 0.5 and m["AUC"] == 0.0 and m["A-first rate"] == 1.0
    # NaN scores lose
    m = pairwise_metrics(np.array([np.nan, 1.0]), np.array([0.0, 0.0]), np.array([0, 1]))
    assert m["PairAcc"] == 0.5 and "AUC" not in m


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
        assert it.positive == row["target"] and it.negative in set(row["candidates"]) - {it.positive}
        # the prompt names exactly the two items of the pair; the answers are its two orderings
        assert titles[it.positive] in it.prompt and titles[it.negative] in it.prompt
        assert it.rejected.splitlines() == it.chosen.splitlines()[::-1]
        with torch.no_grad():
            s = naive_answer_logprobs(
                model,
                [encode_prompt(tok, it.prompt)],
                [[encode_answer(tok, it.chosen), encode_answer(tok, it.rejected)]],
            ).sum[0]
        assert res.positive_first[k] == pytest.approx(s[0].item(), abs=1e-4)
        assert res.negative_first[k] == pytest.approx(s[1].item(), abs=1e-4)
        correct.append(1.0 if s[0] > s[1] else 0.0)
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
    for k, it in enumerate(res.items):
        with torch.no_grad():
            s = naive_seq2seq_answer_logprobs(
                model,
                [encode_source(tok, it.prompt)],
                [[encode_target(tok, it.chosen), encode_target(tok, it.rejected)]],
            ).sum[0]
        assert res.positive_first[k] == pytest.approx(s[0].item(), abs=1e-4)
        assert res.negative_first[k] == pytest.approx(s[1].item(), abs=1e-4)


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


# ---------------------------------------------------------------------- align prompt=choice
def _align_cfg(env, **over):
    from recalign.methods.align import AlignConfig

    o = {
        "model": str(env[2]),
        "loss": "dmpo",
        "negatives": 3,
        "nll_weight": 0.0,
        "prompt": "choice",
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


def test_align_builds_choice_prompts_over_the_positive_and_its_negatives(env, tmp_path):
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


def test_align_with_choice_prompt_trains(env, tmp_path):
    import json

    from recalign.methods.align import run_align

    res = run_align(_align_cfg(env), tmp_path / "dmpo", progress=False)
    losses = [h["loss"] for h in res.log_history if "rewards/accuracies" in h]
    assert len(losses) == 3 and res.train_steps == 3
    # a fresh adapter equals the reference: DMPO's loss without the NLL term is exactly log 2
    assert losses[0] == pytest.approx(math.log(2), abs=1e-4)
    assert losses[-1] != pytest.approx(losses[0], abs=1e-6)  # and training moved it
    run = json.loads((tmp_path / "dmpo" / "metrics.json").read_text())["run"]
    assert run["prompt"] == "choice" and run["loss"] == "dmpo"


# ---------------------------------------------------------------------- few-shot recipe
def _genre_ml_dir(root: Path) -> Path:
    """The tiny ML-100K directory with two genre halves: odd items Action, even items Comedy."""
    d = _lm_tiny.write_ml100k_dir(root)
    lines = []
    for line in (d / "u.item").read_bytes().decode("latin-1").splitlines():
        parts = line.split("|")
        flags = ["0"] * 19
        flags[1 if int(parts[0]) % 2 else 5] = "1"  # 1 = Action, 5 = Comedy
        lines.append("|".join(parts[:5] + flags))
    (d / "u.item").write_bytes(("\n".join(lines) + "\n").encode("latin-1"))
    return d


def _fewshot_cfg(root: Path, model: Path, **over):
    from recalign.methods.dmpo_fewshot import DMPOFewShotConfig

    o = {
        "model": str(model),
        "negatives": 2,
        "nll_weight": 0.0,
        "data": {"dataset": "ml-100k", "path": str(_genre_ml_dir(root / "ml")), "split": "llara",
                 "candidates": 4, "preprocess": {"item_genres_include": ["Action"]}},
        "n_sft": 6,
        "n_pref": 4,
        "max_history": 3,
        "dtype": "float32",
        "threads": 1,
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        "sft_training": {"learning_rate": 1e-2, "epochs": 2, "batch_size": 4, "save_steps": 50,
                         "logging_steps": 1, "progress": False},
        "pref_training": {"learning_rate": 1e-2, "epochs": 1, "batch_size": 2, "save_steps": 50,
                          "logging_steps": 1, "progress": False, "lr_scheduler": "constant"},
        "eval": {"n_test": 3, "max_pairs": 2, "batch_size": 4},
    }  # fmt: skip
    o.update(over)
    return load_config(DMPOFewShotConfig, overrides=o)


@pytest.mark.parametrize("prompt", ["pairwise", "candidates"])
def test_fewshot_records_carry_the_rows_trained_on(env, tmp_path, monkeypatch, prompt):
    import recalign.training as training
    from recalign.methods.dmpo_fewshot import run_dmpo_fewshot

    seen = []
    real_train = training.train

    def spy(model, examples, objective, cfg, ckpt, **kw):
        out = real_train(model, examples, objective, cfg, ckpt, **kw)
        seen.append((type(objective).__name__, len(examples), examples[0], out.global_step))
        return out

    monkeypatch.setattr(training, "train", spy)
    cfg = _fewshot_cfg(tmp_path, env[2], prompt=prompt)
    res = run_dmpo_fewshot(cfg, tmp_path / "run", command="test", progress=False)
    # one SFT stage and one stage per loss, each trained on exactly the configured rows
    assert [(name, n) for name, n, _, _ in seen] == [
        ("SFTObjective", 6),
        ("PairRankingObjective" if prompt == "pairwise" else "PreferenceObjective", 4),
        ("PairRankingObjective" if prompt == "pairwise" else "PreferenceObjective", 4),
    ]
    sft_ex, pref_ex = seen[0][2], seen[1][2]
    if prompt == "pairwise":
        assert len(pref_ex["prompt"]) == 2 and all(len(a) == 2 for a in pref_ex["answers"])  # K prompts
        assert tuple(pref_ex["ref"].shape) == (2, 2)
    else:
        assert len(pref_ex["answers"]) == 3  # target + K negatives in one candidate prompt
    assert len(sft_ex["answers"]) == 1
    protocols = [(r.method, r.protocol) for r in res.records]
    for stage in ("sft", "dmpo-k2", "sdpo-k2"):
        for proto in (
            "pairwise/in-genre",
            "candidates/in-genre",
            "pairwise/cross-genre",
            "candidates/cross-genre",
        ):
            assert (f"{stage}-fewshot-{prompt}", proto) in protocols
    for r in res.records:
        x = r.extra
        assert x["n_sft_rows"] == 6 and x["sft_rows_seen"] == 12  # 2 epochs of 6 rows
        assert x["trained_prompt"] == prompt and x["eval_prompt"] == r.protocol.split("/")[0]
        if r.method.startswith("sft"):
            assert x["n_train"] == 6 and x["train_steps"] == seen[0][3] == 4  # ceil(6/4) x 2
            assert "n_pref_rows" not in x
        else:
            assert x["n_pref_rows"] == 4 and x["n_pref_pairs"] == 8 and x["pref_rows_seen"] == 4
            assert x["n_pref_prompts"] == (8 if prompt == "pairwise" else 4)
            assert x["n_train"] == 10 and x["train_steps"] == 2
        if r.protocol.startswith("pairwise"):
            assert r.metrics["n_pairs"] == 6 and 0 <= r.metrics["PairAcc"] <= 1
            if not r.method.startswith("sft"):
                assert set(x["vs_sft"]) == {"diff", "se", "n"} and x["vs_sft"]["n"] == 6
    assert read_back(tmp_path / "run" / "records.json") == len(res.records)
    # a rerun with resume reuses every finished stage and its evaluation (no training, no scoring) and
    # gives the same records
    import recalign.methods.dmpo_fewshot as fewshot

    evaluated = []
    real_eval = fewshot.evaluate_stage

    def eval_spy(cfg, stage, *a, **kw):
        evaluated.append(stage.name)
        return real_eval(cfg, stage, *a, **kw)

    monkeypatch.setattr(fewshot, "evaluate_stage", eval_spy)
    seen.clear()
    again = run_dmpo_fewshot(cfg, tmp_path / "run", command="test", progress=False)
    assert seen == [] and evaluated == []
    assert [r.to_dict() for r in again.records] == [r.to_dict() for r in res.records]
    # an unfinished stage is trained and evaluated; its paired comparison with SFT uses SFT's saved pairs
    shutil.rmtree(tmp_path / "run" / "sdpo")
    third = run_dmpo_fewshot(cfg, tmp_path / "run", command="test", progress=False)
    assert evaluated == ["sdpo"] and len(seen) == 1
    assert [(r.metrics, r.extra.get("vs_sft")) for r in third.records] == [
        (r.metrics, r.extra.get("vs_sft")) for r in res.records
    ]
    # a changed evaluation setting evaluates every stage again
    evaluated.clear()
    cfg.eval.max_pairs = 1
    run_dmpo_fewshot(cfg, tmp_path / "run", command="test", progress=False)
    assert evaluated == ["sft", "dmpo", "sdpo"]


def read_back(path: Path) -> int:
    from recalign.evaluation.records import read_records

    return len(read_records(path))


def test_pair_ranking_objective_is_log2_at_the_reference_and_dpo_for_one_negative():
    from recalign.lm.loading import build_tiny_llama, train_bpe_tokenizer
    from recalign.methods.dmpo_fewshot import PairRankingObjective

    tok = train_bpe_tokenizer(["A. Heat B. Jaws Rank the likelihood"] * 4, vocab_size=120)
    model = build_tiny_llama(tok, hidden_size=32, num_layers=1, num_heads=2, seed=0).eval()
    prompts = [[[1, 5, 6, 7], [1, 8, 9]], [[1, 10, 11], [1, 12, 13, 14]]]
    answers = [[[[20, 21], [21, 20]], [[22, 23], [23, 22]]], [[[24, 25], [25, 24]], [[26], [27]]]]
    from recalign.lm.scoring import answer_logprobs

    with torch.no_grad():
        ref = answer_logprobs(model, [p for r in prompts for p in r], [a for r in answers for a in r]).sum
    batch = {"prompt": prompts, "answers": answers, "ref": ref.reshape(2, 2, 2)}
    for loss in ("dmpo", "sdpo"):
        value, _ = PairRankingObjective(loss, beta=1.0)(model, batch)
        expect = math.log(2) if loss == "dmpo" else math.log(3)  # S-DPO: log(1 + K) at the reference
        assert float(value.detach()) == pytest.approx(expect, abs=1e-5)
    # shifted reference: DMPO = softplus(mean rejected reward - mean chosen reward), per row
    shift = torch.tensor([[[0.0, 1.0], [0.5, 0.0]], [[0.0, 0.0], [2.0, -1.0]]])
    value, _ = PairRankingObjective("dmpo", beta=1.0)(model, {**batch, "ref": ref.reshape(2, 2, 2) + shift})
    r = -shift  # policy == ref - shift's complement: reward = policy - (ref + shift) = -shift
    per_row = torch.nn.functional.softplus(r[:, :, 1].mean(1) - r[:, :, 0].mean(1))
    assert float(value.detach()) == pytest.approx(float(per_row.mean()), abs=1e-5)


def test_cli_dmpo_runs_the_recipe_from_a_config_file(env, tmp_path, capsys):
    from recalign.cli.main import main
    from recalign.config import save_config
    from recalign.evaluation.records import read_records

    cfg = _fewshot_cfg(tmp_path, env[2], losses=["dmpo"])
    save_config(cfg, tmp_path / "dmpo.yaml")
    out = tmp_path / "cli"
    code = main(["dmpo", "--config", str(tmp_path / "dmpo.yaml"), "--output", str(out), "--prompt", "candidates",
                 "eval.domains=[in-genre]", "eval.protocols=[pairwise]"])  # fmt: skip
    assert code == 0
    records = read_records(out / "records.json")
    assert [(r.method, r.protocol) for r in records] == [
        ("sft-fewshot-candidates", "pairwise/in-genre"),
        ("dmpo-k2-fewshot-candidates", "pairwise/in-genre"),
    ]
    assert "records ->" in capsys.readouterr().out
    # a bad override is a one-line input error (exit 2)
    assert main(["dmpo", "--output", str(tmp_path / "x"), "eval.n_tst=3"]) == 2


def test_dmpo_paired_difference_is_the_shared_one_but_lenient_below_two_pairs():
    """Correct-vs-correct of two models on 4 pairs: d = [1, 0, 0, -1] → mean 0, sd sqrt(2/3), se sd/2;
    one pair gives its difference with a NaN se; no pair gives NaN (a tiny domain does not raise)."""
    from recalign.methods.dmpo_metrics import paired_difference

    got = paired_difference(np.array([1, 1, 0, 0]), np.array([0, 1, 0, 1]))
    assert got["diff"] == 0.0 and got["n"] == 4.0
    assert math.isclose(got["se"], math.sqrt(2 / 3) / 2)
    one = paired_difference(np.array([1.0]), np.array([0.0]))
    assert one["diff"] == 1.0 and math.isnan(one["se"]) and one["n"] == 1.0
    none = paired_difference(np.array([]), np.array([]))
    assert math.isnan(none["diff"]) and none["n"] == 0.0
    with pytest.raises(ValueError):
        paired_difference(np.array([1.0, 0.0, 1.0]), np.array([1.0, 0.0]))
