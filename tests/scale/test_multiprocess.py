"""Training commands under ``accelerate launch`` with 2 CPU processes give the 1-process result.

Covered: ``recalign sft``, ``recalign align`` (S-DPO, K=3) and ``recalign knowledge`` (MIM, BPR,
retrieval, ranking mixture on a tiny-llama built by the main process). All three run in ONE
``accelerate launch`` of tests/scale/_cli_sequence.py, which feeds each argument list to the CLI's
``main`` in turn (start-up and rendezvous paid once); the 1-process references run in the test process
through the same ``main``. ``cllm4rec``, ``dpo4rec`` and ``baseline`` are covered by
test_multiprocess_methods.py.

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
from pathlib import Path

import pytest
import yaml
from _procs import (
    CPU_2PROC,
    TINY,
    adapter_tensors,
    assert_same_tensors,
    float32_option,
    free_port,
    run,
    step_losses,
)

sys.path.insert(0, str(TINY))
import _lm_tiny  # noqa: E402

from recalign.cli.main import main  # noqa: E402
from recalign.methods.align import AlignConfig  # noqa: E402

RTOL, ATOL = 1e-4, 1e-5
TRAINING = {
    "max_steps": 4, "batch_size": 4, "save_steps": 4, "logging_steps": 1, "progress": False,
    "learning_rate": 0.01, "warmup_steps": 0, "seed": 3,
}  # fmt: skip


def _configs(root: Path, data: Path, model: Path) -> dict[str, Path]:
    common = {
        "model": str(model),
        "data": {"dataset": "ml-100k", "path": str(data), "split": "llara", "candidates": 5},
        "n_train": 16,  # 4 steps x global batch 4: one epoch, no partial batch
        "max_history": 4,
        "lora": {"dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        "training": TRAINING,
        "eval": {"n_test": 4, "protocols": ["candidates"]},
    }
    paths = {"sft": root / "sft.yaml", "align": root / "align.yaml", "knowledge": root / "knowledge.yaml"}
    # float32 base weights: with dtype "auto" (bfloat16 on CPUs that run it natively) the runs agree
    # only to bfloat16 precision, since the two layouts round activations in different places
    paths["sft"].write_text(yaml.safe_dump({**common, "dtype": "float32"}))
    paths["align"].write_text(
        yaml.safe_dump(
            {**common, "loss": "sdpo", "negatives": 3, "strategy": "random", **float32_option(AlignConfig)}
        )
    )
    knowledge = {k: v for k, v in common.items() if k not in ("n_train", "max_history", "eval")}
    knowledge.update(
        tasks=["mim", "bpr", "retrieval", "ranking"], ratios=[1, 1, 1, 1], history_len=4, dtype="float32",
        # built (tokenizer trained on the mixture, weights seeded) and saved by the main process only;
        # the default mixture size, max_steps x the GLOBAL batch, is 16 in both runs
        model="tiny-llama", tiny_hidden=32,
        eval={"tasks": ["ranking"], "n_users": 4},
    )  # fmt: skip
    paths["knowledge"].write_text(yaml.safe_dump(knowledge))
    return paths


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every command once with 1 process x batch 4 (in-process) and once with 2 processes x batch 2."""
    root = tmp_path_factory.mktemp("scale")
    data = _lm_tiny.write_ml100k_dir(root / "ml")
    model = _lm_tiny.write_tiny_model(root / "model")
    cfgs = _configs(root, data, model)
    for cmd, cfg in cfgs.items():
        assert main([cmd, "--config", str(cfg), "--output", str(root / f"{cmd}-1proc")]) == 0
    sequence = [
        [cmd, "--config", str(cfg), "--output", str(root / f"{cmd}-2proc"), "training.batch_size=2"]
        for cmd, cfg in cfgs.items()
    ]
    launch = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_2PROC),
        "--main_process_port", str(free_port()), str(Path(__file__).parent / "_cli_sequence.py"),
        json.dumps(sequence),
    ]  # fmt: skip
    (root / "launch.log").write_text(run(launch).stdout)
    return root


def assert_two_match_one(one: Path, two: Path) -> None:
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


def test_sft_two_processes_match_one(runs):
    """``recalign sft``: per-step losses, adapter weights and evaluation metrics agree."""
    assert_two_match_one(runs / "sft-1proc", runs / "sft-2proc")


def test_sdpo_two_processes_match_one(runs):
    """``recalign align --loss sdpo`` (K=3, precomputed reference): the same, plus the diagnostics
    (reward accuracies/margins, averaged over processes) of the last step."""
    assert_two_match_one(runs / "align-1proc", runs / "align-2proc")
    d1, d2 = (json.loads((runs / r / "metrics.json").read_text())["run"]["final_diagnostics"]
              for r in ("align-1proc", "align-2proc"))  # fmt: skip
    assert d1 and d1.keys() == d2.keys()
    for k in d1:
        assert d1[k] == pytest.approx(d2[k], rel=RTOL, abs=ATOL), k
    # the reference log-probs were computed once (by the main process) and read by the other
    log = (runs / "launch.log").read_text()
    assert log.count("align: reference log-probs cached in") == 1
    assert log.count("align: reference log-probs loaded from") == 1


def test_knowledge_two_processes_match_one(runs):
    """``recalign knowledge``: the multi-task mixture SFT, same checks; the mixture is one pass at the
    global batch (not per process), and only the main process wrote the tiny base model and results."""
    one, two = runs / "knowledge-1proc", runs / "knowledge-2proc"
    assert_two_match_one(one, two)
    r1, r2 = (json.loads((d / "metrics.json").read_text())["run"] for d in (one, two))
    assert r1["n_train"] == r2["n_train"] == 16 and r1["task_counts"] == r2["task_counts"]
    assert (two / "base" / "model.safetensors").is_file()
    assert len(json.loads((two / "records.json").read_text())["records"]) == 1  # written once
