"""DPO4Rec on MovieLens-100K: SASRec alone vs SASRec + unaligned summaries vs SASRec + aligned summaries.

What is measured (all on the same selected users' ``loo`` test examples and the split's 20 shared
candidates, candidate-ranking protocol):

``sasrec``
    The SASRec backbone of the run (RecBole defaults), without any summary.
``sasrec+summaries-unaligned``
    The summary-augmented SASRec (gated fusion of the all-MiniLM-L6-v2 embedding of a summary into
    SASRec's user vector), given one greedy summary per user from SmolLM2-135M-Instruct as shipped.
``sasrec+summaries-aligned``
    The same recommender, given one greedy summary per user from SmolLM2 after DPO on best/worst pairs of
    its own sampled summaries (reward = NDCG@5 of the true valid item under the augmented recommender,
    cross-fitted).

Each record's ``extra`` carries the mean reward of the N sampled summaries per user before and after
alignment (on the users' *valid* examples, the quantity DPO optimises); the file's top-level
``extra.runs[<variant>]`` holds each run's reward details, pair counts (including users skipped because
all N summaries tied), DPO diagnostics, stage timings and resolved config, copied from its
``metrics.json``. ``--method-suffix`` / ``--merge`` add a variant run (e.g. another reward) to the same
file without touching the other records.

The run itself is ``recalign.methods.dpo4rec.recipe.run_dpo4rec`` (the same code as ``recalign dpo4rec``);
it is resumable, so rerunning the same command after an interruption continues where it stopped.

Run:  python benchmarks/dpo4rec.py --config configs/dpo4rec_ml100k.yaml --run-dir runs/dpo4rec_ml100k \
          --output results/dpo4rec_ml100k.json [--samples 4] [--iterations 1] [--users 150] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/dpo4rec_ml100k.yaml")
    p.add_argument("--run-dir", default="runs/dpo4rec_ml100k", help="the run's output directory (resumable)")
    p.add_argument("--output", default="results/dpo4rec_ml100k.json")
    p.add_argument("--samples", type=int, default=None)
    p.add_argument("--iterations", type=int, default=None)
    p.add_argument("--users", type=int, default=None)
    p.add_argument(
        "--method-suffix",
        default="",
        help="appended to the method names of this run's LM records (a variant, e.g. '-logprob')",
    )
    p.add_argument(
        "--merge",
        action="store_true",
        help="merge into an existing --output: replace records with the same method, keep the others",
    )
    p.add_argument("--skip-methods", default="", help="comma-separated methods not to write (e.g. sasrec)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = p.parse_args(argv)

    from recalign.cli.cmd_dpo4rec import build_config
    from recalign.config import config_to_dict
    from recalign.io import atomic_write_json
    from recalign.methods.dpo4rec.recipe import run_dpo4rec

    command = " ".join(shlex.quote(a) for a in ["python", "benchmarks/dpo4rec.py", *sys.argv[1:]])
    cfg = build_config(args)
    result = run_dpo4rec(cfg, args.run_dir, command=command)
    m = result.metrics
    skip = {x for x in args.skip_methods.split(",") if x}
    records = []
    for r in result.records:
        d = r.to_dict()
        if d["method"] in skip:
            continue
        if d["method"] != "sasrec":
            d["method"] += args.method_suffix
        records.append(d)
    run_extra = {
        "command": command,
        "reward": m["reward"],
        "pairs": m["pairs"],
        "dpo": m["dpo"],
        "fusion": m["fusion"],
        "sasrec": m["sasrec"],
        "users": m["users"],
        "samples_per_user": m["samples_per_user"],
        "iterations": m["iterations"],
        "seconds": m["seconds"],
        "config": config_to_dict(cfg),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": cfg.threads},
    }
    out = Path(args.output)
    payload = {"records": [], "extra": {"runs": {}}}
    if args.merge and out.is_file():
        payload = json.loads(out.read_text(encoding="utf-8"))
        payload.setdefault("extra", {}).setdefault("runs", {})
    methods = {d["method"] for d in records}
    payload["records"] = [d for d in payload["records"] if d["method"] not in methods] + records
    payload["extra"]["runs"][args.method_suffix or "default"] = run_extra
    atomic_write_json(out, payload)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
