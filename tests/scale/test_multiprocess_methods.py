"""``recalign cllm4rec``, ``recalign dpo4rec`` and ``recalign baseline`` under ``accelerate launch`` with
2 CPU processes give the 1-process result (test_multiprocess.py covers sft, align and knowledge).

As there, the three commands run in ONE launch of tests/scale/_cli_sequence.py and the 1-process
references in the test process, with the same *global* batch: 1 process x batch 4 against 2 processes
x batch 2.

- ``cllm4rec run``: its own training loop (two sides, an Adam each), data-parallel by hand: each process
  runs the backbone on its slice of every global batch, takes its share of the global mean (weighted by
  target tokens, which differ between slices) and the side's gradients are summed before the step. The
  pretraining and fine-tuning losses of every step, the ID tables and the evaluation agree to float
  noise. What this guards against (each checked by breaking the code on purpose): per-process means
  averaged with equal weights instead of token-weighted shares (step losses differ by ~2e-3 from the
  second step on), the regulariser added by both processes (its gradient doubled; the logged
  regulariser then differs by ~3e-3), unsynchronised gradients (each process trains its own tables), a
  per-process batch taken as the global one (other documents).
- ``dpo4rec``: the DPO round trains on both processes (reference log-probs cached by the main process
  first); summaries, rewards and pairs come from the main process alone. Pairs, DPO losses, the adapter
  and the test metrics agree.
- ``baseline``: the second process exits at once, the main one writes the results exactly once.

Tolerances as in test_multiprocess.py: gloo sums fp32 gradients in another order than one process
does. Measured: ID tables differ by 1.5e-7, the DPO adapter by 7e-7, step losses by 1e-6 (abs);
atol 1e-5 is well above that and well below any of the bugs above.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml
from _procs import CPU_2PROC, TINY, assert_same_tensors, free_port, run
from safetensors.torch import load_file

sys.path.insert(0, str(TINY))
import _lm_tiny  # noqa: E402

from recalign.cli.main import main  # noqa: E402

RTOL, ATOL = 1e-4, 1e-5


def _write_ml100k_dir(directory: Path, n_users: int = 16, per_user: int = 12) -> Path:
    """ML-100K-format files like _lm_tiny's, over 40 titles: CLLM4Rec's hold-out split draws 19 unseen
    candidates per user, more than _lm_tiny's 24-title catalogue leaves."""
    import numpy as np

    titles = _lm_tiny.TITLES + [f"Film number {i} ({1960 + i})" for i in range(16)]
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    lines = []
    for u in range(1, n_users + 1):
        for k, it in enumerate(rng.choice(len(titles), size=per_user, replace=False) + 1):
            lines.append(f"{u}\t{it}\t{int(rng.integers(1, 6))}\t{880000000 + 1000 * k + u}")
    (directory / "u.data").write_text("\n".join(lines) + "\n")
    genres = "|".join(["0"] * 18 + ["1"])
    items = [f"{i}|{t}|01-Jan-1995||http://x|{genres}" for i, t in enumerate(titles, 1)]
    (directory / "u.item").write_bytes(("\n".join(items) + "\n").encode("latin-1"))
    return directory


def _configs(root: Path, data: Path, model: Path) -> dict[str, Path]:
    cllm = {
        "threads": 1, "progress": False, "seed": 1,
        "data": {"dataset": "ml-100k", "path": str(data), "split": "holdout"},
        "model": {"backbone": str(model)},
        # content documents differ in length: the two processes' slices hold different token counts
        "pretrain": {"collab_steps": 3, "content_ratio": 1, "batch_size": 4, "content_batch_size": 4,
                     "max_items": 6, "lr": 0.05, "checkpoint_every": 2},
        "finetune": {"steps": 3, "batch_size": 4, "max_items": 8, "lr": 0.05, "checkpoint_every": 2},
    }  # fmt: skip
    dpo4rec = {
        "model": str(model), "users": 0, "iterations": 1, "reward_k": 6, "threads": 1, "progress": False,
        "data": {"dataset": "ml-100k", "path": str(data), "candidates": 6},
        "sasrec": {"epochs": 2, "hidden_size": 16, "inner_size": 32, "max_len": 12, "early_stopping": False},
        "summary": {"samples": 4, "max_new_tokens": 6, "batch_size": 16, "temperature": 1.5, "top_p": 1.0},
        "encoder": {"kind": "hashing", "hashing_dim": 32},
        "fusion": {"epochs": 10, "lr": 0.05, "text_dropout": 0.0, "n_folds": 2, "holdout_fraction": 0.0},
        "dpo": {
            "beta": 0.5, "reference": "cache",
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
            "training": {"max_steps": 2, "batch_size": 4, "learning_rate": 0.05, "logging_steps": 1,
                         "save_steps": 2, "warmup_steps": 0, "seed": 3, "progress": False},
        },
    }  # fmt: skip
    paths = {"cllm4rec": root / "cllm4rec.yaml", "dpo4rec": root / "dpo4rec.yaml"}
    paths["cllm4rec"].write_text(yaml.safe_dump(cllm))
    paths["dpo4rec"].write_text(yaml.safe_dump(dpo4rec))
    return paths


