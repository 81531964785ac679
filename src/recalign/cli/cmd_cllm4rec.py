"""``recalign cllm4rec``: CLLM4Rec (ID tokens on a frozen LM) — pretrain, finetune, evaluate.

- ``recalign cllm4rec pretrain --config configs/cllm4rec_ml100k.yaml --output DIR [key=value ...]``
- ``recalign cllm4rec finetune --config ... --output DIR [key=value ...]``
- ``recalign cllm4rec evaluate --config ... --output DIR [key=value ...]``
- ``recalign cllm4rec run ...``: the three in a row.

Every stage resumes from ``DIR`` (a finished stage is skipped, an interrupted one continues from its
last checkpoint, early stopping included; the curve is in ``DIR/curve.json``) and refuses a ``DIR`` that holds a run with different training settings. The
resolved config is saved as ``DIR/config.yaml``; evaluation writes ``DIR/metrics.json`` and
``DIR/records.json``. ``--help-config`` lists every field. The work is done by
:mod:`recalign.methods.cllm4rec.pipeline`, importable as a Python API.

Under ``accelerate launch`` the two training stages run data-parallel (``batch_size`` and
``content_batch_size`` are per process) and ``evaluate`` runs on the main process.
"""

from __future__ import annotations

import argparse

from recalign.cli.common import add_config_arguments, config_from_args

STAGES = ("pretrain", "finetune", "evaluate", "run")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("cllm4rec", help="CLLM4Rec: ID tokens, collaborative + content LMs, item head")
    sub = p.add_subparsers(dest="cllm4rec_command", metavar="STAGE")
    p.set_defaults(func=lambda _a: (p.print_help(), 2)[1])
    helps = {
        "pretrain": "mutually-regularised collaborative + content LM pretraining of the ID tables",
        "finetune": "masked-history recommendation fine-tuning with the item head",
        "evaluate": "score the test users; write metrics.json and records.json",
        "run": "pretrain, finetune and evaluate",
    }
    for stage in STAGES:
        sp = sub.add_parser(stage, help=helps[stage])
        add_config_arguments(
            sp, "CLLM4RecConfig",
            output_help="run directory (checkpoints, tables, metrics)",
            overrides_example="pretrain.lr=0.01",
        )  # fmt: skip
        sp.add_argument(
            "--seed", type=int, default=None, help="seed of the run (same as the override seed=N; ablations)"
        )
        sp.set_defaults(func=cmd_stage, stage=stage)


def cmd_stage(args: argparse.Namespace) -> int:
    from recalign.methods.cllm4rec.config import CLLM4RecConfig

    over = [*args.overrides, *([f"seed={args.seed}"] if args.seed is not None else [])]
    cfg = config_from_args(CLLM4RecConfig, args, over)
    if cfg is None:
        return 0

    from recalign.methods.cllm4rec import pipeline
    from recalign.rundir import open_output_dir
    from recalign.training import distributed

    open_output_dir(args.output)  # held across the stages of 'run' (each stage re-enters it)
    stages = ("pretrain", "finetune", "evaluate") if args.stage == "run" else (args.stage,)
    for stage in stages:
        if stage == "evaluate":
            records = pipeline.evaluate(cfg, args.output)
            for r in records:
                shown = ", ".join(
                    f"{k}={v:.4f}"
                    for k, v in r.metrics.items()
                    if k.split("@")[0] in ("Recall", "NDCG", "HR")
                )
                print(f"{r.method} {r.split}/{r.protocol} (n={r.n_examples}): {shown}")
        else:
            res = getattr(pipeline, stage)(cfg, args.output)
            if res is not None and distributed.is_main():
                best = (
                    f"; best valid Recall@20 {res.best['value']:.4f} at epoch {res.best['epoch']}"
                    + (" (stopped early)" if res.stopped_early else "")
                    if res.best
                    else ""
                )
                print(f"{stage}: {res.steps} steps in {res.seconds:.0f}s{best} -> {args.output}")
    return 0
