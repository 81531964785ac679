"""Training commands under ``accelerate launch`` with 2 CPU processes give the 1-process result.

The comparison keeps the *global* batch fixed: 1 process x batch 4 against 2 processes x batch 2
(same examples per optimiser step, same data order: accelerate hands process k the k-th slice of
each global batch). What this guards against, each seen in this code base:

- an accelerate config that launches one process instead of two (the check that the 2-process run
  wrote per-process RNG states and a world size of 2 into its checkpoint);
- an objective that calls the scoring layer on the DDP-wrapped model: either an AttributeError, or,
  with the wrapper bypassed, no gradient all-reduce, so each process trains its own copy (the
  adapters then differ by ~1e-2, far outside the tolerance below);
- a loss averaged per process over a varying number of answer tokens instead of over the whole
  step's tokens (adapters differ by ~1e-3);
- an adapter initialised from an unseeded RNG (1- and 2-process runs start from different weights).

LoRA dropout is 0 here: dropout masks come from per-process RNG streams, which cannot match a single
process's stream, so with dropout the runs are equal only in distribution.

Tolerance: gloo all-reduces fp32 gradients (a sum over 2 processes, then / 2) where one process sums
over the batch in another order; each step differs by float rounding (~1e-7 relative). Adam divides
by sqrt(v) and can amplify such differences on near-zero gradients, but over 4 steps at lr 1e-2 the
measured drift is ~1e-8 absolute; atol 1e-5 is 1000x that and still 1000x below any of the bugs
listed above.
"""

from __future__ import annotations

import json
import sys

import pytest
import yaml
from _procs import TINY, accelerate_cmd, adapter_tensors, assert_same_tensors, run, step_losses

sys.path.insert(0, str(TINY))
import _lm_tiny  # noqa: E402

from recalign.cli.main import main  # noqa: E402

RTOL, ATOL = 1e-4, 1e-5


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale")
    return {
        "data": _lm_tiny.write_ml100k_dir(root / "ml"),
        "model": _lm_tiny.write_tiny_model(root / "model"),
        "root": root,
    }


def sft_config(tiny, path, **training):
    cfg = {
        "model": str(tiny["model"]),
        "data": {"dataset": "ml-100k", "path": str(tiny["data"]), "split": "llara", "candidates": 5},
        "n_train": 16,
        "max_history": 4,
        "lora": {"dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        "training": {
            "max_steps": 4, "batch_size": 4, "save_steps": 4, "logging_steps": 1, "progress": False,
            "learning_rate": 0.01, "warmup_steps": 0, "seed": 3,
        },
        "eval": {"n_test": 4, "protocols": ["candidates"]},
    }  # fmt: skip
    cfg["training"].update(training)
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_sft_two_processes_match_one(tiny, tmp_path):
    """``recalign sft`` 2 procs x batch 2 == 1 proc x batch 4: per-step losses, adapter, evaluation."""
    cfg = sft_config(tiny, tmp_path / "sft.yaml")
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["sft", "--config", str(cfg), "--output", str(one)]) == 0
    run(accelerate_cmd("sft", "--config", str(cfg), "--output", str(two), "training.batch_size=2"))

    # it really ran as 2 processes: one RNG state per process, world size 2 in the completeness marker
    ckpt = two / "checkpoints" / "checkpoint-4"
    assert (ckpt / "rng_state_0.pth").is_file() and (ckpt / "rng_state_1.pth").is_file()
    assert json.loads((ckpt / "recalign_checkpoint.json").read_text())["world_size"] == 2

    l1, l2 = step_losses(one / "checkpoints"), step_losses(two / "checkpoints")
    assert sorted(l1) == sorted(l2) == [1, 2, 3, 4]
    assert l1 == pytest.approx(l2, rel=RTOL, abs=ATOL)
    a1 = adapter_tensors(one)
    # it trained: LoRA B starts at zero, so the comparison is not between two untouched adapters
    assert max(t.abs().max().item() for k, t in a1.items() if "lora_B" in k) > 100 * ATOL
    assert_same_tensors(a1, adapter_tensors(two), rtol=RTOL, atol=ATOL)

    m1 = json.loads((one / "metrics.json").read_text())
    m2 = json.loads((two / "metrics.json").read_text())
    assert m1["run"]["train_steps"] == m2["run"]["train_steps"] == 4
    assert m1["run"]["train_loss"] == pytest.approx(m2["run"]["train_loss"], rel=RTOL, abs=ATOL)
    assert m1["metrics"] and m1["metrics"].keys() == m2["metrics"].keys()
    for k, v in m1["metrics"].items():
        assert v == pytest.approx(m2["metrics"][k], abs=1e-6), k
