"""A run SIGKILLed *while a checkpoint is being written* resumes from the previous complete one.

Why this on top of tests/scale/test_kill_resume.py: there the kill lands after a checkpoint (and an
interrupted save is planted by hand, or the crash is an exception in the test process). Here a real
``recalign sft`` process is stopped *inside* Trainer's save, at two points chosen deterministically by
the launcher tests/scale/_pause_in_save.py: halfway through ``optimizer.pt`` (new adapter weights on
disk, half the optimizer state, no RNG state or trainer state yet) and after every file but the
completeness marker. While it hangs there it is a live run holding its output directory, so:

1. a second run into the same directory is refused (exit 2, one line naming the holder's pid) and
   writes nothing there: two runs never interleave checkpoints;
2. the process is SIGKILLed at that point; what it left is a complete ``checkpoint-(N-1)`` (kept
   although ``save_total_limit=1``: rotation waits for the new marker), an unmarked
   ``checkpoint-N`` and its lock file with its pid;
3. ``--resume`` takes the stale lock over (one ``note:`` line naming the dead pid), continues from
   ``checkpoint-(N-1)`` and ends with the per-step losses, mean loss and adapter of an uninterrupted
   run with the same seed; the lock file is gone afterwards.

Tolerances as in test_kill_resume.py (the killed child runs one thread, the test process more).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from _procs import REPO, TINY, adapter_tensors, assert_same_tensors, child_env, step_losses

sys.path.insert(0, str(TINY))
import _lm_tiny  # noqa: E402

from recalign.cli.main import main  # noqa: E402
from recalign.rundir import LOCK_NAME, read_lock  # noqa: E402
from recalign.training import find_resume_checkpoint, is_complete_checkpoint, list_checkpoints  # noqa: E402

RTOL, ATOL = 1e-4, 1e-5
MAX_STEPS = 8
PAUSE_AT = 5
LAUNCHER = Path(__file__).resolve().parent / "_pause_in_save.py"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill-in-save")
    cfg = {
        "model": str(_lm_tiny.write_tiny_model(root / "model")),
        "data": {"dataset": "ml-100k", "path": str(_lm_tiny.write_ml100k_dir(root / "ml")), "split": "llara",
                 "candidates": 5},
        "n_train": 16,  # 4 batches per epoch: the pause (step 5) falls in the second epoch
        "max_history": 4,
        "dtype": "float32",
        "lora": {"dropout": 0.1},  # the RNG state matters on resume
        "training": {
            "max_steps": MAX_STEPS, "batch_size": 4, "save_steps": 1, "save_total_limit": 1,
            "logging_steps": 1, "progress": False, "learning_rate": 0.01, "seed": 5,
        },
        "eval": {"n_test": 4, "protocols": ["candidates"]},
    }  # fmt: skip
    config = root / "sft.yaml"
    config.write_text(yaml.safe_dump(cfg))
    ref = root / "ref"
    assert main(["sft", "--config", str(config), "--output", str(ref)]) == 0  # uninterrupted
    return {"root": root, "config": config, "ref": ref}


def start_paused(config: Path, out: Path, point: str, flag: Path, timeout: float = 240.0) -> subprocess.Popen:
    """``recalign sft`` in a child process, returned once it hangs inside the save of checkpoint-PAUSE_AT."""
    env = {**child_env(), "RECALIGN_TEST_PAUSE": f"{point}:{PAUSE_AT}:{flag}"}
    cmd = [sys.executable, str(LAUNCHER), "sft", "--config", str(config), "--output", str(out)]
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    while not flag.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            _, err = proc.communicate(timeout=60)
            pytest.fail(f"child never paused (exit {proc.returncode}): {err.decode()[-3000:]}")
        time.sleep(0.01)
    return proc


@pytest.mark.parametrize("point", ["optimizer", "marker"])
def test_sigkill_inside_checkpoint_save_resumes_to_the_uninterrupted_result(setup, tmp_path, capsys, point):
    config, ref = setup["config"], setup["ref"]
    out = tmp_path / "run"
    ckpts = out / "checkpoints"
    proc = start_paused(config, out, point, tmp_path / "paused")
    try:
        # 1. while it is alive, a second run into its directory is refused and changes nothing
        before = sorted(p.name for p in ckpts.iterdir())
        assert read_lock(out)["pid"] == proc.pid
        capsys.readouterr()
        assert main(["sft", "--config", str(config), "--output", str(out), "--resume"]) == 2
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {out}: held by another recalign run "), lines
        assert f"(pid {proc.pid}, " in lines[0] and captured.out == ""
        assert sorted(p.name for p in ckpts.iterdir()) == before
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL

    # 2. what the kill inside the save left behind
    names = [c.name for c in list_checkpoints(ckpts)]
    assert names == [f"checkpoint-{PAUSE_AT - 1}", f"checkpoint-{PAUSE_AT}"], names
    previous, broken = list_checkpoints(ckpts)
    assert is_complete_checkpoint(previous) and not is_complete_checkpoint(broken)
    assert (broken / "adapter_model.safetensors").is_file()  # the new weights were written first
    if point == "optimizer":  # cut short: half the optimizer state, nothing after it
        half = (broken / "optimizer.pt").stat().st_size
        assert 0 < half < (previous / "optimizer.pt").stat().st_size
        assert not (broken / "trainer_state.json").exists() and not (broken / "rng_state.pth").exists()
    else:  # every file but the marker
        assert (broken / "rng_state.pth").is_file() and (broken / "optimizer.pt").is_file()
        assert json.loads((broken / "trainer_state.json").read_text())["global_step"] == PAUSE_AT
    assert find_resume_checkpoint(ckpts, resume=True) == previous
    assert read_lock(out)["pid"] == proc.pid  # a stale lock: its holder is dead
    assert not (out / "metrics.json").exists()

    # 3. --resume takes the stale lock over and finishes like the uninterrupted run
    assert main(["sft", "--config", str(config), "--output", str(out), "--resume"]) == 0
    captured = capsys.readouterr()
    assert f"note: {out}: took over the stale lock of pid {proc.pid} (no longer running)" in captured.err
    assert f"resumed from {previous}" in captured.out, captured.out
    assert not (out / LOCK_NAME).exists()

    lk, lr = step_losses(ckpts), step_losses(ref / "checkpoints")
    assert sorted(lk) == sorted(lr) == list(range(1, MAX_STEPS + 1))
    assert lk == pytest.approx(lr, rel=RTOL, abs=ATOL)
    assert_same_tensors(adapter_tensors(out), adapter_tensors(ref), rtol=RTOL, atol=ATOL)
    mk = json.loads((out / "metrics.json").read_text())["run"]
    mr = json.loads((ref / "metrics.json").read_text())["run"]
    assert mk["train_steps"] == mr["train_steps"] == MAX_STEPS
    assert mk["train_loss"] == pytest.approx(mr["train_loss"], rel=RTOL, abs=ATOL)
    assert [c.name for c in list_checkpoints(ckpts)] == [f"checkpoint-{MAX_STEPS}"]
    assert all(is_complete_checkpoint(c) for c in list_checkpoints(ckpts))