def _commands(cfgs: dict[str, Path], data: Path, out: Path, two: bool) -> list[list[str]]:
    half = ["pretrain.batch_size=2", "pretrain.content_batch_size=2", "finetune.batch_size=2"]
    return [
        ["cllm4rec", "run", "--config", str(cfgs["cllm4rec"]), "--output", str(out / "cllm4rec"),
         *(half if two else [])],
        ["dpo4rec", "--config", str(cfgs["dpo4rec"]), "--output", str(out / "dpo4rec"),
         *(["dpo.training.batch_size=2"] if two else [])],
        ["baseline", "--method", "pop", "--dataset", "ml-100k", "--data-path", str(data), "--split", "loo",
         "--no-progress", "--output", str(out / "baseline")],
    ]  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale_methods")
    data = _write_ml100k_dir(root / "ml")
    model = _lm_tiny.write_tiny_model(root / "model")
    cfgs = _configs(root, data, model)
    for argv in _commands(cfgs, data, root / "1proc", two=False):
        assert main(argv) == 0, argv
    launch = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_2PROC),
        "--main_process_port", str(free_port()), str(Path(__file__).parent / "_cli_sequence.py"),
        json.dumps(_commands(cfgs, data, root / "2proc", two=True)),
    ]  # fmt: skip
    proc = run(launch)
    return root, proc


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_cllm4rec_two_processes_match_one(runs):
    root, _ = runs
    one, two = root / "1proc" / "cllm4rec", root / "2proc" / "cllm4rec"
    # it really ran as 2 processes over the same global batches (recorded in the checkpoints)
    for stage in ("pretrain", "finetune"):
        state = json.loads((two / "checkpoints" / stage / "state.json").read_text())
        assert state["world_size"] == 2 and state["global_batch"][0] == 4
        l1, l2 = (json.loads((d / f"{stage}_log.json").read_text())["log"] for d in (one, two))
        assert [r["step"] for r in l1] == [r["step"] for r in l2] and l1
        assert [r["kind"] for r in l1] == [r["kind"] for r in l2]
        for a, b in zip(l1, l2):
            assert a["loss"] == pytest.approx(b["loss"], rel=RTOL, abs=ATOL), (stage, a, b)
            assert a["reg"] == pytest.approx(b["reg"], rel=RTOL, abs=ATOL), (stage, a, b)
        t1, t2 = (load_file(str(d / f"{stage}.safetensors" if stage == "pretrain" else d / "model.safetensors"))
                  for d in (one, two))  # fmt: skip
        assert_same_tensors(t1, t2, rtol=RTOL, atol=ATOL)
    # it trained: the collaborative item table moved away from its content twin (same initial draw)
    t = load_file(str(one / "model.safetensors"))
    assert (t["collab_item"] - t["content_item"]).abs().max() > 100 * ATOL
    # one writer: every step logged once
    steps = [r["step"] for r in _jsonl(two / "progress.jsonl")]
    assert steps == [r["step"] for r in _jsonl(one / "progress.jsonl")]
    m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (one, two))
    assert m1.keys() == m2.keys() == {"full"}
    for k, v in m1["full"].items():
        assert v == pytest.approx(m2["full"][k], abs=1e-6), k


def test_dpo4rec_two_processes_match_one(runs):
    root, _ = runs
    one, two = root / "1proc" / "dpo4rec", root / "2proc" / "dpo4rec"
    # the main process sampled, rewarded and paired exactly as a single process does
    p1, p2 = (_jsonl(d / "pairs" / "iter0.jsonl") for d in (one, two))
    assert p1 == p2 and len(p1) >= 8  # two full global batches of 4 pairs
    # the DPO round: both processes trained (world size 2 in the checkpoint), same losses and adapter
    marker = json.loads((two / "dpo" / "iter1" / "checkpoint-2" / "recalign_checkpoint.json").read_text())
    assert marker["world_size"] == 2
    i1, i2 = (json.loads((d / "adapters" / "iter1" / "dpo_info.json").read_text()) for d in (one, two))
    assert (i1["processes"], i2["processes"]) == (1, 2) and i1["global_step"] == i2["global_step"] == 2
    assert i1["train_loss"] == pytest.approx(i2["train_loss"], rel=RTOL, abs=ATOL)
    for key in ("loss", "rewards/margins", "rewards/accuracies"):
        assert i1["last_log"][key] == pytest.approx(i2["last_log"][key], rel=RTOL, abs=ATOL), key
    a1, a2 = (load_file(str(d / "adapters" / "iter1" / "adapter_model.safetensors")) for d in (one, two))
    assert max(v.abs().max().item() for k, v in a1.items() if "lora_B" in k) > 100 * ATOL  # it trained
    assert_same_tensors(a1, a2, rtol=RTOL, atol=ATOL)
    # one reference cache, written by the main process
    assert len(list((two / "reference_cache").glob("*.safetensors"))) == 1
    m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (one, two))
    assert m1["test"] == m2["test"] and m1["reward"]["after"] == m2["reward"]["after"]


def test_baseline_runs_once_under_two_processes(runs):
    root, proc = runs
    one, two = root / "1proc" / "baseline", root / "2proc" / "baseline"
    assert "process 1 of 2 exits" in proc.stderr
    m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (one, two))
    drop = ("seconds", "fit_seconds", "command")
    assert {k: v for k, v in m1.items() if k not in drop} == {k: v for k, v in m2.items() if k not in drop}
    assert len(json.loads((two / "records.json").read_text())["records"]) == 2
