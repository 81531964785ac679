"""DPO4Rec end to end on a tiny Llama: summaries -> rewards -> pairs -> one DPO step -> metrics; resume."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from recalign.config import load_config
from recalign.data.dataset import RecDataset
from recalign.data.splits import build_split
from recalign.errors import RecalignInputError
from recalign.lm.loading import build_tiny_llama, train_bpe_tokenizer
from recalign.methods.dpo4rec.config import DPO4RecConfig
from recalign.methods.dpo4rec.summaries import SUMMARY_MARKER, build_requests, summary_prompt

GENRES = ["Action", "Comedy", "Drama", "Horror", "Romance", "Sci-Fi"]
N_ITEMS = 36


def toy_dataset() -> RecDataset:
    """20 users with 8-11 events over 36 titled movies with genres (genre taste per user)."""
    rng = np.random.default_rng(0)
    rows = []
    for u in range(20):
        pref = u % len(GENRES)
        pool = [i for i in range(N_ITEMS) if i % len(GENRES) == pref] + list(
            rng.choice(N_ITEMS, 4, replace=False)
        )
        seq = rng.permutation(sorted(set(pool)))[: 8 + u % 4]
        rows += [{"user": f"u{u}", "item": f"m{i}", "timestamp": 100 * k + u} for k, i in enumerate(seq)]
    items = pd.DataFrame(
        {
            "item": [f"m{i}" for i in range(N_ITEMS)],
            "title": [f"Film number {i} (19{60 + i})" for i in range(N_ITEMS)],
            "genres": [f"{GENRES[i % 6]}|{GENRES[(i + 1) % 6]}" for i in range(N_ITEMS)],
        }
    )
    return RecDataset.from_frames("ml-toy", pd.DataFrame(rows), items)


@pytest.fixture(scope="module")
def tiny_lm_dir(tmp_path_factory):
    ds = toy_dataset()
    split = build_split(ds, "loo", n_candidates=6)
    prompts = [r.prompt for r in build_requests(ds, split.stage("test"))]
    words = (
        " ".join(GENRES).lower() + " this user likes enjoys loves films movies from the sixties and seventies"
    )
    tok = train_bpe_tokenizer(prompts + [words] * 20, vocab_size=320)
    model = build_tiny_llama(tok, hidden_size=32, num_layers=1, num_heads=2, seed=0)
    d = tmp_path_factory.mktemp("tiny_lm")
    model.save_pretrained(d, safe_serialization=True)
    tok.save_pretrained(d)
    return d


def _load_data(cfg):
    ds = toy_dataset()
    return ds, build_split(ds, "loo", seed=cfg.data.seed, n_candidates=cfg.data.candidates)


def _config(model_dir, **extra):
    overrides = {
        "model": str(model_dir),
        "users": 0,
        "iterations": 1,
        "reward": "ndcg",
        "reward_k": 6,
        "threads": 1,
        "progress": False,
        "data": {"candidates": 6},
        "sasrec": {"epochs": 3, "hidden_size": 16, "inner_size": 32, "max_len": 12, "early_stopping": False},
        "summary": {"samples": 3, "max_new_tokens": 8, "batch_size": 12, "temperature": 1.5, "top_p": 1.0},
        "encoder": {"kind": "hashing", "hashing_dim": 32},
        "fusion": {"epochs": 15, "lr": 0.05, "text_dropout": 0.0, "n_folds": 2, "holdout_fraction": 0.0},
        "dpo": {
            "beta": 0.5,
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
            "training": {"max_steps": 1, "batch_size": 4, "learning_rate": 0.05, "logging_steps": 1},
        },
    }
    overrides.update(extra)
    return load_config(DPO4RecConfig, None, overrides)


def test_summary_prompt_lists_history_with_genres_and_ends_with_marker():
    ds = toy_dataset()
    p = summary_prompt(ds, [0, 1, 2], template="summary_describe", max_history=2)
    assert p.rstrip().endswith(SUMMARY_MARKER)
    assert "Film number 1 (1961) [Comedy, Drama]" in p and "Film number 2" in p
    assert "Film number 0 " not in p  # only the last max_history items
    no_genres = summary_prompt(ds, [0, 1, 2], template="summary_describe", include_genres=False)
    assert "[" not in no_genres
    # the phrasing is a deterministic function of (seed, user, position)
    assert summary_prompt(ds, [1, 2], user=3, position=4) == summary_prompt(ds, [1, 2], user=3, position=4)


def test_end_to_end_run_then_resume_without_recomputing(tmp_path, tiny_lm_dir, monkeypatch):
    from recalign.methods.dpo4rec.recipe import run_dpo4rec

    torch.manual_seed(0)
    out = tmp_path / "run"
    cfg = _config(tiny_lm_dir)
    result = run_dpo4rec(cfg, out, command="recalign dpo4rec (test)", load_data=_load_data)
    m = result.metrics

    # summaries: N per user for iteration 0 and 1, one per user for each test variant
    it0 = [json.loads(x) for x in (out / "summaries" / "iter0.jsonl").read_text().splitlines()]
    assert len(it0) == 20 * 3 and {r["sample"] for r in it0} == {0, 1, 2}
    assert len((out / "summaries" / "test_aligned.jsonl").read_text().splitlines()) == 20
    # rewards are NDCG@6 values of a rank among 6 candidates
    rewards = [json.loads(x) for x in (out / "rewards" / "iter0.jsonl").read_text().splitlines()]
    for r in rewards:
        assert r["reward"] == pytest.approx(1.0 / np.log2(r["rank"] + 1))
    # every user is either a pair or a counted tie
    stats = m["pairs"]["0"]
    assert stats["pairs"] + stats["ties"] + stats["too_few"] == stats["users"] == 20
    assert stats["pairs"] > 0
    pairs = [json.loads(x) for x in (out / "pairs" / "iter0.jsonl").read_text().splitlines()]
    assert all(p["chosen_reward"] > p["rejected_reward"] for p in pairs)
    # one DPO step ran and saved an adapter
    assert m["dpo"]["1"]["global_step"] == 1
    assert (out / "adapters" / "iter1" / "adapter_model.safetensors").is_file()
    assert m["dpo"]["1"]["first_log"]["rewards/accuracies"] is not None
    # metrics and records
    assert set(m["test"]) == {"sasrec", "sasrec+summaries-unaligned", "sasrec+summaries-aligned"}
    for v in m["test"].values():
        assert 0.0 <= v["NDCG@5"] <= v["HR@5"] <= 1.0
    assert 0.0 <= m["reward"]["before"]["mean"] <= m["reward"]["before"]["best_of_n"] <= 1.0
    assert 0.0 < m["reward"]["without_summary"] <= 1.0
    recs = json.loads((out / "records.json").read_text())["records"]
    assert [r["method"] for r in recs] == [
        "sasrec", "sasrec+summaries-unaligned", "sasrec+summaries-aligned",
        "sasrec+summaries-iter0", "sasrec+summaries-iter1",
    ]  # fmt: skip
    assert all(r["n_examples"] == 20 and r["protocol"] == "candidates" for r in recs[:3])
    assert all(r["protocol"] == "candidates/valid-samples" for r in recs[3:])
    assert "mean_sampled_reward" in recs[2]["extra"]
    assert recs[2]["extra"]["usable_pairs"] == [stats["pairs"]]

    # rerun: every stage is complete, so nothing may be generated or trained again
    import recalign.lm.generation as generation
    import recalign.methods.dpo4rec.align as align

    def boom(*a, **k):
        raise AssertionError("stage recomputed on resume")

    monkeypatch.setattr(generation, "generate_answers", boom)
    monkeypatch.setattr(align, "dpo_on_pairs", boom)
    again = run_dpo4rec(cfg, out, command="recalign dpo4rec (test)", load_data=_load_data)
    assert again.metrics["test"] == m["test"]
    assert again.metrics["reward"] == m["reward"]
    # timings accumulate over invocations, so the resumed run still reports the work done before
    assert again.metrics["seconds"]["summaries"] >= m["seconds"]["summaries"] > 0

    # a different config in the same directory is refused
    with pytest.raises(RecalignInputError, match="different config"):
        run_dpo4rec(_config(tiny_lm_dir, reward_k=5), out, load_data=_load_data)


def test_default_reward_has_resolution_and_every_iteration_is_reported(tmp_path, tiny_lm_dir):
    """The default reward (log-probability of the true item) separates the N samples of (nearly) every
    user, and the augmented recommender is reported before and after each of 2 rounds."""
    from recalign.methods.dpo4rec.recipe import run_dpo4rec

    torch.manual_seed(0)
    out = tmp_path / "run"
    overrides = {"iterations": 2, "reward": "logprob"}
    cfg = _config(tiny_lm_dir, **overrides)
    assert DPO4RecConfig().reward == "logprob" and DPO4RecConfig().summary.samples == 8
    assert DPO4RecConfig().iterations == 2
    m = run_dpo4rec(cfg, out, command="test", load_data=_load_data).metrics
    rewards = [json.loads(x) for x in (out / "rewards" / "iter0.jsonl").read_text().splitlines()]
    assert all(r["reward"] <= 0 for r in rewards)
    # users whose samples were not identical texts all give a pair (the reward rarely ties)
    stats = m["pairs"]["0"]
    assert stats["ties"] == stats["identical_texts"] and stats["pairs"] > 0
    per = m["per_iteration"]
    assert sorted(per) == ["0", "1", "2"]
    for t, v in per.items():
        assert 0.0 <= v["valid_sampled"]["NDCG@5"] <= 1.0 and v["usable_pairs"] == m["pairs"][t]["pairs"]
        assert v["test"] is not None  # the LM after every round is tested (test_iterations: all)
    assert set(m["test"]) == {"sasrec", "sasrec+summaries-unaligned", "sasrec+summaries-iter1",
                              "sasrec+summaries-aligned"}  # fmt: skip
    assert (out / "summaries" / "test_iter1.jsonl").is_file()
    # paired comparisons on the same test users: the mean paired difference is the difference of the
    # two records' metrics, and only aligned LMs are compared with the unaligned one
    recs = {
        (r["method"], r["protocol"]): r for r in json.loads((out / "records.json").read_text())["records"]
    }
    for name in ("unaligned", "iter1", "aligned"):
        rec = recs[(f"sasrec+summaries-{name}", "candidates")]
        paired = rec["extra"]["paired"]
        assert ("vs_unaligned" in paired) == (name != "unaligned")
        for base, base_metrics in (
            ("vs_sasrec", m["test"]["sasrec"]),
            ("vs_unaligned", m["test"]["sasrec+summaries-unaligned"]),
        ):
            for metric in ("NDCG@5", "HR@1"):
                if base in paired:
                    d = paired[base][metric]
                    assert d["n"] == 20 and d["se"] >= 0
                    assert d["diff"] == pytest.approx(rec["metrics"][metric] - base_metrics[metric], abs=1e-9)
    # the valid-sample records carry the paired change of the users' mean reward since iteration 0
    assert (
        recs[("sasrec+summaries-iter0", "candidates/valid-samples")]["extra"]["mean_sampled_reward_vs_iter0"]
        is None
    )
    change = recs[("sasrec+summaries-iter2", "candidates/valid-samples")]["extra"][
        "mean_sampled_reward_vs_iter0"
    ]
    r0 = recs[("sasrec+summaries-iter0", "candidates/valid-samples")]["extra"]["mean_sampled_reward"]
    r2 = recs[("sasrec+summaries-iter2", "candidates/valid-samples")]["extra"]["mean_sampled_reward"]
    assert change["diff"] == pytest.approx(r2 - r0, abs=1e-9)  # every user has the same N samples


def test_paired_difference_by_hand():
    from recalign.methods.dpo4rec.report import paired_difference, paired_metrics, per_example

    # differences 1, 0, 2, -1: mean 0.5, sd = sqrt(((0.5)^2 + 0.5^2 + 1.5^2 + 1.5^2) / 3) = sqrt(5/3)
    d = paired_difference([3, 2, 4, 1], [2, 2, 2, 2])
    assert d["diff"] == 0.5 and d["n"] == 4
    assert d["se"] == pytest.approx((5 / 3) ** 0.5 / 2)
    # ranks 1, 3, 6: NDCG@5 = 1, 1/log2(4) = 0.5, 0; HR@1 = 1, 0, 0
    assert per_example([1, 3, 6], "NDCG@5").tolist() == [1.0, 0.5, 0.0]
    assert per_example([1, 3, 6], "HR@1").tolist() == [1.0, 0.0, 0.0]
    p = paired_metrics([1, 3, 6], [3, 3, 1])  # NDCG@5 1 - 0.5, 0, 0 - 1 -> mean -1/6
    assert p["NDCG@5"]["diff"] == pytest.approx(-1 / 6) and p["HR@1"]["diff"] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="at least 2"):
        paired_difference([1.0], [0.0])


def test_interrupted_summary_generation_resumes_from_shards(tmp_path, tiny_lm_dir, monkeypatch):
    from recalign.lm.loading import load_model
    from recalign.methods.dpo4rec import summaries as summ

    ds = toy_dataset()
    split = build_split(ds, "loo", n_candidates=6)
    reqs = build_requests(ds, split.stage("test").head(4))
    model, tok = load_model(tiny_lm_dir)
    kw = dict(n_samples=2, max_new_tokens=4, batch_size=3, seed=5, progress=False)
    full = summ.generate_summaries(model, tok, reqs, **kw)
    assert len(full) == 8 and [r.sample for r in full[:2]] == [0, 1]

    real = summ._batch_texts
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(summ, "_batch_texts", flaky)
    with pytest.raises(KeyboardInterrupt):
        summ.generate_summaries(model, tok, reqs, shard_dir=tmp_path / "shards", **kw)
    assert sorted(p.name for p in (tmp_path / "shards").glob("shard-*.jsonl")) == ["shard-00000.jsonl"]
    calls["n"] = 10  # no more interruptions
    resumed = summ.generate_summaries(model, tok, reqs, shard_dir=tmp_path / "shards", **kw)
    # the same seeded texts as an uninterrupted run, with the first batch read from its shard
    assert [r.text for r in resumed] == [r.text for r in full]
    assert calls["n"] == 10 + 3  # batches 2, 3 and 4 only (one whole request of 2 samples per batch)
    with pytest.raises(RecalignInputError, match="other prompts or settings"):
        summ.generate_summaries(model, tok, reqs[:2], shard_dir=tmp_path / "shards", **kw)


def test_shared_prompt_summaries_equal_generate_when_greedy(tiny_lm_dir, monkeypatch):
    """The one-prefill-per-user path and the ``generate`` fallback give the same greedy summaries."""
    from recalign.lm.loading import load_model
    from recalign.methods.dpo4rec import summaries as summ

    ds = toy_dataset()
    split = build_split(ds, "loo", n_candidates=6)
    reqs = build_requests(ds, split.stage("test").head(3))
    model, tok = load_model(tiny_lm_dir)
    kw = dict(n_samples=2, sample=False, max_new_tokens=6, batch_size=4, progress=False)
    shared = summ.generate_summaries(model, tok, reqs, **kw)
    import recalign.lm.sampling as sampling

    monkeypatch.setattr(sampling, "shared_sampling_unsupported", lambda *a, **k: "forced fallback")
    fallback = summ.generate_summaries(model, tok, reqs, **kw)
    assert [r.text for r in shared] == [r.text for r in fallback]
    assert [(r.user, r.sample) for r in shared] == [(r.user, r.sample) for r in fallback]
