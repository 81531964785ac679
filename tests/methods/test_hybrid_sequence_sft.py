"""``recalign sft`` with ``format: sequence`` and ``hybrid.enabled`` on a tiny Llama: the documents carry a
soft token after every item's line, the projector trains with LoRA and is saved beside the adapter, and
``evaluate`` reloads the run to the same hybrid scores; the benchmark stage ``sft-hybrid-sequence`` runs
end to end on the tiny model and its real config has the sft-sequence budget."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
import _lm_tiny  # noqa: E402

from recalign.config import load_config  # noqa: E402
from recalign.evaluation.records import read_records  # noqa: E402
from recalign.lm.hybrid import PROJECTOR_FILE, item_tokens_of  # noqa: E402
from recalign.methods.sft import SFTConfig, run_sft  # noqa: E402
from recalign.methods.zeroshot import EvalConfig, evaluate_saved_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SASREC_FAST = ["epochs=2", "early_stopping=false"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return _lm_tiny.tiny_env(tmp_path_factory.mktemp("hybseq"))


@pytest.fixture(autouse=True)
def _restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def seq_overrides(data_dir, model_dir, *, hybrid: bool, curriculum: bool = False, **over) -> dict:
    o = {
        "format": "sequence",
        "window": 8,
        "min_context": 2,
        "n_train": 0,
        "max_history": 6,
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["all-linear"]},
        "training": {**_lm_tiny.TINY_TRAINING, "max_steps": 6, "save_steps": 3},
        "eval": {"n_test": 8, "protocols": ["candidates"]},
    }
    if hybrid:
        o["hybrid"] = {"enabled": True, "recommender_overrides": SASREC_FAST, "projector_hidden": 8,
                       "curriculum": curriculum, "curriculum_span": 0.5}  # fmt: skip
    return _lm_tiny.sft_overrides(data_dir, model_dir, **{**o, **over})


def test_hybrid_sequence_sft_trains_saves_and_reloads(env, tmp_path, monkeypatch):
    import recalign.lm.sequence as sequence_mod

    _, data_dir, model_dir = env
    seen = []
    original = sequence_mod.sequence_token_logprobs

    def spy(model, batch):
        seen.append([list(t) for t in batch["tokens"]])
        return original(model, batch)

    monkeypatch.setattr(sequence_mod, "sequence_token_logprobs", spy)
    cfg = load_config(SFTConfig, overrides=seq_overrides(data_dir, model_dir, hybrid=True, curriculum=True))
    res = run_sft(cfg, tmp_path / "run", command="recalign sft hybseq", progress=False)
    out = tmp_path / "run"
    # the curriculum: text-only documents at step 0, hybrid ones from half-way
    shares = [h["hybrid_share"] for h in res.log_history if "hybrid_share" in h]
    assert shares[0] == 0.0 and shares[3:] == [1.0, 1.0, 1.0]
    assert any(min(min(d) for d in docs) < 0 for docs in seen)  # hybrid documents reached the objective
    assert all(min(d) >= 0 for d in seen[0])  # step 0: text only
    # saved beside the adapter, with the prompt format
    adapter = out / "adapter"
    assert (adapter / PROJECTOR_FILE).is_file()
    meta = json.loads((adapter / "recalign_adapter.json").read_text())
    assert meta["prompt_format"] == "sequence"
    # the same targets as the text-only run; the documents are longer by one soft token per non-final item
    text_cfg = load_config(SFTConfig, overrides=seq_overrides(data_dir, model_dir, hybrid=False))
    text = run_sft(text_cfg, tmp_path / "text", progress=False)
    h_counts = res.metrics["run"]["train_counts"]
    t_counts = text.metrics["run"]["train_counts"]
    for key in ("n_targets", "n_documents"):
        assert h_counts[key] == t_counts[key], key
    assert h_counts["n_tokens"] > t_counts["n_tokens"]
    # evaluated with hybrid prompts, and `evaluate` reloads the run to the same metrics
    (rec,) = read_records(out / "records.json")
    assert rec.extra["prompt_format"] == "sequence" and rec.extra["item_tokens"] is True
    (text_rec,) = read_records(tmp_path / "text" / "records.json")
    assert "item_tokens" not in text_rec.extra
    again = evaluate_saved_model(
        str(out), cfg.data, cfg=EvalConfig(n_test=8, protocols=["candidates"]), seed=cfg.seed,
        progress=False, dtype="float32",
    )  # fmt: skip
    assert again[0].extra["item_tokens"] is True
    assert again[0].metrics == pytest.approx(rec.metrics, abs=1e-9)
    from recalign.lm.lora import load_lm

    model, _, _ = load_lm(str(out))
    assert item_tokens_of(model) is not None


# ---------------------------------------------------------------------- the benchmark stage
def _lm_quality():
    spec = importlib.util.spec_from_file_location("lm_quality_bench", ROOT / "benchmarks" / "lm_quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_config_has_the_sequence_budget():
    """configs/sft_hybrid_sequence_ml100k.yaml validates and differs from the sft-sequence config only in
    ``method`` and ``hybrid`` (no model is loaded)."""
    bench = _lm_quality()
    seq = load_config(SFTConfig, path=ROOT / bench.SFT_CONFIG)
    hyb = load_config(SFTConfig, path=ROOT / bench.HYBRID_SEQUENCE_CONFIG)
    assert bench.same_budget(hyb, seq) == []
    assert hyb.hybrid.enabled and hyb.hybrid.recommender == "sasrec" and hyb.format == "sequence"
    assert bench.same_budget(hyb, load_config(SFTConfig, path=ROOT / bench.HYBRID_CONFIG))  # another budget
    assert "sft-hybrid-sequence" in bench.STAGES and bench.STAGES[-1] == "merge"


def test_benchmark_stage_runs_on_the_tiny_model(env, tmp_path, monkeypatch):
    import yaml

    from recalign.data.prepare import DataPrepareConfig
    from recalign.methods import load_data

    _, data_dir, model_dir = env
    bench = _lm_quality()
    over = seq_overrides(data_dir, model_dir, hybrid=True, method="sft-hybrid-sequence")
    hyb_yaml, seq_yaml = tmp_path / "hyb.yaml", tmp_path / "seq.yaml"
    hyb_yaml.write_text(yaml.safe_dump(over))
    seq_yaml.write_text(yaml.safe_dump({k: v for k, v in over.items() if k != "hybrid"}))
    monkeypatch.setattr(bench, "HYBRID_SEQUENCE_CONFIG", str(hyb_yaml))
    monkeypatch.setattr(bench, "SFT_CONFIG", str(seq_yaml))

    def tiny_load(seed):
        return load_data(
            DataPrepareConfig(dataset="ml-100k", path=str(data_dir), split="llara", seed=seed, candidates=5)
        )

    monkeypatch.setattr(bench, "load", tiny_load)
    run = tmp_path / "bench"
    args = ["--stages", "sft-hybrid-sequence,merge", "--run", str(run), "--n-test", "8", "--n-small", "5",
            "--output", str(tmp_path / "out.json")]  # fmt: skip
    assert bench.main(args) == 0
    (rec,) = read_records(run / "sft-hybrid-sequence" / "records.json")
    assert rec.method == "sft-hybrid-sequence" and rec.n_examples == 5 and rec.protocol == "candidates"
    assert rec.extra["item_tokens"] is True and rec.extra["hybrid"] is True
    assert rec.extra["train_steps"] == 6 and rec.extra["train_counts"]["n_targets"] > 0
    merged = json.loads((tmp_path / "out.json").read_text())
    assert [r["method"] for r in merged["records"] if r["method"] == "sft-hybrid-sequence"] == [rec.method]
    # a config off the sft-sequence budget is refused before training
    seq_yaml.write_text(yaml.safe_dump({**{k: v for k, v in over.items() if k != "hybrid"}, "window": 9}))
    with pytest.raises(SystemExit, match="window"):
        bench.stage_hybrid_sequence(bench_args(bench), tmp_path / "other", "x")


def test_item_head_config_has_the_sequence_budget():
    """configs/sft_item_head_ml100k.yaml = the hybrid sequence config plus the item head (no model loaded)."""
    bench = _lm_quality()
    head = load_config(SFTConfig, path=ROOT / bench.ITEM_HEAD_CONFIG)
    hyb = load_config(SFTConfig, path=ROOT / bench.HYBRID_SEQUENCE_CONFIG)
    assert bench.same_budget(head, load_config(SFTConfig, path=ROOT / bench.SFT_CONFIG)) == []
    assert head.method == "sft-item-head" and head.hybrid.item_head and not hyb.hybrid.item_head
    assert head.training.max_steps == 300
    for key in ("recommender", "recommender_overrides", "enabled", "projector_hidden", "curriculum"):
        assert getattr(head.hybrid, key) == getattr(hyb.hybrid, key), key
    stages = list(bench.STAGES)
    assert stages.index("sft-item-head") == stages.index("sft-hybrid-sequence") + 1


def test_item_head_stage_runs_on_the_tiny_model(env, tmp_path, monkeypatch):
    """``--stages sft-item-head --max-steps 4``: one record per scoring mode, the true steps recorded,
    and the merge keeps all three."""
    import yaml

    from recalign.data.prepare import DataPrepareConfig
    from recalign.methods import load_data

    _, data_dir, model_dir = env
    bench = _lm_quality()
    over = seq_overrides(data_dir, model_dir, hybrid=True, method="sft-item-head")
    over["hybrid"]["item_head"] = True
    head_yaml, seq_yaml = tmp_path / "head.yaml", tmp_path / "seq.yaml"
    head_yaml.write_text(yaml.safe_dump(over))
    seq_yaml.write_text(yaml.safe_dump({k: v for k, v in over.items() if k != "hybrid"}))
    monkeypatch.setattr(bench, "ITEM_HEAD_CONFIG", str(head_yaml))
    monkeypatch.setattr(bench, "SFT_CONFIG", str(seq_yaml))
    monkeypatch.setattr(
        bench,
        "load",
        lambda seed: load_data(
            DataPrepareConfig(dataset="ml-100k", path=str(data_dir), split="llara", seed=seed, candidates=5)
        ),
    )
    sdpo = {**bench.SDPO_OVERRIDES, "n_train": 8, "max_history": 6, "dtype": "float32",
            "data": {"dataset": "ml-100k", "path": str(data_dir), "split": "llara", "candidates": 5},
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["all-linear"]},
            "training": {**bench.SDPO_OVERRIDES["training"], "max_steps": 2, "save_steps": 2, "progress": False}}  # fmt: skip
    monkeypatch.setattr(bench, "SDPO_OVERRIDES", sdpo)
    run = tmp_path / "bench"
    # the committed results of stages this run does not hold are kept, those it re-ran replaced
    kept = {"method": "pop", "protocol": "candidates", "metrics": {"HR@1": 0.3}, "extra": {}}
    stale = {"method": "sft-item-head", "protocol": "candidates", "metrics": {"HR@1": 0.0}, "extra": {}}
    (tmp_path / "out.json").write_text(json.dumps({"records": [kept, stale]}))
    args = ["--stages", "sft-item-head,item-head-full,item-head-curve,sdpo-item-head,sdpo-item-head-hard,merge", "--run", str(run),
            "--n-test", "8", "--n-small", "5", "--max-steps", "4", "--curve-steps", "3", "--n-curve", "6",
            "--output", str(tmp_path / "out.json")]  # fmt: skip
    assert bench.main(args) == 0
    (curve,) = read_records(run / "item-head-curve" / "records.json")
    assert (curve.method, curve.n_examples, curve.extra["train_steps"]) == ("sft-item-head-step3:item", 6, 3)
    full = read_records(run / "item-head-full" / "records.json")
    assert [(r.extra["candidate_seed"], r.n_examples, r.extra["item_score"]) for r in full] == [
        (0, 8, "item"), (1, 8, "item")]  # fmt: skip
    aligned = read_records(run / "sdpo-item-head" / "records.json")
    assert [r.extra["candidate_seed"] for r in aligned] == [0, 1]
    for r in aligned:
        assert r.extra["score"] == "item" and r.extra["item_score"] == "item" and r.extra["train_steps"] == 2
        assert r.n_examples == 8 and r.extra["strategy"] == "random"
    hard = read_records(run / "sdpo-item-head-hard" / "records.json")
    assert [(r.extra["strategy"], r.extra["score"], r.extra["candidate_seed"]) for r in hard] == [
        ("hard", "item", 0), ("hard", "item", 1)]  # fmt: skip
    records = read_records(run / "sft-item-head" / "records.json")
    assert [r.method for r in records] == ["sft-item-head", "sft-item-head:item", "sft-item-head:title"]
    assert [r.extra["item_score"] for r in records] == ["sum", "item", "title"]
    for r in records:
        assert r.n_examples == 5 and r.extra["train_steps"] == 4 and r.extra["item_tokens"] is True
    # the modes rank differently (the head's scores are not the titles')
    assert records[1].metrics != records[2].metrics
    model_run = json.loads((run / "sft-item-head" / "model" / "metrics.json").read_text())["run"]
    assert model_run["train_steps"] == 4
    ce = [h for h in json.loads((run / "sft-item-head" / "model" / "checkpoints" / "trainer_state.json")
                                .read_text())["log_history"] if "item_ce" in h]  # fmt: skip
    assert ce
    merged = json.loads((tmp_path / "out.json").read_text())
    assert [r["method"] for r in merged["records"] if r["method"].startswith("sft-item-head")] == [
        r.method for r in records
    ] + ["sft-item-head:item"] * 2 + ["sft-item-head-step3:item"]  # item-head-full's two seeds, the curve
    assert kept in merged["records"] and stale not in merged["records"]


def bench_args(bench):
    import argparse

    return argparse.Namespace(n_test=8, n_small=5)


def test_align_from_hybrid_sequence_sft_trains_on_hybrid_sequence_prompts(env, tmp_path, monkeypatch):
    """S-DPO from a hybrid sequence SFT run trains on the prompts it is evaluated with: history lines each
    followed by the item's soft token, the answers plain lines (the text-only codec would train on one
    prompt shape and evaluate on another)."""
    import recalign.methods.align as align_mod
    from recalign.lm.prompts import soft_token_id
    from recalign.lm.sequence import SequenceCodec
    from recalign.methods.align import AlignConfig, run_align

    _, data_dir, model_dir = env
    sft_dir = tmp_path / "sft"
    run_sft(load_config(SFTConfig, overrides=seq_overrides(data_dir, model_dir, hybrid=True)), sft_dir,
            progress=False)  # fmt: skip
    seen = []
    original = align_mod.build_examples

    def spy(*args, **kwargs):
        examples, pref = original(*args, **kwargs)
        seen.append((examples, pref))
        return examples, pref

    monkeypatch.setattr(align_mod, "build_examples", spy)
    cfg = load_config(
        AlignConfig,
        overrides={
            "model": str(sft_dir), "loss": "sdpo", "negatives": 2, "reference": "precomputed",
            "data": {"dataset": "ml-100k", "path": str(data_dir), "split": "llara", "candidates": 5},
            "n_train": 4, "max_history": 6, "dtype": "float32",
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["all-linear"]},
            "training": {"learning_rate": 1e-2, "lr_scheduler": "constant", "max_steps": 1, "batch_size": 4,
                         "save_steps": 1, "logging_steps": 1, "progress": False},
            "eval": {"n_test": 0, "protocols": ["candidates"]},
        },
    )  # fmt: skip
    run_align(cfg, tmp_path / "sdpo", progress=False)
    ((examples, pref),) = seen
    assert len(examples) == 4
    for ex in examples:
        soft = [t for t in ex["prompt"] if t < 0]
        assert soft, "hybrid sequence prompts carry soft tokens"
        assert all(min(a) >= 0 for a in ex["answers"])  # candidates scored as plain lines
    # exactly the codec's hybrid prompt: a soft token after every history item
    from recalign.data.prepare import DataPrepareConfig
    from recalign.lm.lora import load_lm
    from recalign.lm.prompts import recent_history
    from recalign.methods import load_data

    _, tok, _ = load_lm(str(sft_dir))
    data = load_data(DataPrepareConfig(dataset="ml-100k", path=str(data_dir), split="llara", candidates=5))
    codec = SequenceCodec(tok, data.dataset, item_tokens=True)
    first = examples[0]["prompt"]
    matches = [h for h in data.split.stage("train")["history"]
               if codec.prompt(recent_history(h, 6)) == first]  # fmt: skip
    assert matches
    assert [t for t in first if t < 0] == [soft_token_id(int(i)) for i in recent_history(matches[0], 6)]
    assert pref.prompts[0] == tok.decode([t for t in first if t >= 0], skip_special_tokens=True)
