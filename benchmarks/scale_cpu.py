"""The same SFT run in 1 process and in 2 CPU processes (accelerate launch): wall time, loss, memory.

What is compared: ``recalign sft`` on a tiny ML-100K-format dataset, with the global batch held fixed
(1 process x batch B against 2 processes x batch B/2, same examples in every optimiser step), so the
two runs must reach the same losses and adapter; the point of the benchmark is that equality plus an
honest account of the cost, not a speed-up. On a 2-core machine shared with other work, two processes
with one thread each have the same cores as one process with two threads, plus gloo all-reduces and a
second interpreter to start; no speed-up is expected, and the 2-process run pays ~1 extra model load.

Model: by default a small Llama built from config (``--hidden``, ``--layers``; BPE tokenizer trained
in-process, saved as safetensors), which keeps the run to a minute on a busy machine. ``--model
smollm2`` uses the embedded SmolLM2-135M instead (minutes per variant on 2 cores).

Each variant is one fresh child command (``python -m recalign.cli.main sft`` or ``python -m
accelerate.commands.launch --config_file configs/accelerate/cpu_2proc.yaml -m recalign.cli.main sft``)
run through a small wrapper process, so that

- ``seconds``: wall clock of the whole command (interpreter start, imports, data, model load,
  training, evaluation skipped) and ``train_seconds``: the training loop only (``metrics.json``);
- ``peak_mb``: the largest resident set of any process of the variant (``ru_maxrss`` of the waited
  descendants; for 2 processes that is one worker, so total memory is about twice it);
- ``final_loss``: the logged loss of the last optimiser step, ``train_loss``: the mean over steps.

``max_abs_adapter_diff`` is the largest absolute difference between the two runs' adapter weights.

Threads: every process runs ``--threads`` OpenMP threads (default 1, which is also what accelerate
gives each worker), so the 2-process run uses twice the cores of the 1-process run. On a shared,
oversubscribed 2-core machine a 2-thread process is pathologically slow (OpenMP threads wait on each
other while the cores serve other jobs: one measurement here took 136 s of training against 5 s with
one thread); one thread per process keeps the comparison about the processes, not the scheduler.

Run:  python benchmarks/scale_cpu.py --output results/scale_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from recalign.evaluation.records import script_command
from recalign.logs import parse_args as quiet_parse_args

REPO = Path(__file__).resolve().parents[1]
CPU_2PROC = REPO / "configs" / "accelerate" / "cpu_2proc.yaml"


def _env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env.pop("WORLD_SIZE", None)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare(root: Path, args) -> tuple[Path, Path]:
    """Tiny ML-100K-format data and (unless --model is given) a small Llama saved as safetensors."""
    sys.path.insert(0, str(REPO / "tests" / "training"))
    import _lm_tiny

    data = _lm_tiny.write_ml100k_dir(root / "ml")
    if args.model:
        return data, Path(args.model) if args.model != "smollm2" else Path("smollm2")
    from recalign.lm.loading import build_tiny_llama

    tok = _lm_tiny.tiny_tokenizer()
    model = build_tiny_llama(tok, hidden_size=args.hidden, num_layers=args.layers, num_heads=4, seed=0)
    _lm_tiny.widen_embeddings(model)
    model.save_pretrained(root / "model", safe_serialization=True)
    tok.save_pretrained(root / "model")
    return data, root / "model"


def run_variant(cmd: list[str], threads: int) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of ``cmd`` and all its descendants, from a fresh wrapper."""
    wrapper = (
        "import json, resource, subprocess, sys, time\n"
        "t0 = time.perf_counter()\n"
        "rc = subprocess.run(sys.argv[1:]).returncode\n"
        "dt = time.perf_counter() - t0\n"
        "print(json.dumps({'rc': rc, 'seconds': dt, "
        "'peak_kb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", wrapper, *cmd], env=_env(threads), cwd=REPO, capture_output=True, text=True
    )
    last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else "{}"
    info = json.loads(last) if last.startswith("{") else {}
    if info.get("rc") != 0:
        raise SystemExit(f"variant failed: {shlex.join(cmd)}\n{proc.stderr[-3000:]}")
    return info["seconds"], info["peak_kb"] / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--output", default=None, help="write the speed-shape JSON here")
    ap.add_argument("--model", default=None, help="model dir or 'smollm2' (default: a small built Llama)")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--global-batch", type=int, default=8)
    ap.add_argument("--n-train", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="OpenMP/MKL threads per process")
    args = quiet_parse_args(ap)
    if args.global_batch % 2:
        raise SystemExit("--global-batch must be even (split over 2 processes)")

    import torch
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory(prefix="scale_cpu_") as tmp:
        root = Path(tmp)
        data, model = prepare(root, args)
        cfg = root / "sft.yaml"
        cfg.write_text(
            json.dumps(
                {
                    "model": str(model),
                    "data": {"dataset": "ml-100k", "path": str(data), "split": "llara", "candidates": 5},
                    "n_train": args.n_train,
                    "max_history": 4,
                    "dtype": "float32",  # "auto" may pick bfloat16: equal only to bf16 precision
                    "threads": args.threads,
                    "lora": {"dropout": 0.0},
                    "training": {
                        "max_steps": args.steps, "batch_size": args.global_batch, "save_steps": args.steps,
                        "logging_steps": 1, "progress": False, "learning_rate": 0.005, "seed": 0,
                    },
                    "eval": {"n_test": 0},
                }
            )
        )  # fmt: skip
        sft = ["-m", "recalign.cli.main", "sft", "--config", str(cfg)]
        variants = {
            "1proc": (1, args.global_batch, [sys.executable, *sft, "--output", str(root / "1proc")]),
            "2proc": (
                2,
                args.global_batch // 2,
                [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_2PROC),
                 "--main_process_port", str(_free_port()), *sft, "--output", str(root / "2proc"),
                 f"training.batch_size={args.global_batch // 2}"],
            ),
        }  # fmt: skip
        rows = []
        for name, (nproc, per_device, cmd) in variants.items():
            load = os.getloadavg()[0]
            seconds, peak_mb = run_variant(cmd, args.threads)
            out = root / name
            metrics = json.loads((out / "metrics.json").read_text())["run"]
            state = json.loads((out / "checkpoints" / "trainer_state.json").read_text())
            losses = [h["loss"] for h in state["log_history"] if "loss" in h]
            rows.append(
                {
                    "variant": name,
                    "processes": nproc,
                    "threads_per_process": args.threads,
                    "per_device_batch": per_device,
                    "global_batch": args.global_batch,
                    "steps": metrics["train_steps"],
                    "seconds": round(seconds, 2),
                    "train_seconds": metrics["train_seconds"],
                    "final_loss": losses[-1],
                    "train_loss": metrics["train_loss"],
                    "peak_mb": round(peak_mb, 1),
                    "load_average_1min_before": round(load, 2),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
        a = load_file(str(root / "1proc" / "adapter" / "adapter_model.safetensors"))
        b = load_file(str(root / "2proc" / "adapter" / "adapter_model.safetensors"))
        diff = max(float((a[k] - b[k]).abs().max()) for k in a)

    result = {
        "command": script_command("benchmarks/scale_cpu.py"),
        "what": "recalign sft, same global batch: 1 process x batch B vs accelerate launch 2 CPU processes x B/2",
        "model": args.model or f"tiny Llama (hidden {args.hidden}, {args.layers} layers, BPE vocab 400)",
        "rows": rows,
        "max_abs_adapter_diff": diff,
        "final_loss_abs_diff": abs(rows[0]["final_loss"] - rows[1]["final_loss"]),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "note": "2 cores shared with other jobs while measuring (see load_average_1min_before per "
            "row): absolute times carry that load; the losses and adapters are the comparison",
        },
    }
    text = json.dumps(result, indent=2) + "\n"
    if args.output:
        from recalign.io import atomic_write_text

        atomic_write_text(args.output, text)
    print(text)


if __name__ == "__main__":
    main()
