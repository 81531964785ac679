"""Runs killed at a random point resume from their last *complete* checkpoint to the same result.

Why: ``--resume`` is only useful if (a) what a killed run leaves behind never looks more complete than
it is, and (b) continuing from it reproduces the uninterrupted run. Trainer writes ``checkpoint-N``
file by file (weights, optimizer, scheduler, RNG states, ``trainer_state.json``) and rotates old
checkpoints away; a SIGKILL can land between any two of those writes. recalign marks a checkpoint
complete (``recalign_checkpoint.json``, write-then-rename) only after every file of every process is
written, resumes only from marked checkpoints, and rotates only after marking.

- ``test_killed_at_random_step_*``: ``recalign sft`` / ``recalign align`` (S-DPO, K=3) in a
  subprocess, SIGKILLed after a random checkpoint; what it left is inspected, an interrupted save is
  planted on top (the state a kill *during* the next save leaves), then ``--resume`` must end with
  the losses, adapter and metrics of an uninterrupted run with the same seed. LoRA dropout is on, so
  the RNG state must be restored too.
- ``test_crash_inside_checkpoint_save_*``: the same guarantee at the training layer, with the crash
  placed deterministically between ``trainer_state.json`` and the marker, and ``save_total_limit=1``
  (the previous checkpoint must survive until the new one is complete).

Tolerance: the killed run is a child process with one thread, the reference and the resumed run run
in the test process (more threads): matmul reductions may split differently, so results agree to
float rounding (observed ~1e-7), not bitwise; atol 1e-5 is far below what a wrong resume causes
(skipped or repeated batches, reset optimizer or RNG: differences ~1e-3 and up).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from _procs import (
    TINY,
    adapter_tensors,
    assert_same_tensors,
    child_env,
    float32_option,
    recalign_cmd,
    step_losses,
)
from safetensors.torch import load_file

sys.path.insert(0, str(TINY))
import _lm_tiny  # noqa: E402

import recalign.training.trainer as trainer_mod  # noqa: E402
from recalign.cli.main import main  # noqa: E402
from recalign.lm.loading import build_tiny_llama  # noqa: E402
from recalign.lm.lora import LoRAConfig, attach_lora  # noqa: E402
from recalign.methods.align import AlignConfig  # noqa: E402
from recalign.methods.sft import SFTObjective  # noqa: E402
from recalign.training import (  # noqa: E402
    TrainingConfig,
    find_resume_checkpoint,
    is_complete_checkpoint,
    list_checkpoints,
    train,
)

RTOL, ATOL = 1e-4, 1e-5
MAX_STEPS = 10


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    return {
        "data": _lm_tiny.write_ml100k_dir(root / "ml"),
        "model": _lm_tiny.write_tiny_model(root / "model"),
    }


def write_config(tiny, path, command):
    cfg = {
        "model": str(tiny["model"]),
        "data": {"dataset": "ml-100k", "path": str(tiny["data"]), "split": "llara", "candidates": 5},
        "n_train": 16,  # 4 batches per epoch: 10 steps cross 2 epoch boundaries
        "max_history": 4,
        "lora": {"dropout": 0.1},
        "training": {
            "max_steps": MAX_STEPS, "batch_size": 4, "save_steps": 1, "save_total_limit": 2,
            "logging_steps": 1, "progress": False, "learning_rate": 0.01, "seed": 5,
        },
        "eval": {"n_test": 4, "protocols": ["candidates"]},
    }  # fmt: skip
    if command == "sft":
        cfg["dtype"] = "float32"  # bfloat16 ("auto" on some CPUs) agrees across thread counts less tightly
    else:  # S-DPO, K=3, reference log-probs precomputed by the killed run and reused on resume
        cfg.update(loss="sdpo", negatives=3, strategy="random", **float32_option(AlignConfig))
    path.write_text(yaml.safe_dump(cfg))
    return path


def kill_after_checkpoint(cmd, ckpt_dir, step, timeout=240.0) -> int:
    """Start ``cmd``, SIGKILL it as soon as a complete checkpoint >= ``step`` exists; its return code."""
    proc = subprocess.Popen(cmd, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            done = [c for c in list_checkpoints(ckpt_dir) if is_complete_checkpoint(c)]
            if done and int(done[-1].name.split("-")[1]) >= step:
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.005)
    finally:
        if proc.poll() is None and time.monotonic() >= deadline:
            proc.kill()
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"not killed (exit {proc.returncode}): {err.decode()[-2000:]}"
    return proc.returncode


def check_left_behind(run_dir):
    """Everything a killed run left either is complete or does not claim to be."""
    assert not (run_dir / "metrics.json").exists() and not (run_dir / "records.json").exists()
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["training"]["max_steps"] == MAX_STEPS
    for c in list_checkpoints(run_dir / "checkpoints"):
        if not is_complete_checkpoint(c):
            continue
        marker = json.loads((c / "recalign_checkpoint.json").read_text())
        assert marker["global_step"] == int(c.name.split("-")[1])
        assert all((c / f).is_file() for f in marker["files"]), c
        assert json.loads((c / "trainer_state.json").read_text())["global_step"] == marker["global_step"]
        assert load_file(str(c / "adapter_model.safetensors"))  # weights readable, not truncated
        torch.load(c / "optimizer.pt", weights_only=True)


def plant_interrupted_save(ckpt_dir):
    """``checkpoint-(N+1)`` as a kill in the middle of saving it leaves it: files partly written,
    ``trainer_state.json`` cut in half, no marker. Returns its path."""
    last = find_resume_checkpoint(ckpt_dir, resume=True)
    step = int(last.name.split("-")[1]) + 1
    bad = ckpt_dir / f"checkpoint-{step}"
    shutil.rmtree(bad, ignore_errors=True)
    shutil.copytree(last, bad)
    (bad / "recalign_checkpoint.json").unlink()
    state = (bad / "trainer_state.json").read_bytes()
    (bad / "trainer_state.json").write_bytes(state[: len(state) // 2])
    (bad / "adapter_model.safetensors").write_bytes(b"")
    return bad


@pytest.mark.parametrize("command", ["sft", "align"])
def test_killed_at_random_step_resumes_to_the_uninterrupted_result(tiny, tmp_path, capsys, command):
    cfg = write_config(tiny, tmp_path / f"{command}.yaml", command)
    killed, ref = tmp_path / "killed", tmp_path / "ref"
    step = random.randrange(2, MAX_STEPS - 3)
    print(f"killing {command} after checkpoint {step}")  # shown on failure, to reproduce
    kill_after_checkpoint(
        recalign_cmd(command, "--config", str(cfg), "--output", str(killed)), killed / "checkpoints", step
    )
    check_left_behind(killed)
    resume_from = find_resume_checkpoint(killed / "checkpoints", resume=True)
    assert resume_from is not None and int(resume_from.name.split("-")[1]) >= step
    plant_interrupted_save(killed / "checkpoints")
    # without --resume the directory is refused; with it, training continues from `resume_from`
    assert main([command, "--config", str(cfg), "--output", str(killed)]) == 2
    assert main([command, "--config", str(cfg), "--output", str(killed), "--resume"]) == 0
    out = capsys.readouterr().out
    assert f"resumed from {resume_from}" in out, out
    assert main([command, "--config", str(cfg), "--output", str(ref)]) == 0

    lk, lr = step_losses(killed / "checkpoints"), step_losses(ref / "checkpoints")
    assert sorted(lk) == sorted(lr) == list(range(1, MAX_STEPS + 1))
    assert lk == pytest.approx(lr, rel=RTOL, abs=ATOL)
    assert_same_tensors(adapter_tensors(killed), adapter_tensors(ref), rtol=RTOL, atol=ATOL)
    mk = json.loads((killed / "metrics.json").read_text())
    mr = json.loads((ref / "metrics.json").read_text())
    assert mk["run"]["train_steps"] == mr["run"]["train_steps"] == MAX_STEPS
    # the whole run's mean loss, not just the mean over the steps run after resuming
    assert mk["run"]["train_loss"] == pytest.approx(mr["run"]["train_loss"], rel=RTOL, abs=ATOL)
    assert mk["metrics"] == pytest.approx(mr["metrics"], abs=1e-6)
    assert all(is_complete_checkpoint(c) for c in list_checkpoints(killed / "checkpoints"))


# ---------------------------------------------------------------------- training layer, deterministic crash
class Crash(Exception):
    pass


def _examples(tok):
    titles = _lm_tiny.TITLES
    return [
        {
            "prompt": tok(f"After {titles[i]} and {titles[i + 1]} the user watched")["input_ids"],
            "answers": [tok(" " + titles[i + 2], add_special_tokens=False)["input_ids"]],
        }
        for i in range(12)
    ]


def _model(tok):
    torch.manual_seed(0)
    model = build_tiny_llama(tok, hidden_size=32, num_layers=1, num_heads=2, seed=0)
    _lm_tiny.widen_embeddings(model)
    torch.manual_seed(1)
    return attach_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.1))


def test_crash_inside_checkpoint_save_is_skipped_and_previous_survives(tmp_path, monkeypatch):
    tok = _lm_tiny.tiny_tokenizer()
    examples = _examples(tok)
    cfg = TrainingConfig(
        learning_rate=1e-2, max_steps=6, batch_size=4, save_steps=1, save_total_limit=1,
        logging_steps=1, progress=False, seed=2,
    )  # fmt: skip
    ref_model = _model(tok)
    train(ref_model, examples, SFTObjective(), cfg, tmp_path / "ref")

    real_write = trainer_mod.atomic_write_json

    def crash_at_step_4(path, obj):
        if obj.get("global_step") == 4:
            raise Crash  # after every file of checkpoint-4, before its completeness marker
        real_write(path, obj)

    monkeypatch.setattr(trainer_mod, "atomic_write_json", crash_at_step_4)
    with pytest.raises(Crash):
        train(_model(tok), examples, SFTObjective(), cfg, tmp_path / "run")
    monkeypatch.setattr(trainer_mod, "atomic_write_json", real_write)

    ckpts = list_checkpoints(tmp_path / "run")
    # checkpoint-3 survived although save_total_limit=1: rotation waits for checkpoint-4's marker
    assert [c.name for c in ckpts] == ["checkpoint-3", "checkpoint-4"]
    assert (ckpts[1] / "trainer_state.json").is_file() and not is_complete_checkpoint(ckpts[1])
    assert find_resume_checkpoint(tmp_path / "run", resume=True) == ckpts[0]

    model = _model(tok)
    cfg.resume = True
    out = train(model, examples, SFTObjective(), cfg, tmp_path / "run")
    assert out.resumed_from == ckpts[0] and out.global_step == 6
    assert [c.name for c in list_checkpoints(tmp_path / "run")] == ["checkpoint-6"]
    want = {k: v for k, v in ref_model.state_dict().items() if "lora_" in k}
    got = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert_same_tensors(want, got, rtol=1e-5, atol=1e-6)  # same process and threads: rounding only
