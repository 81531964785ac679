"""Benchmark: the classical baselines on the embedded MovieLens-100K, both splits, both protocols.

    .venv/bin/python benchmarks/baselines.py                  # writes results/baselines_ml100k.json

For each split (``loo``: leave-one-out by time; ``llara``: chronological 8:1:1 over next-item samples)
and each method (pop, bprmf, sasrec, gru4rec, with their default configs except the epoch budget of
the sequence models, see ``BUDGET``), the model is fitted on the training stage (sequence models early-stop on
the valid stage) and evaluated on the test stage under 20-candidate ranking and full ranking (seen items
excluded). Every metric computed is recorded (HR/NDCG/MRR at 1, 5, 10, 20; AUC for candidates).

Records are written after every run (write-then-rename), so an interrupted benchmark keeps what it
finished. ``seconds`` is wall time (fit + that protocol's evaluation); because the reference machine is
shared, ``extra.fit.cpu_seconds`` (process CPU time of the fit) is recorded too.

At the end the script prints a comparison table and checks the sanity bar: SASRec must beat popularity
on every (split, protocol) headline metric; it exits with code 1 otherwise.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from recalign.baselines import BASELINES, load_baseline_config
from recalign.baselines.runner import run_baseline
from recalign.data.loaders.embedded import load_ml100k_embedded
from recalign.data.splits import build_split
from recalign.evaluation.records import ResultRecord, script_command, write_records
from recalign.evaluation.report import comparison_table, render_markdown
from recalign.logs import parse_args as quiet_parse_args

HEADLINE = {"candidates": ("HR@1", "NDCG@5"), "full": ("HR@10", "NDCG@10")}

# Training budget of the sequence models in this benchmark (the library defaults allow up to 100
# epochs with patience 10). One SASRec epoch on ML-100K costs ~5.5 CPU-seconds; on ML-100K validation
# NDCG@10 is within noise of its plateau after ~25 epochs, so 30 epochs with patience 5 keeps the whole
# benchmark around 10 CPU-minutes. Recorded in every record's ``extra.config``; change with --set.
BUDGET = {
    "sasrec": ["epochs=30", "patience=5"],
    "gru4rec": ["epochs=30", "patience=5"],
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", default="results/baselines_ml100k.json")
    p.add_argument("--methods", default=",".join(BASELINES), help="comma-separated subset of the baselines")
    p.add_argument("--splits", default="loo,llara")
    p.add_argument("--protocols", default="candidates,full")
    p.add_argument("--seed", type=int, default=0, help="candidate-set seed and model seed")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="METHOD.KEY=VALUE",
        help="config override for one method, e.g. --set sasrec.epochs=50 (repeatable)",
    )
    p.add_argument("--no-progress", action="store_true")
    return quiet_parse_args(p, argv)


def sanity_failures(records: list[ResultRecord]) -> list[str]:
    """Headline metrics where SASRec does not beat popularity (same dataset, split and protocol)."""
    by = {(r.split, r.protocol, r.method): r for r in records}
    out = []
    for (split, protocol, method), r in by.items():
        if method != "sasrec" or (split, protocol, "pop") not in by:
            continue
        pop = by[(split, protocol, "pop")]
        for metric in HEADLINE.get(protocol, ()):
            if not r.metrics[metric] > pop.metrics[metric]:
                out.append(
                    f"{split}/{protocol} {metric}: sasrec {r.metrics[metric]:.4f} <= pop {pop.metrics[metric]:.4f}"
                )
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = script_command("benchmarks/baselines.py", argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    protocols = [p.strip() for p in args.protocols.split(",") if p.strip()]
    overrides: dict[str, list[str]] = {m: [f"seed={args.seed}", *BUDGET.get(m, [])] for m in methods}
    for item in args.set:
        method, _, kv = item.partition(".")
        if method not in overrides or "=" not in kv:
            raise SystemExit(f"--set {item!r}: expected METHOD.KEY=VALUE with METHOD in {methods}")
        overrides[method].append(kv)
    configs = {m: load_baseline_config(m, None, overrides[m]) for m in methods}  # fail before any training

    dataset = load_ml100k_embedded()
    records: list[ResultRecord] = []
    start = time.perf_counter()
    for split_name in [s.strip() for s in args.splits.split(",") if s.strip()]:
        t0 = time.perf_counter()
        split = build_split(dataset, split_name, seed=args.seed)
        print(f"[{split_name}] split built in {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
        for method in methods:
            t0, c0 = time.perf_counter(), time.process_time()
            run = run_baseline(
                method,
                dataset,
                split,
                configs[method],
                protocols=protocols,
                command=command,
                progress=not args.no_progress,
            )
            records.extend(run.records)
            write_records(args.output, records, command=command)
            shown = "  ".join(
                f"{r.protocol}: " + " ".join(f"{k} {r.metrics[k]:.4f}" for k in HEADLINE[r.protocol])
                for r in run.records
            )
            print(
                f"[{split_name}] {method:8s} {shown}  ({time.perf_counter() - t0:.0f}s wall, "
                f"{time.process_time() - c0:.0f}s cpu)",
                file=sys.stderr,
                flush=True,
            )
    print(render_markdown(comparison_table(records, ["HR@1", "NDCG@5", "HR@10", "NDCG@10"])))
    print(f"wrote {Path(args.output)} in {time.perf_counter() - start:.0f}s", file=sys.stderr)
    failures = sanity_failures(records)
    for f in failures:
        print(f"SANITY FAILURE: {f}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
