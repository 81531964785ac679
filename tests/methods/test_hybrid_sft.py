"""Hybrid item tokens in SFT: the projector trains with LoRA (the optimiser holds it), is checkpointed and
restored on resume, is saved beside the adapter and reloaded by `recalign evaluate` / `recommend` with the
same scores; damaged projector files are one-line errors (exit 2); the curriculum schedule."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
import _lm_tiny  # noqa: E402

from recalign.cli.main import main  # noqa: E402
from recalign.config import load_config  # noqa: E402
from recalign.errors import RecalignInputError  # noqa: E402
from recalign.evaluation.records import read_records  # noqa: E402
from recalign.lm.hybrid import PROJECTOR_FILE, PROJECTOR_META, has_item_tokens, item_tokens_of  # noqa: E402
from recalign.methods.hybrid import (  # noqa: E402
    CurriculumCallback,
    CurriculumObjective,
    HybridConfig,
    hybrid_fraction,
)
from recalign.methods.sft import SFTConfig, run_sft  # noqa: E402

SASREC_FAST = ["epochs=2", "early_stopping=false"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return _lm_tiny.tiny_env(tmp_path_factory.mktemp("hybrid"))


def hybrid_cfg(data_dir, model_dir, *, curriculum=False, n_test=0, **training) -> SFTConfig:
    over = _lm_tiny.sft_overrides(
        data_dir,
        model_dir,
        n_train=16,
        lora={"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["all-linear"]},
        training={**_lm_tiny.TINY_TRAINING, "max_steps": 4, "save_steps": 2, **training},
        eval={"n_test": n_test, "protocols": ["candidates", "generation"], "max_new_tokens": 4},
        hybrid={"enabled": True, "recommender_overrides": SASREC_FAST, "projector_hidden": 8,
                "curriculum": curriculum, "curriculum_span": 0.5},
    )  # fmt: skip
    return load_config(SFTConfig, overrides=over)


def _projector(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / PROJECTOR_FILE))


# ---------------------------------------------------------------------- curriculum
def test_curriculum_schedule_rises_linearly_and_is_deterministic():
    assert [hybrid_fraction(s, 10) for s in (0, 5, 10, 20)] == [0.0, 0.5, 1.0, 1.0]
    assert [hybrid_fraction(s, 10, span=0.5) for s in (0, 2, 5, 9)] == [0.0, 0.4, 1.0, 1.0]

    seen = []

    def inner(model, batch):
        seen.append(list(batch["prompt"]))
        return torch.tensor(0.0), {}

    inner.loss_items = lambda batch: 7
    obj = CurriculumObjective(inner, span=1.0, seed=3)
    assert obj.loss_items({}) == 7  # the trainer's token weighting still sees the inner objective
    cb = CurriculumCallback(obj)

    class State:
        global_step, max_steps = 0, 100

    class Model:
        training = True

    n = 2000
    batch = {"example": list(range(n)), "prompt": ["h"] * n, "text_prompt": ["t"] * n}
    shares = []
    for step in (0, 25, 50, 100):
        State.global_step = step
        cb.on_step_begin(None, State, None)
        _, logs = obj(Model, batch)
        shares.append(logs["hybrid_share"])
        assert seen[-1].count("h") == round(logs["hybrid_share"] * n)
    assert shares[0] == 0.0 and shares[-1] == 1.0
    assert abs(shares[1] - 0.25) < 0.04 and abs(shares[2] - 0.5) < 0.04
    State.global_step = 50
    cb.on_step_begin(None, State, None)
    assert obj.choose(range(n)) == obj.choose(range(n))  # the same draw on resume / in every process
    Model.training = False
    _, logs = obj(Model, batch)
    assert logs["hybrid_share"] == 1.0 and seen[-1] == ["h"] * n  # evaluation: always hybrid


def test_config_validation_is_one_line():
    with pytest.raises(RecalignInputError, match="hybrid.curriculum_span"):
        HybridConfig(curriculum_span=0.0).validate()
    with pytest.raises(RecalignInputError, match="recommender_overrides") as e:
        HybridConfig(recommender_overrides=["epoch=3"]).validate()
    assert "\n" not in str(e.value)
    # both formats take hybrid item tokens (the sequence one: tests/methods/test_hybrid_sequence_sft.py)
    seq = {"format": "sequence", "hybrid": {"enabled": True}, "eval": {"protocols": ["candidates"]}}
    load_config(SFTConfig, overrides=seq).validate()


# ---------------------------------------------------------------------- training
def test_projector_trains_with_lora_is_checkpointed_and_saved(env, tmp_path):
    from recalign.lm.hybrid import load_item_tokens, new_item_tokens
    from recalign.lm.loading import load_model
    from recalign.lm.lora import LoRAConfig, attach_lora

    _, data_dir, model_dir = env
    cfg = hybrid_cfg(data_dir, model_dir, curriculum=True)
    res = run_sft(cfg, tmp_path / "run", progress=False)
    out = tmp_path / "run"
    adapter = out / "adapter"
    assert (adapter / PROJECTOR_FILE).is_file() and (adapter / PROJECTOR_META).is_file()
    meta = json.loads((adapter / PROJECTOR_META).read_text())
    assert meta["n_items"] == len(_lm_tiny.TITLES) and meta["hidden"] == 8 and meta["recommender"] == "sasrec"
    # the curriculum: text-only at step 0, all hybrid from half-way
    shares = [h["hybrid_share"] for h in res.log_history if "hybrid_share" in h]
    assert len(shares) == 4 and shares[0] == 0.0 and shares[2:] == [1.0, 1.0]
    # the projector moved away from its (seeded) initial values: it was trained
    saved = load_item_tokens(adapter)
    model, _ = load_model(model_dir)
    torch.manual_seed(cfg.lora.r)  # unrelated seed use must not matter: init is seeded by training.seed
    torch.manual_seed(cfg.training.seed)
    model = attach_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.0, target_modules=["all-linear"]))
    torch.manual_seed(cfg.training.seed)
    init = new_item_tokens(model, saved.item_table, hidden=8)
    assert torch.equal(init.item_table, saved.item_table)  # the item table is frozen
    assert not torch.allclose(init.projector.item_in.weight, saved.projector.item_in.weight)
    # the optimiser holds every LoRA parameter and the 4 projector tensors; checkpoints hold the projector
    ckpt = out / "checkpoints" / "checkpoint-4"
    assert (ckpt / PROJECTOR_FILE).is_file()
    opt = torch.load(ckpt / "optimizer.pt", weights_only=True)
    n_lora = sum(1 for n, p in model.named_parameters() if p.requires_grad)
    assert len(opt["state"]) == n_lora + 4
    for k, v in _projector(ckpt).items():
        assert torch.equal(v, _projector(adapter)[k])


def test_resume_restores_projector(env, tmp_path):
    """A run cut after checkpoint-2 and resumed ends where the uninterrupted run ended; the Trainer-level
    restore puts the checkpoint's projector into the (differently initialised) module of the new process."""
    from recalign.lm.hybrid import attach_item_tokens, load_item_tokens
    from recalign.lm.loading import load_model
    from recalign.lm.lora import attach_lora
    from recalign.methods.sft import SFTObjective
    from recalign.training import train

    _, data_dir, model_dir = env
    cfg = hybrid_cfg(data_dir, model_dir)
    out = tmp_path / "run"
    run_sft(cfg, out, progress=False)
    full = _projector(out / "adapter")
    shutil.rmtree(out / "checkpoints" / "checkpoint-4")
    shutil.rmtree(out / "adapter")
    cfg.training.resume = True
    res = run_sft(cfg, out, progress=False)
    assert res.resumed_from is not None and Path(res.resumed_from).name == "checkpoint-2"
    for k, v in _projector(out / "adapter").items():
        assert torch.allclose(v, full[k], atol=1e-6), k

    # trainer level: a fresh random projector is overwritten by the checkpoint's on resume
    model, tok = load_model(model_dir)
    model = attach_lora(model, cfg.lora)
    module = load_item_tokens(out / "checkpoints" / "checkpoint-2")
    with torch.no_grad():
        for p in module.parameters():
            p.normal_()
    attach_item_tokens(model, module, trainable=True)
    captured = {}

    class Probe(SFTObjective):
        def __call__(self, m, batch):
            if not captured:
                captured.update({k: v.detach().clone() for k, v in item_tokens_of(m).state_dict().items()})
            return super().__call__(m, batch)

    ex = [{"prompt": [1, 5, -1, 6, -3], "answers": [[7, 8, 2]]}] * 8
    shutil.rmtree(out / "checkpoints" / "checkpoint-4")
    cfg.training.max_steps = 3
    train(model, ex, Probe(), cfg.training, out / "checkpoints")
    at_step2 = _projector(out / "checkpoints" / "checkpoint-2")
    for k, v in captured.items():
        assert torch.equal(v, at_step2[k]), k


