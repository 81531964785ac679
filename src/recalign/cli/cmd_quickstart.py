"""``recalign quickstart``: the README demo -- zero-shot, SFT and S-DPO SmolLM2 next to popularity and SASRec.

    recalign quickstart --output runs/quickstart [--config configs/quickstart.yaml] [--resume]
                        [--results results/sft_ml100k.json] [key.sub=value ...]

Prepares ML-100K (llara split), evaluates every stage on the same test examples and candidates, prints
the Markdown comparison table and writes ``report.md``, ``report.png``, ``results.json`` (quality-results
shape) and ``timing.json`` into ``--output``. Sized to finish in about 20 minutes on a 2-core CPU.
``--resume`` continues an interrupted run (finished stages are read back, SFT and S-DPO training resume
from their last checkpoint). A thin layer over :func:`recalign.methods.quickstart.run_quickstart`.
"""

from __future__ import annotations

import argparse

from recalign.cli.common import config_from_args
from recalign.config import parse_overrides


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "quickstart",
        help="demo: zero-shot, few-shot SFT and S-DPO SmolLM2 vs popularity and SASRec on ML-100K",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--output", default="runs/quickstart", help="run directory (default runs/quickstart)")
    p.add_argument("--config", default=None, help="YAML file with QuickstartConfig fields")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --output")
    p.add_argument("--results", default=None, help="also write the records to this JSON file")
    p.add_argument("--help-config", action="store_true", help="list every config field and exit")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. n_train=128")
    p.set_defaults(func=cmd_quickstart)


def cmd_quickstart(args: argparse.Namespace) -> int:
    from recalign.evaluation.records import current_command
    from recalign.methods.quickstart import QuickstartConfig, run_quickstart

    overrides = parse_overrides(args.overrides)
    if args.results:
        overrides["results"] = args.results
    # --resume is run_quickstart's: finished stages are read back, training stages continue
    cfg = config_from_args(QuickstartConfig, args, overrides)
    if cfg is None:
        return 0
    res = run_quickstart(cfg, args.output, resume=args.resume, command=current_command())
    print()
    print(res.table)
    print(f"plot: {res.plot}")
    print(f"results: {res.output_dir / 'results.json'}" + (f" and {cfg.results}" if cfg.results else ""))
    print(f"total: {res.seconds / 60:.1f} min")
    return 0
