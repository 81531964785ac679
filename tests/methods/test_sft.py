"""SFT on a tiny Llama: the objective is the answer-token NLL computed through ``answer_logprobs``, the
loss falls, the run directory has every promised output, and config problems are one-line errors."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
import _lm_tiny  # noqa: E402

from recalign.config import load_config  # noqa: E402
from recalign.data.prepare import DataPrepareConfig  # noqa: E402
from recalign.errors import RecalignInputError  # noqa: E402
from recalign.evaluation.records import read_records  # noqa: E402
from recalign.lm.lora import resolve_model  # noqa: E402
from recalign.methods import load_data, sample_examples  # noqa: E402
from recalign.methods.sft import SFTConfig, SFTObjective, run_sft  # noqa: E402


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return _lm_tiny.tiny_env(tmp_path_factory.mktemp("sft"))


def tiny_cfg(data_dir, model_dir, **training) -> SFTConfig:
    t = {**_lm_tiny.TINY_TRAINING, **training}
    return load_config(SFTConfig, overrides=_lm_tiny.sft_overrides(data_dir, model_dir, training=t))


def test_objective_is_token_mean_nll_matching_a_full_forward(env):
    from recalign.lm.loading import load_model

    _, _, model_dir = env
    model, tok = load_model(model_dir)
    prompts = [tok.encode("Toy Story (1995) Heat (1995) Answer:"), tok.encode("Fargo (1996) Answer:")]
    answers = [
        [tok.encode(" Babe (1995)", add_special_tokens=False)],
        [tok.encode(" Jaws", add_special_tokens=False)],
    ]
    loss, logs = SFTObjective()(model, {"prompt": prompts, "answers": answers})
    total, n = 0.0, 0
    for p, (a,) in zip(prompts, answers):
        logits = model(input_ids=torch.tensor([p + a])).logits[0, len(p) - 1 : -1]
        total += torch.nn.functional.cross_entropy(logits, torch.tensor(a), reduction="sum").item()
        n += len(a)
    assert loss.item() == pytest.approx(total / n, rel=1e-4)
    assert logs["answer_tokens"].item() == pytest.approx(n / 2)
    loss.backward()  # differentiable through the shared-prefix scorer
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_sft_loss_falls_and_run_dir_is_complete(env, tmp_path):
    _, data_dir, model_dir = env
    cfg = tiny_cfg(data_dir, model_dir)
    res = run_sft(cfg, tmp_path / "run", command="recalign sft test", progress=False)
    nll = [h["nll"] for h in res.log_history if "nll" in h]
    assert len(nll) == 12
    first, last = sum(nll[:3]) / 3, sum(nll[-3:]) / 3
    assert last < first - 0.7, nll  # the answer NLL falls clearly ...
    assert last < math.log(400) - 0.4, nll  # ... below the uniform-distribution level
    out = tmp_path / "run"
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert not list(out.rglob("*.bin"))  # safetensors / JSON only
    assert (out / "config.yaml").is_file() and "n_train: 32" in (out / "config.yaml").read_text()
    records = read_records(out / "records.json")
    assert {r.protocol for r in records} == {"candidates", "generation"}
    assert all(r.method == "sft" and r.n_examples == 8 and r.command == "recalign sft test" for r in records)
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["metrics"]["candidates/HR@1"] <= 1.0
    assert "generation/ValidRatio" in metrics["metrics"]
    assert metrics["run"]["train_steps"] == 12 and metrics["run"]["n_train"] == 32
    src = resolve_model(out)  # the run dir is a loadable model that remembers its base
    assert src.adapter == out / "adapter" and src.base == str(model_dir)


def test_existing_checkpoints_need_resume(env, tmp_path):
    _, data_dir, model_dir = env
    cfg = tiny_cfg(data_dir, model_dir, max_steps=2, save_steps=2)
    cfg.eval.n_test = 0
    run_sft(cfg, tmp_path / "run", progress=False)
    with pytest.raises(RecalignInputError, match="--resume"):
        run_sft(cfg, tmp_path / "run", progress=False)
    cfg.training.resume = True
    cfg.n_train = 16  # resuming with different data is refused, not mixed
    with pytest.raises(RecalignInputError, match="n_train"):
        run_sft(cfg, tmp_path / "run", progress=False)


def test_config_validation_is_one_line(env):
    with pytest.raises(RecalignInputError, match="unknown key 'training.lr'"):
        load_config(SFTConfig, overrides=["training.lr=0.1"])
    with pytest.raises(RecalignInputError, match="lora.r"):
        load_config(SFTConfig, overrides=["lora.r=0"])
    with pytest.raises(RecalignInputError, match="eval.protocols"):
        load_config(SFTConfig, overrides=["eval.protocols=candidates,beam"])


def test_sample_examples_is_seeded_and_stable(env):
    _, data_dir, _ = env
    data = load_data(DataPrepareConfig(dataset="ml-100k", path=str(data_dir), split="llara", candidates=5))
    train = data.split.stage("train")
    a = sample_examples(train, 20, seed=0, stage="train")
    b = sample_examples(train, 20, seed=0, stage="train")
    c = sample_examples(train, 20, seed=1, stage="train")
    assert a[["user", "position"]].equals(b[["user", "position"]])
    assert not a[["user", "position"]].equals(c[["user", "position"]])
    assert len(sample_examples(train, 0, seed=0, stage="train")) == len(train)


def test_partial_nested_override_keeps_recipe_defaults():
    """``data.seed=1`` must not reset the recipe's ``data.split=llara`` to the class default ``loo``."""
    cfg = load_config(SFTConfig, overrides=["data.seed=1", "training.max_steps=3"])
    assert (cfg.data.split, cfg.data.seed) == ("llara", 1)
    assert (cfg.training.max_steps, cfg.training.learning_rate) == (3, SFTConfig().training.learning_rate)