# ---------------------------------------------------------------------- end to end through the CLI
def test_cli_sft_hybrid_trains_saves_reloads_and_evaluates(env, tmp_path, capsys):
    root, data_dir, model_dir = env
    cfg = tmp_path / "sft.yaml"
    cfg.write_text(
        f"model: {model_dir}\n"
        f"data: {{dataset: ml-100k, path: {data_dir}, split: llara, candidates: 5}}\n"
        "n_train: 16\nmax_history: 4\ndtype: float32\n"
        "training: {max_steps: 2, batch_size: 4, save_steps: 2, progress: false, learning_rate: 0.01}\n"
        "eval: {n_test: 5, protocols: [candidates, generation], max_new_tokens: 4}\n"
        "hybrid: {recommender_overrides: [epochs=2, early_stopping=false]}\n"
    )
    out = tmp_path / "run"
    args = [
        "sft",
        "--config",
        str(cfg),
        "--output",
        str(out),
        "hybrid.enabled=true",
        "lora.target_modules=all-linear",
    ]
    assert main(args) == 0
    assert (out / "adapter" / PROJECTOR_FILE).is_file()
    assert "enabled: true" in (out / "config.yaml").read_text()
    run_records = {r.protocol: r for r in read_records(out / "records.json")}

    # reloaded by `recalign evaluate`: the same rows score identically
    dest = tmp_path / "eval"
    eval_args = ["evaluate", "--model", str(out), "--dataset", "ml-100k", "--path", str(data_dir), "--split",
                 "llara", "--candidates", "5", "--n-test", "5", "--protocols", "candidates,generation",
                 "--max-new-tokens", "4", "--output", str(dest)]  # fmt: skip
    assert main(eval_args) == 0
    again = {r.protocol: r for r in read_records(dest / "records.json")}
    for protocol in ("candidates", "generation"):
        assert again[protocol].metrics == run_records[protocol].metrics
    assert again["generation"].extra.get("answers_sample") == run_records["generation"].extra.get(
        "answers_sample"
    )

    # the reloaded model carries the projector and its scores depend on it
    from recalign.data.prepare import DataPrepareConfig
    from recalign.lm.lora import load_lm
    from recalign.lm.recommender import LMRecommender
    from recalign.methods import load_data, sample_examples

    model, tok, _ = load_lm(out)
    assert has_item_tokens(model)
    data = load_data(DataPrepareConfig(dataset="ml-100k", path=str(data_dir), split="llara", candidates=5))
    rows = sample_examples(data.split.stage("test"), 5, 0, stage="test")
    rec = LMRecommender(model, tok, data.dataset, max_history=4, progress=False)
    with_tokens = rec.score_candidates(rows)
    with torch.no_grad():
        item_tokens_of(model).projector.item_out.bias.add_(1.0)
    assert not np.allclose(rec.score_candidates(rows), with_tokens)

    capsys.readouterr()
    assert main(["recommend", "--model", str(out), "--history", "Toy Story (1995)", "Heat (1995)", "-k", "3",
                 "--json"]) == 0  # fmt: skip
    assert len(json.loads(capsys.readouterr().out)) == 3

    # a damaged / mismatched projector file: one line naming it, exit 2
    proj = out / "adapter" / PROJECTOR_FILE
    good = proj.read_bytes()
    for bad in (good[: len(good) // 3], b"garbage" * 10):
        proj.write_bytes(bad)
        capsys.readouterr()
        assert main([*eval_args[:-1], str(tmp_path / "bad")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and PROJECTOR_FILE in err and "\n" not in err, err  # before loading
        assert main(["recommend", "--model", str(out), "--history", "Heat (1995)", "-k", "2"]) == 2
        err = capsys.readouterr().err.strip()
        assert PROJECTOR_FILE in err and "\n" not in err, err
    proj.write_bytes(good)
    meta = out / "adapter" / PROJECTOR_META
    record = json.loads(meta.read_text())
    meta.write_text(json.dumps({**record, "d_lm": 48}))
    capsys.readouterr()
    assert main([*eval_args[:-1], str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip()
    assert "d_lm" in err and PROJECTOR_FILE in err and "\n" not in err, err


# ---------------------------------------------------------------------- align --model <hybrid SFT run>
def test_align_from_hybrid_sft_uses_hybrid_prompts_and_keeps_the_projector(env, tmp_path, monkeypatch):
    import math

    import recalign.methods.align as align_mod
    from recalign.lm.lora import load_lm
    from recalign.methods.align import AlignConfig, run_align

    _, data_dir, model_dir = env
    sft_dir = tmp_path / "sft"
    run_sft(hybrid_cfg(data_dir, model_dir), sft_dir, progress=False)
    seen = []
    original = align_mod.build_examples

    def spy(*args, **kwargs):
        examples, pref = original(*args, **kwargs)
        seen.extend(examples)
        return examples, pref

    monkeypatch.setattr(align_mod, "build_examples", spy)
    losses = {}
    for mode in ("precomputed", "adapter-disabled"):
        cfg = load_config(
            AlignConfig,
            overrides={
                "model": str(sft_dir), "loss": "sdpo", "negatives": 3, "reference": mode,
                "data": {"dataset": "ml-100k", "path": str(data_dir), "split": "llara", "candidates": 5},
                "n_train": 8, "max_history": 4, "dtype": "float32",
                "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["all-linear"]},
                "training": {"learning_rate": 2e-2, "lr_scheduler": "constant", "max_steps": 2, "batch_size": 4,
                             "save_steps": 2, "logging_steps": 1, "progress": False},
                "eval": {"n_test": 4 if mode == "precomputed" else 0, "protocols": ["candidates"]},
            },
        )  # fmt: skip
        res = run_align(cfg, tmp_path / mode, progress=False)
        losses[mode] = [h["loss"] for h in res.log_history if "rewards/accuracies" in h]
    assert seen and all(min(ex["prompt"]) < 0 for ex in seen)  # preference prompts carry soft tokens
    # fresh adapter on the hybrid SFT model: policy == reference in both reference modes
    assert losses["precomputed"][0] == pytest.approx(math.log(4), abs=1e-3)
    assert losses["precomputed"] == pytest.approx(losses["adapter-disabled"], rel=1e-4)
    # the aligned run reloads (base -> SFT merged + projector -> S-DPO adapter) with the SFT projector,
    # which align kept frozen and saved beside its own adapter, and scores as it did in the run
    out = tmp_path / "precomputed"
    for k, v in _projector(out / "adapter").items():
        assert torch.equal(v, _projector(sft_dir / "adapter")[k]), k
    model, tok, _ = load_lm(out)
    assert has_item_tokens(model)
    from recalign.data.prepare import DataPrepareConfig
    from recalign.methods import load_data, sample_examples
    from recalign.methods.zeroshot import EvalConfig, evaluate_lm

    data = load_data(DataPrepareConfig(dataset="ml-100k", path=str(data_dir), split="llara", candidates=5))
    rows = sample_examples(data.split.stage("test"), 4, 0, stage="test")
    again = evaluate_lm(model, tok, data.dataset, rows, method="x", split_name="llara",
                        cfg=EvalConfig(n_test=4, protocols=["candidates"]), max_history=4, progress=False)  # fmt: skip
    assert again[0].metrics == pytest.approx(read_records(out / "records.json")[0].metrics)
