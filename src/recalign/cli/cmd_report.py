"""``recalign report``: compare any set of result records as a Markdown table and a bar plot.

    recalign report results/baselines_ml100k.json runs/ --metrics HR@1,NDCG@10 --output reports/ml100k

Arguments are result files (``{"records": [...]}``) or directories (every ``*.json`` with records below
them). The table is always printed; with ``--output DIR`` it is also written to ``DIR/report.md`` with a
bar plot ``DIR/report.png``.
"""

from __future__ import annotations

import argparse
import sys

from recalign.evaluation.report import (
    DEFAULT_METRICS,
    collect_records,
    comparison_table,
    render_markdown,
    write_report,
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="comparison table (Markdown) and bar plot (PNG) of result records",
        description="Rows are methods, columns (dataset/split/protocol, metric).",
    )
    p.add_argument("results", nargs="+", metavar="RESULTS", help="result files or directories")
    p.add_argument("--output", default=None, help="directory for report.md and report.png (else print only)")
    p.add_argument(
        "--metrics",
        default=",".join(DEFAULT_METRICS),
        help=f"comma-separated metric names (default {','.join(DEFAULT_METRICS)}; absent ones are skipped)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    records = collect_records(args.results)
    if args.output:
        from recalign.rundir import open_output_dir

        open_output_dir(args.output)  # not a file, writable, not held by another live run
        md_path, png_path, table = write_report(records, args.output, metrics, sources=args.results)
        print(table, end="")
        print(f"wrote {md_path} and {png_path}", file=sys.stderr)
    else:
        print(render_markdown(comparison_table(records, metrics)), end="")
    return 0
