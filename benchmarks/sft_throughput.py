"""Next-item targets per CPU-second: candidate-prompt SFT (LLaRA / S-DPO) vs sequence SFT, same run.

What is measured: full optimisation steps (forward + loss + backward + AdamW step) of SmolLM2-135M-Instruct
with the LoRA adapter of ``configs/sft_ml100k.yaml`` (r=16 on every linear layer), on real ML-100K llara
training data, alternating the two formats step by step so that both see the same machine load:

``candidates``
    ``recalign sft`` today: one chat-formatted candidate prompt (history of 10 + 20 candidate titles,
    ~440 tokens) per example, the loss on the target title's tokens; 1 target per example.
``sequence``
    ``recalign sft format=sequence`` (:mod:`recalign.lm.sequence`): one plain-list document per window of
    24 items of a user's training history, the loss on every item after the first 4; ~20 targets per
    document.

Both use the batch size of their config (4 examples / 4 documents). ``cpu_seconds`` is the process CPU
time of a step (the 2-core CPU is shared with other work; with one thread, CPU time measures the work
done and is stable under load, where wall-clock time is not), ``seconds`` its wall-clock time; the
summary is the median over ``--steps`` timed steps per format after one untimed warm-up step each.

Run:  python benchmarks/sft_throughput.py --steps 5 --output results/sft_throughput.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from recalign.evaluation.records import script_command
from recalign.logs import parse_args

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=5, help="timed steps per format")
    ap.add_argument("--batch", type=int, default=4, help="examples / documents per step")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--output", default="results/sft_throughput.json")
    args = parse_args(ap, argv)  # -v: library output, quiet otherwise

    import numpy as np
    import torch

    from recalign.data.prepare import DataPrepareConfig
    from recalign.lm.lora import LoRAConfig, attach_lora, load_lm, resolve_dtype
    from recalign.lm.sequence import SequenceObjective, sequence_examples, split_windows
    from recalign.methods import load_data, sample_examples
    from recalign.methods.sft import SFTObjective, sft_examples

    torch.set_num_threads(args.threads)
    dtype = resolve_dtype(args.dtype)
    data = load_data(DataPrepareConfig(dataset="ml-100k", split="llara", candidates=20))
    model, tok, _ = load_lm("smollm2", merge=False, trainable=True, dtype=dtype)
    torch.manual_seed(0)
    lora = LoRAConfig(r=16, alpha=32, dropout=0.05, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                      "gate_proj", "up_proj", "down_proj"])  # fmt: skip
    model = attach_lora(model, lora)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    n = args.batch * (args.steps + 1)
    frame = sample_examples(data.split.stage("train"), n, 0, stage="train")
    cand = sft_examples(tok, data.dataset, frame, 0, 10)
    windows = split_windows(data.split, data.dataset, window=24, min_context=4)
    rng = np.random.default_rng(0)
    seq = sequence_examples(
        tok, data.dataset, [windows[i] for i in rng.choice(len(windows), n, replace=False)]
    )
    fmts = {
        "candidates": (cand, SFTObjective("packed"), lambda b: len(b["prompt"]),
                       lambda b: sum(len(p) + len(a[0]) for p, a in zip(b["prompt"], b["answers"]))),
        "sequence": (seq, SequenceObjective(), lambda b: sum(len(s) for s in b["targets"]),
                     lambda b: sum(len(t) for t in b["tokens"])),
    }  # fmt: skip
    rows: dict[str, list[dict]] = {k: [] for k in fmts}
    for step in range(args.steps + 1):
        for name, (examples, objective, n_targets, n_tokens) in fmts.items():
            chunk = examples[step * args.batch : (step + 1) * args.batch]
            batch = {k: [e[k] for e in chunk] for k in chunk[0]}
            t0, c0 = time.perf_counter(), time.process_time()
            loss, _ = objective(model, batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            if step > 0:  # step 0 warms up
                rows[name].append({"seconds": wall, "cpu_seconds": cpu, "targets": n_targets(batch),
                                   "tokens": n_tokens(batch), "loss": float(loss)})  # fmt: skip
            print(
                f"{name} step {step}: {wall:.1f} s wall, {cpu:.1f} s CPU, {n_targets(batch)} targets",
                flush=True,
            )

    out_rows = []
    for name, rs in rows.items():
        cpu = statistics.median(r["cpu_seconds"] for r in rs)
        wall = statistics.median(r["seconds"] for r in rs)
        targets = statistics.mean(r["targets"] for r in rs)
        tokens = statistics.mean(r["tokens"] for r in rs)
        out_rows.append({
            "variant": name, "batch": args.batch, "seconds": round(wall, 3), "cpu_seconds": round(cpu, 3),
            "targets_per_step": targets, "tokens_per_step": tokens,
            "targets_per_cpu_second": round(targets / cpu, 4), "targets_per_second": round(targets / wall, 4),
            "tokens_per_cpu_second": round(tokens / cpu, 1), "steps": rs,
        })  # fmt: skip
    by = {r["variant"]: r for r in out_rows}
    result = {
        "command": script_command("benchmarks/sft_throughput.py", argv),
        "model": "smollm2", "dtype": str(dtype).replace("torch.", ""), "threads": args.threads,
        "lora": {"r": 16, "alpha": 32, "target_modules": "all linear"},
        "rows": out_rows,
        "speedup_targets_per_cpu_second": round(
            by["sequence"]["targets_per_cpu_second"] / by["candidates"]["targets_per_cpu_second"], 2
        ),
        "load_average_1min": os.getloadavg()[0],
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }  # fmt: skip
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=2))
    for r in out_rows:
        print(r["variant"], {k: v for k, v in r.items() if k != "steps"})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
