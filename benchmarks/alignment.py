"""Preference alignment on ML-100K: DPO, S-DPO (K=3, K=7) and DMPO (K=3) from one SFT checkpoint.

Every method starts from the same SFT run (by default `runs/sft_ml100k`), trains a fresh LoRA adapter
with ``recalign align`` and is evaluated on the *same* test rows as the SFT, SASRec and popularity
records it is compared with (those are read from the SFT results file, so the table is one population
of examples). Runs are resumable: a method whose run directory already holds ``records.json`` is read
back, not retrained.

    python benchmarks/alignment.py --sft runs/sft_ml100k --baseline-results results/sft_ml100k.json \
        --output results/alignment_ml100k.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from recalign.config import load_config
from recalign.evaluation.records import read_records, script_command, write_records
from recalign.logs import parse_args
from recalign.methods import load_data, sample_examples
from recalign.methods.align import AlignConfig, run_align

METHODS = {
    "dpo": ["loss=dpo", "negatives=1"],
    "sdpo-k3": ["loss=sdpo", "negatives=3"],
    "sdpo-k7": ["loss=sdpo", "negatives=7"],
    "dmpo-k3": ["loss=dmpo", "negatives=3"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sft", default="runs/sft_ml100k", help="SFT run directory every method starts from")
    ap.add_argument("--config", default="configs/align_ml100k.yaml")
    ap.add_argument("--baseline-results", default="results/sft_ml100k.json",
                    help="records of sft/sasrec/pop/zeroshot on the same test rows")  # fmt: skip
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--runs", default="runs/alignment", help="where the run directories go")
    ap.add_argument("--output", default="results/alignment_ml100k.json")
    ap.add_argument("overrides", nargs="*", help="AlignConfig overrides applied to every method")
    args = parse_args(ap)  # -v: library output, quiet otherwise
    command = script_command("benchmarks/alignment.py")

    base_cfg = load_config(AlignConfig, args.config, [f"model={args.sft}", *args.overrides])
    data = load_data(base_cfg.data)
    test = sample_examples(data.split.stage("test"), base_cfg.eval.n_test, base_cfg.seed, stage="test")
    records = []
    for name in args.methods.split(","):
        run_dir = Path(args.runs) / name
        if (run_dir / "records.json").is_file():
            print(f"{name}: read back from {run_dir}", flush=True)
            recs = read_records(run_dir / "records.json")
        else:
            cfg = load_config(AlignConfig, args.config,
                              [f"model={args.sft}", *METHODS[name], f"method={name}", *args.overrides])  # fmt: skip
            cfg.training.resume = True  # continue a run killed earlier; a fresh dir simply starts
            t0 = time.perf_counter()
            recs = run_align(cfg, run_dir, data=data, test_examples=test, command=command).records
            print(f"{name}: {time.perf_counter() - t0:.0f} s", flush=True)
        for r in recs:
            r.command = command
        records.extend(recs)
    n = len(test)
    if args.baseline_results and Path(args.baseline_results).is_file():
        for r in read_records(args.baseline_results):
            if r.split == data.split.name and r.n_examples == n:
                records.append(r)
    write_records(args.output, records, command=command)
    for r in records:
        shown = {
            k: round(v, 4)
            for k, v in r.metrics.items()
            if k in ("HR@1", "HR@1 (valid)", "ValidRatio", "NDCG@5")
        }
        print(f"{r.method:10s} {r.protocol:11s} {shown}")


if __name__ == "__main__":
    main()
