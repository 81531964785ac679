"""Eager vs sdpa attention for CLLM4Rec's forward-only scoring -> ``results/cllm4rec_attention.json``.

CLLM4Rec trains with eager attention (sdpa's CPU flash-attention backward was the slow part of a step,
``results/cllm4rec_profile.json``), but validation, evaluation and ``recommend`` only run forward passes
over whole-history prompts (up to ~530 tokens on ML-100K). This times the frozen backbone's forward pass
(no gradient) with both kernels on a long and a short batch shape, in the backbone's float32, and checks
that the hidden states agree; ``model.attn_implementation: auto`` scores with sdpa because of it.

Each (shape, kernel) is timed ``--repeats`` times after one warm-up pass; the median is reported. The
first row of every batch is half padding, as in a length-sorted batch.

Usage: ``python benchmarks/cllm4rec_attention.py [--threads 1] [--repeats 3]``
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from recalign.evaluation.records import script_command
from recalign.logs import parse_args

SHAPES = ((4, 500), (32, 60))


def time_forward(model, ids: torch.Tensor, mask: torch.Tensor, impl: str, repeats: int):
    """Median seconds of ``repeats`` forward passes with attention kernel ``impl``, and the last output."""
    model.set_attn_implementation(impl)
    times, out = [], None
    with torch.no_grad():
        for r in range(repeats + 1):
            t0 = time.perf_counter()
            out = model.base_model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
            if r:  # the first pass warms up
                times.append(time.perf_counter() - t0)
    return float(np.median(times)), out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="smollm2")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--output", default="results/cllm4rec_attention.json")
    args = parse_args(ap, argv)  # -v: library output, quiet otherwise

    from recalign.lm.loading import load_model
    from recalign.methods.cllm4rec.recommender import cpu_has_native_bf16

    torch.set_num_threads(args.threads)
    model, _ = load_model(args.backbone)
    model.eval()
    gen = torch.Generator().manual_seed(0)
    rows = []
    for batch, length in SHAPES:
        ids = torch.randint(0, 40000, (batch, length), generator=gen)
        mask = torch.ones(batch, length, dtype=torch.long)
        mask[0, length // 2 :] = 0
        eager_s, eager_h = time_forward(model, ids, mask, "eager", args.repeats)
        sdpa_s, sdpa_h = time_forward(model, ids, mask, "sdpa", args.repeats)
        valid = mask.bool()
        rows.append(
            {
                "batch": batch,
                "tokens_per_row": length,
                "eager_seconds": round(eager_s, 3),
                "sdpa_seconds": round(sdpa_s, 3),
                "speedup": round(eager_s / sdpa_s, 2),
                "max_abs_diff_hidden": float((eager_h - sdpa_h)[valid].abs().max()),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    out = {
        "what": "frozen-backbone forward (no grad), eager vs sdpa attention, median of repeats",
        "backbone": args.backbone,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "threads": args.threads,
        "repeats": args.repeats,
        "cpu": platform.processor() or platform.machine(),
        "bf16_native": cpu_has_native_bf16(),
        "rows": rows,
        "command": script_command("benchmarks/cllm4rec_attention.py", argv),
    }
    Path(args.output).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
