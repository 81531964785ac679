"""Assemble one results file from the records of several runs, each record keeping its own command.

Why: a comparison table (e.g. ``results/sft_ml100k.json``) often joins rows produced by different commands
on the same test examples -- the quickstart's popularity, SASRec and zero-shot rows next to a longer
``recalign sft`` run. Every record already carries the command that produced it, so the merged file stays
reproducible row by row; this script only selects and concatenates, and refuses to mix populations
(records of one dataset/split/protocol must have the same ``n_examples``) or to keep two rows for the same
(method, dataset, split, protocol).

    python benchmarks/merge_records.py runs/qs3/results.json:pop,sasrec,zeroshot \\
        runs/sft_ml100k/records.json --output results/sft_ml100k.json

``FILE:METHOD,METHOD`` keeps only those methods of FILE; a plain FILE keeps all of its records.
"""

from __future__ import annotations

import argparse
import sys

from recalign.errors import RecalignInputError
from recalign.evaluation.records import ResultRecord, read_records, write_records
from recalign.logs import parse_args as quiet_parse_args


def select(spec: str) -> list[ResultRecord]:
    path, _, methods = spec.partition(":")
    records = read_records(path)
    if not methods:
        return records
    wanted = methods.split(",")
    missing = sorted(set(wanted) - {r.method for r in records})
    if missing:
        raise RecalignInputError(f"no records for method(s) {', '.join(missing)}", source=path)
    return [r for r in records if r.method in wanted]


def merge(specs: list[str]) -> list[ResultRecord]:
    records: list[ResultRecord] = []
    seen: set[tuple] = set()
    sizes: dict[tuple, int] = {}
    for spec in specs:
        for r in select(spec):
            key = (r.method, r.dataset, r.split, r.protocol)
            if key in seen:
                raise RecalignInputError(f"two records for {key}", source=spec)
            seen.add(key)
            pop = (r.dataset, r.split, r.protocol)
            if sizes.setdefault(pop, r.n_examples) != r.n_examples:
                raise RecalignInputError(
                    f"{r.method} has {r.n_examples} {pop} examples, others {sizes[pop]}", source=spec
                )
            records.append(r)
    return records


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("inputs", nargs="+", help="FILE or FILE:METHOD,METHOD")
    ap.add_argument("--output", required=True)
    args = quiet_parse_args(ap)
    try:
        records = merge(args.inputs)
    except RecalignInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    write_records(args.output, records)
    for r in records:
        print(
            f"{r.method:12s} {r.protocol:11s} n={r.n_examples} HR@1={r.metrics.get('HR@1', float('nan')):.3f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
