"""``recalign dmpo``: DMPO's few-shot setting (Bai et al.) -- few-shot SFT, then DMPO and S-DPO at equal
budget, evaluated in-genre and cross-genre on the prompt trained on.

    recalign dmpo --config configs/dmpo_fewshot_ml100k.yaml --output DIR [--prompt pairwise|candidates] \\
        [key.sub=value ...]

Writes every stage's adapter, per-pair scores and ``records.json`` to ``DIR`` (see
:mod:`recalign.methods.dmpo_fewshot`, the Python API doing the work); a rerun into the same directory
continues from the finished stages (``resume: true``). ``--help-config`` lists every field.
"""

from __future__ import annotations

import argparse

from recalign.cli.common import add_config_arguments, config_from_args
from recalign.config import parse_overrides


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "dmpo", help="DMPO's few-shot setting: SFT, then DMPO / S-DPO, pairwise and candidate metrics"
    )
    add_config_arguments(
        p, "DMPOFewShotConfig",
        output_help="run directory (one subdirectory per stage, records.json)",
        overrides_example="eval.n_test=100",
        shortcuts=lambda q: q.add_argument(
            "--prompt", choices=["pairwise", "candidates"], default=None,
            help="training prompt (the config's prompt field; default pairwise, the paper's)",
        ),
    )  # fmt: skip
    p.set_defaults(func=cmd_dmpo)


def cmd_dmpo(args: argparse.Namespace) -> int:
    from recalign.methods.dmpo_fewshot import DMPOFewShotConfig

    over = parse_overrides(args.overrides)
    if args.prompt is not None:
        over["prompt"] = args.prompt
    cfg = config_from_args(DMPOFewShotConfig, args, over)
    if cfg is None:
        return 0
    from recalign.methods.dmpo_fewshot import run_dmpo_fewshot

    result = run_dmpo_fewshot(cfg, args.output)
    for r in result.records:
        keys = ("PairAcc", "AUC", "HR@1", "NDCG@10")
        shown = ", ".join(f"{k}={r.metrics[k]:.4f}" for k in keys if k in r.metrics)
        print(f"{r.method} [{r.protocol}] n={r.n_examples}: {shown}")
    print(f"{len(result.records)} records -> {args.output}/records.json")
    return 0
