"""Preference alignment on a tiny Llama: the objective's numbers, the reference modes, and the recipe."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
import _lm_tiny  # noqa: E402

from recalign.cli.main import main  # noqa: E402
from recalign.config import load_config  # noqa: E402
from recalign.errors import RecalignInputError  # noqa: E402
from recalign.evaluation.records import read_records  # noqa: E402
from recalign.lm.lora import LoRAConfig, attach_lora, load_lm  # noqa: E402
from recalign.lm.scoring import answer_logprobs, naive_answer_logprobs  # noqa: E402
from recalign.methods.align import AlignConfig, PreferenceObjective, run_align  # noqa: E402
from recalign.methods.sft import SFTConfig, run_sft  # noqa: E402


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("align")
    data_dir = _lm_tiny.write_ml100k_dir(root / "ml")
    model_dir = _lm_tiny.write_tiny_model(root / "model")
    return root, data_dir, model_dir


def _batch(tok):
    prompts = [tok.encode("Toy Story (1995) Heat (1995) Answer:"), tok.encode("Fargo (1996) Answer:")]
    titles = [[" Babe (1995)", " Jaws", " Heat (1995)", " Fargo"], [" Jaws", " Babe (1995)", " Toy", " Heat"]]
    answers = [[tok.encode(t, add_special_tokens=False) for t in row] for row in titles]
    return prompts, answers


def test_objective_matches_hand_formula_on_naive_logprobs(env):
    from recalign.lm.loading import load_model

    model, tok = load_model(env[2])
    prompts, answers = _batch(tok)
    with torch.no_grad():
        policy = naive_answer_logprobs(model, prompts, answers).sum  # [2, 4]
    ref = torch.tensor([[-5.0, -6.0, -7.0, -8.0], [-4.0, -4.5, -9.0, -3.0]])
    loss, logs = PreferenceObjective("sdpo", beta=0.5)(
        model, {"prompt": prompts, "answers": answers, "ref": ref}
    )
    r = policy - ref  # implicit rewards; S-DPO row loss = log(1 + sum_i exp(beta (r_i - r_w)))
    expected = torch.log1p(torch.exp(0.5 * (r[:, 1:] - r[:, :1])).sum(1)).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)
    assert logs["rewards/chosen"] == pytest.approx((0.5 * r[:, 0]).mean().item(), rel=1e-4)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("loss_name, k, expected", [("sdpo", 3, math.log(4)), ("dpo", 1, math.log(2))])
def test_fresh_adapter_disabled_reference_gives_zero_rewards(env, loss_name, k, expected):
    """A new LoRA adapter starts as the identity (B = 0): policy == reference, every reward is 0, so
    S-DPO's loss is log(1 + K) and DPO's log 2, exactly."""
    from recalign.lm.loading import load_model

    model, tok = load_model(env[2])
    torch.manual_seed(0)
    model = attach_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"]))
    prompts, answers = _batch(tok)
    answers = [a[: 1 + k] for a in answers]
    loss, logs = PreferenceObjective(loss_name, beta=1.0)(model, {"prompt": prompts, "answers": answers})
    assert loss.item() == pytest.approx(expected, abs=1e-5)
    assert logs["rewards/margins"] == pytest.approx(0.0, abs=1e-5)


def test_dmpo_adds_token_mean_nll_of_the_chosen(env):
    from recalign.lm.loading import load_model

    model, tok = load_model(env[2])
    prompts, answers = _batch(tok)
    with torch.no_grad():
        scores = answer_logprobs(model, prompts, answers)
    ref = scores.sum.clone()  # reference == policy: the preference part is log 2 per row
    loss, _ = PreferenceObjective("dmpo", beta=1.0, nll_weight=2.0)(
        model, {"prompt": prompts, "answers": answers, "ref": ref}
    )
    nll = (-scores.sum[:, 0] / scores.n_tokens[:, 0]).mean().item()
    assert loss.item() == pytest.approx(math.log(2) + 2.0 * nll, rel=1e-4)


def _tiny_sft(env, out):
    _, data_dir, model_dir = env
    cfg = load_config(
        SFTConfig,
        overrides={
            "model": str(model_dir),
            "data": {"dataset": "ml-100k", "path": str(data_dir), "split": "llara", "candidates": 5},
            "n_train": 24,
            "max_history": 4,
            "dtype": "float32",
            "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["all-linear"]},
            "training": {
                "learning_rate": 3e-2,
                "max_steps": 6,
                "batch_size": 4,
                "save_steps": 6,
                "progress": False,
            },
            "eval": {"n_test": 0},
        },
    )
    run_sft(cfg, out, progress=False)
    return out


def _align_cfg(env, start, **over) -> AlignConfig:
    _, data_dir, _ = env
    o = {
        "model": str(start),
        "loss": "sdpo",
        "negatives": 3,
        "data": {"dataset": "ml-100k", "path": str(data_dir), "split": "llara", "candidates": 5},
        "n_train": 16,
        "max_history": 4,
        "beta": 1.0,
        "dtype": "float32",
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["all-linear"]},
        "training": {
            "learning_rate": 2e-2,
            "lr_scheduler": "constant",
            "max_steps": 8,
            "batch_size": 4,
            "save_steps": 4,
            "logging_steps": 1,
            "progress": False,
        },
        "eval": {"n_test": 6, "protocols": ["candidates"]},
    }
    o.update(over)
    return load_config(AlignConfig, overrides=o)


def test_sdpo_from_sft_learns_preferences_and_reloads_as_stacked_adapter(env, tmp_path):
    sft_dir = _tiny_sft(env, tmp_path / "sft")
    res = run_align(
        _align_cfg(env, sft_dir), tmp_path / "sdpo", command="recalign align test", progress=False
    )
    losses = [h["loss"] for h in res.log_history if "rewards/accuracies" in h]
    assert len(losses) == 8
    assert losses[0] == pytest.approx(math.log(4), abs=1e-3)  # fresh adapter on the reference
    assert sum(losses[-2:]) / 2 < losses[0] - 0.3, losses
    out = tmp_path / "sdpo"
    assert (out / "reference").is_dir() and list((out / "reference").glob("*.safetensors"))
    records = read_records(out / "records.json")
    assert [r.method for r in records] == ["sdpo-k3"] and records[0].n_examples == 6
    meta = json.loads((out / "metrics.json").read_text())
    assert meta["run"]["loss"] == "sdpo" and meta["run"]["train_steps"] == 8
    # reload: base -> SFT adapter merged -> S-DPO adapter, same scores as the in-memory model had
    from recalign.methods import sample_examples
    from recalign.methods.zeroshot import EvalConfig, evaluate_lm

    model, tok, src = load_lm(out)
    assert src.base == str(sft_dir.resolve())
    from recalign.data.prepare import DataPrepareConfig
    from recalign.methods import load_data

    data = load_data(DataPrepareConfig(dataset="ml-100k", path=str(env[1]), split="llara", candidates=5))
    test = sample_examples(data.split.stage("test"), 6, 0, stage="test")
    again = evaluate_lm(model, tok, data.dataset, test, method="x", split_name="llara",
                        cfg=EvalConfig(n_test=6, protocols=["candidates"]), max_history=4, progress=False)  # fmt: skip
    assert again[0].metrics == pytest.approx(records[0].metrics)


def test_reference_modes_agree_on_the_first_step(env, tmp_path):
    sft_dir = _tiny_sft(env, tmp_path / "sft")
    runs = {}
    for mode in ("precomputed", "adapter-disabled"):
        cfg = _align_cfg(env, sft_dir, reference=mode, loss="dmpo", eval={"n_test": 0})
        cfg.training.max_steps = 2
        runs[mode] = run_align(cfg, tmp_path / mode, progress=False).log_history
    a = [h["loss"] for h in runs["precomputed"] if "rewards/accuracies" in h]
    b = [h["loss"] for h in runs["adapter-disabled"] if "rewards/accuracies" in h]
    assert a == pytest.approx(b, rel=1e-4)


def test_cli_rejects_dpo_with_several_negatives(capsys):
    assert main(["align", "--loss", "dpo", "--negatives", "3", "--output", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "negatives=1" in err


def test_config_rejects_unknown_keys():
    with pytest.raises(RecalignInputError, match="unknown key 'betta'"):
        load_config(AlignConfig, overrides=["betta=1"])
