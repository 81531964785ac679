"""``recalign sft`` with hybrid item tokens under ``accelerate launch`` with 2 CPU processes gives the
1-process result (1 process x batch 4 against 2 processes x batch 2, same global batch).

The projector lives on the model, so DDP must all-reduce its gradients like the adapter's; what this
guards against: the projector's gradients not synchronised (each process would train its own copy),
the curriculum drawing per process instead of per example (other prompts per step), a non-main process
writing the projector. Measured on the tiny model (gloo sums in another order): the projectors differ
by at most 6.4e-7; atol 1e-5.
"""

from __future__ import annotations

import sys

import yaml
from _procs import TINY, accelerate_cmd, adapter_tensors, assert_same_tensors, recalign_cmd, run
from safetensors.torch import load_file

sys.path.insert(0, str(TINY))
import _lm_tiny  # noqa: E402

from recalign.lm.hybrid import PROJECTOR_FILE  # noqa: E402


def test_hybrid_sft_two_processes_match_one(tmp_path):
    data = _lm_tiny.write_ml100k_dir(tmp_path / "ml")
    model = _lm_tiny.write_tiny_model(tmp_path / "model")
    base = {
        "model": str(model), "dtype": "float32", "n_train": 16, "max_history": 4,
        "data": {"dataset": "ml-100k", "path": str(data), "split": "llara", "candidates": 5},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["all-linear"]},
        "eval": {"n_test": 0},
        "hybrid": {"enabled": True, "projector_hidden": 8, "curriculum": True,
                   "recommender_overrides": ["epochs=2", "early_stopping=false"]},
    }  # fmt: skip
    for name, batch in (("one", 4), ("two", 2)):
        training = {"max_steps": 3, "batch_size": batch, "save_steps": 3, "learning_rate": 0.03,
                    "lr_scheduler": "constant", "progress": False}  # fmt: skip
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({**base, "training": training}))
        args = ["sft", "--config", str(path), "--output", str(tmp_path / name)]
        run(recalign_cmd(*args) if name == "one" else accelerate_cmd(*args), timeout=600)
    one, two = tmp_path / "one", tmp_path / "two"
    assert (two / "checkpoints" / "checkpoint-3" / "rng_state_1.pth").is_file()  # really 2 processes
    projectors = [load_file(str(d / "adapter" / PROJECTOR_FILE)) for d in (one, two)]
    assert_same_tensors(*projectors, rtol=0, atol=1e-5)
    assert_same_tensors(adapter_tensors(one), adapter_tensors(two), rtol=0, atol=1e-5)
