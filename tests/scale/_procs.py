"""Helpers for the multi-process and kill-and-resume tests: launching, environments, comparing runs.

Why subprocesses at all: ``accelerate launch`` is what users run, and a SIGKILL can only be tested on
a real process. Every child gets an offline, single-threaded environment (no hub access, no thread
oversubscription on a shared 2-core machine) and a free rendezvous port (so two test sessions on one
machine never collide on accelerate's default port 29500).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]
CPU_2PROC = REPO / "configs" / "accelerate" / "cpu_2proc.yaml"
TINY = REPO / "tests" / "training"  # _lm_tiny.py: tiny ML-100K-format data and tiny Llama on disk


def child_env(threads: int = 1) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        PYTHONUNBUFFERED="1",
    )
    env.pop("WORLD_SIZE", None)  # never inherit a distributed setup from the test runner
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def recalign_cmd(*args: str) -> list[str]:
    """``recalign ARGS`` in one process, with this interpreter."""
    return [sys.executable, "-m", "recalign.cli.main", *args]


def accelerate_cmd(*args: str, config: Path = CPU_2PROC) -> list[str]:
    """``accelerate launch --config_file CONFIG -m recalign.cli.main ARGS``."""
    return [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(config), "--main_process_port", str(free_port()),
        "-m", "recalign.cli.main", *args,
    ]  # fmt: skip


def run(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    return proc


def adapter_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def step_losses(checkpoint_dir: Path) -> dict[int, float]:
    """Logged training loss per optimiser step (``trainer_state.json`` written at the end of training)."""
    state = json.loads((checkpoint_dir / "trainer_state.json").read_text())
    return {h["step"]: h["loss"] for h in state["log_history"] if "loss" in h}


def float32_option(config_cls: type) -> dict:
    """``{"dtype": "float32"}`` if the recipe's config has a dtype field (its default, "auto", means
    bfloat16 on CPUs that run it natively, and bfloat16 runs agree only to bfloat16 precision)."""
    import dataclasses

    return {"dtype": "float32"} if "dtype" in {f.name for f in dataclasses.fields(config_cls)} else {}


def assert_same_tensors(a: dict, b: dict, *, rtol: float, atol: float) -> None:
    assert a.keys() == b.keys() and a, "adapters hold different (or no) tensors"
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=lambda m, k=k: f"{k}: {m}")
