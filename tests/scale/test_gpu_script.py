"""``benchmarks/gpu_full.sh`` run end to end on the CPU with a tiny Llama and a tiny ML-100K-format data set.

The script is meant for a GPU (SmolLM2, bf16, the whole llara training set); no GPU is lent to the CI
machine, so this dry run is what keeps it working: the same two commands (sequence SFT over every window
for one epoch, S-DPO K=3 from it over the whole training stage, each evaluated on *every* test row) with
only the model, data path, dtype, threads and batch sizes overridden through ``SFT_ARGS`` / ``ALIGN_ARGS``.
It checks what the GPU run is for: one epoch covers every training window, every test row is evaluated
by both stages, S-DPO trains one epoch over the whole training stage from the sequence-SFT model on its prompt format, and the merged result
file carries both rows and the command that produced it. Re-running resumes (both stages are finished,
so nothing trains again and the result is the same).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from _procs import REPO, TINY, child_env

sys.path.insert(0, str(TINY))
import _lm_tiny  # noqa: E402

from recalign.data.prepare import DataPrepareConfig, prepare  # noqa: E402

SCRIPT = REPO / "benchmarks" / "gpu_full.sh"


@pytest.fixture(scope="module")
def gpu_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu-full")
    model = _lm_tiny.write_tiny_model(root / "model")
    data = _lm_tiny.write_ml100k_dir(root / "ml")
    common = f"threads=1 data.path={data} data.candidates=5 max_history=4 training.progress=false"
    env = {
        **child_env(),
        "RECALIGN": str(REPO / ".venv" / "bin" / "recalign")
        if (REPO / ".venv" / "bin" / "recalign").exists()
        else "recalign",
        "MODEL": str(model),
        "DTYPE": "float32",
        "SFT_ARGS": f"{common} window=6 min_context=2 training.batch_size=4 eval.batch_size=4",
        "ALIGN_ARGS": f"{common} training.batch_size=4 eval.batch_size=4",
    }
    out, result = root / "run", root / "result.json"

    def run():
        return subprocess.run(
            ["bash", str(SCRIPT), str(out), str(result)], env=env, cwd=REPO, capture_output=True, text=True,
            timeout=600,
        )  # fmt: skip

    split, _, _ = prepare(DataPrepareConfig(path=str(data), split="llara", candidates=5))
    first = run()
    assert first.returncode == 0, first.stderr[-3000:]
    return {
        "out": out,
        "result": result,
        "run": run,
        "n_test_rows": len(split.stage("test")),
        "n_train_rows": len(split.stage("train")),
    }


def test_both_stages_evaluate_every_test_row(gpu_run):
    doc = json.loads(gpu_run["result"].read_text())
    assert doc["command"].startswith("bash benchmarks/gpu_full.sh ")
    methods = [r["method"] for r in doc["records"]]
    assert methods == ["sft-sequence", "sdpo-k3-sequence"], methods
    # eval.n_test=-1 means every row of the split's test stage
    n_test = {r["n_examples"] for r in doc["records"]}
    assert n_test == {gpu_run["n_test_rows"]}, n_test
    for r in doc["records"]:
        assert r["protocol"] == "candidates"
        assert 0.0 <= r["metrics"]["HR@1"] <= 1.0


def test_sft_covers_every_window_once_and_sdpo_starts_from_it(gpu_run):
    sft = json.loads((gpu_run["out"] / "sft" / "metrics.json").read_text())["run"]
    counts = sft["train_counts"]
    assert sft["format"] == "sequence"
    # one epoch: the optimiser steps cover every window (the last batch may be short)
    n_docs, batch = counts["n_documents"], 4
    assert sft["train_steps"] == -(-n_docs // batch), (sft["train_steps"], n_docs)
    align = json.loads((gpu_run["out"] / "sdpo" / "metrics.json").read_text())["run"]
    assert align["prompt_format"] == "sequence"
    assert align["start_model"] == str(gpu_run["out"] / "sft")
    # S-DPO over the whole training stage (n_train=8192 caps above it) for one epoch
    assert align["n_train"] == gpu_run["n_train_rows"], (align["n_train"], gpu_run["n_train_rows"])
    assert align["train_steps"] == -(-align["n_train"] // batch)


def test_rerun_resumes_without_training_again(gpu_run):
    before = json.loads(gpu_run["result"].read_text())["records"]
    again = gpu_run["run"]()
    assert again.returncode == 0, again.stderr[-3000:]
    after = json.loads(gpu_run["result"].read_text())["records"]
    assert [r["metrics"] for r in after] == [r["metrics"] for r in before]
