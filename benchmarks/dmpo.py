"""DMPO's few-shot setting on ML-100K: few-shot SFT vs SFT + DMPO vs SFT + S-DPO (K = 3) of SmolLM2, at
equal budget, in-genre and cross-genre, for each training prompt (the paper's pair-ranking prompt and the
candidate prompt).

Everything about the budget comes from the config (``configs/dmpo_fewshot_ml100k.yaml``, see
:mod:`recalign.methods.dmpo_fewshot`); this script only chooses which prompt variants to run and where
the runs go. "cross-genre" is the genre-complementary half of ML-100K with the same users -- no second
interaction data set is available offline. Records are written after every model, so an interrupted run
keeps what it finished, and a rerun continues from the finished stages (``resume: true``).

    python benchmarks/dmpo.py --prompts pairwise,candidates --output results/dmpo_ml100k.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

from recalign.config import load_config
from recalign.evaluation.records import script_command, write_records
from recalign.logs import parse_args
from recalign.methods.dmpo_fewshot import DMPOFewShotConfig, run_dmpo_fewshot


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/dmpo_fewshot_ml100k.yaml")
    ap.add_argument("--prompts", default="pairwise,candidates", help="comma-separated: pairwise, candidates")
    ap.add_argument("--runs", default="runs/dmpo_bench", help="where the run directories go")
    ap.add_argument("--output", default="results/dmpo_ml100k.json")
    ap.add_argument("overrides", nargs="*", help="dotted config overrides (e.g. eval.n_test=100), recorded")
    args = parse_args(ap)  # -v: library output, quiet otherwise
    command = script_command("benchmarks/dmpo.py")
    records = []
    for prompt in [p.strip() for p in args.prompts.split(",") if p.strip()]:
        cfg = load_config(DMPOFewShotConfig, args.config, [*args.overrides, f"prompt={prompt}"])
        done = list(records)

        def partial(recs, done=done):
            write_records(args.output, done + recs, command=command)

        res = run_dmpo_fewshot(cfg, Path(args.runs) / prompt, command=command, on_records=partial)
        records.extend(res.records)
        write_records(args.output, records, command=command)
        print(f"{prompt}: {len(res.records)} records", flush=True)
    print(f"wrote {len(records)} records to {args.output}", flush=True)


if __name__ == "__main__":
    main()
