"""Does CLLM4Rec's collaborative pretraining learn at all, and at which ID-table learning rate?
-> ``results/cllm4rec_lr_probe.json``.

The first run in the paper's setting (README, #16) pretrained 10 epochs at ``pretrain.lr`` 3e-3 and its mean
collaborative loss stayed at 7.1-7.2 nats: above a popularity unigram (6.59) — the tables did not even learn
which items are popular. One suspect is the step size: the item head is ``h · e_item`` with SmolLM2's last
hidden state ``h`` of norm ~52, and Adam moves every coordinate of ``e_item`` by about ``lr`` per step, so
one step changes a logit by up to ``lr · ‖h‖₁`` — several nats at 3e-3. The released CLLM4Rec code uses 1e-4.

This probe runs the first ``--steps`` collaborative pretraining steps (the config's documents, batch and
backbone) once per learning rate of ``--lrs`` and variant of ``--variants``, from the same initial tables
and the same batches, and records the mean collaborative loss over windows of 10 steps next to the two bars
of ``results/cllm4rec_valid_refs.json`` (uniform 7.43, unigram 6.59). Variants: ``lm-only`` (no content LM,
λ = 0: only the collaborative side and its learning rate act) and ``paper`` (the config's content LM
alternation and mutual regulariser, the other suspect). No validation: the question is only whether the
training loss falls. Runs are merged into the file by (variant, lr, steps).

Usage: ``python benchmarks/cllm4rec_lr_probe.py [--steps 60] [--lrs 3e-3,3e-4,1e-4] [--variants lm-only]``
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from recalign.config import load_config
from recalign.evaluation.records import script_command
from recalign.logs import parse_args
from recalign.methods.cllm4rec import pipeline
from recalign.methods.cllm4rec.config import CLLM4RecConfig

CONFIG = "configs/cllm4rec_ml100k.yaml"


def windows(losses: list[float], width: int) -> list[float]:
    """Mean loss of consecutive windows of ``width`` steps (the last one may be shorter)."""
    return [round(float(np.mean(losses[i : i + width])), 4) for i in range(0, len(losses), width)]


VARIANTS = {"lm-only": ["pretrain.content_ratio=0", "pretrain.mutual_lambda=0"], "paper": []}


def probe(variant: str, lr: float, steps: int, threads: int, workdir: Path) -> dict:
    overrides = [
        f"pretrain.lr={lr}",
        f"pretrain.collab_steps={steps}",
        *VARIANTS[variant],
        "pretrain.validate_every=0",
        f"threads={threads}",
        "progress=false",
    ]
    cfg = load_config(CLLM4RecConfig, CONFIG, overrides=overrides)
    t0 = time.time()
    result = pipeline.pretrain(cfg, workdir / f"{variant}-lr{lr:g}")
    losses = [r["loss"] for r in result.log if r["kind"] == "collab"]
    regs = [r["reg"] for r in result.log if r["kind"] == "collab"]
    return {
        "variant": variant,
        "lr": lr,
        "overrides": overrides,
        "steps": len(losses),
        "seconds": round(time.time() - t0, 1),
        "loss_first": round(losses[0], 4),
        "loss_windows_of_10": windows(losses, 10),
        "loss_last_10": round(float(np.mean(losses[-10:])), 4),
        "collab_reg_windows_of_10": windows(regs, 10),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60, help="collaborative steps per learning rate")
    ap.add_argument("--lrs", default="3e-3,3e-4,1e-4", help="comma-separated learning rates")
    ap.add_argument("--variants", default="lm-only", help=f"comma-separated, of {', '.join(VARIANTS)}")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--output", default="results/cllm4rec_lr_probe.json")
    args = parse_args(ap, argv)  # -v: library output, quiet otherwise
    refs = json.loads(Path("results/cllm4rec_valid_refs.json").read_text())["collab_loss_bars"]
    path = Path(args.output)
    old = json.loads(path.read_text())["runs"] if path.is_file() else []
    command = script_command("benchmarks/cllm4rec_lr_probe.py", argv)
    with tempfile.TemporaryDirectory(prefix="cllm4rec-lr-") as tmp:
        for variant in args.variants.split(","):
            for lr in (float(x) for x in args.lrs.split(",")):
                row = {**probe(variant, lr, args.steps, args.threads, Path(tmp)), "command": command}
                print(json.dumps(row), flush=True)
                key = (row["variant"], row["lr"], row["steps"])
                old = [r for r in old if (r.get("variant", "lm-only"), r["lr"], r["steps"]) != key] + [row]
                out = {
                    "config": CONFIG,
                    "what": "first collaborative pretraining steps per ID-table lr and variant: mean loss per 10 steps",
                    "collab_loss_bars": refs,
                    "runs": old,
                }
                path.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
