"""``recalign dpo4rec``: preference summaries judged by a knowledge-augmented recommender, aligned with DPO.

    recalign dpo4rec --config configs/dpo4rec_ml100k.yaml --output DIR [--samples N] [--iterations T]
                     [--users U] [key.sub=value ...]

``--samples`` / ``--iterations`` / ``--users`` are shortcuts for ``summary.samples``, ``iterations`` and
``users``; every other field is a dotted override (``recalign dpo4rec --help-config`` lists them all).
Rerunning the same command with the same ``--output`` resumes: finished stages are read back, an
interrupted summary-generation stage continues from its last finished batch, and an interrupted DPO
round continues from its last checkpoint. The command is a thin layer over
:func:`recalign.methods.dpo4rec.recipe.run_dpo4rec`.

Under ``accelerate launch`` the DPO rounds train on every process (``dpo.training.batch_size`` per
process); sampling, rewards, the fused recommender and evaluation run on the main process.
"""

from __future__ import annotations

import argparse

from recalign.cli.common import add_config_arguments, config_from_args


def _shortcuts(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--samples", type=int, default=None, help="N: summaries sampled per user (summary.samples)"
    )
    p.add_argument("--iterations", type=int, default=None, help="T: sample/reward/DPO rounds (iterations)")
    p.add_argument("--users", type=int, default=None, help="users taking part, 0 = all (users)")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "dpo4rec",
        help="DPO4Rec: LM preference summaries, rewarded by a summary-augmented SASRec, aligned with DPO",
        description=__doc__.split("\n\n")[0],
    )
    add_config_arguments(
        p, "DPO4RecConfig",
        output_help="run directory (required; rerun to resume)",
        shortcuts=_shortcuts,
        overrides_example="dpo.beta=0.2",
    )  # fmt: skip
    p.set_defaults(func=cmd_dpo4rec)


def _overrides(args: argparse.Namespace) -> dict:
    """The shortcut flags, then the dotted overrides (which win)."""
    from recalign.methods.dpo4rec.config import shortcut_overrides

    return shortcut_overrides(
        args.overrides, samples=args.samples, iterations=args.iterations, users=args.users
    )


def build_config(args: argparse.Namespace):
    """The config of parsed arguments (``config``, ``samples``, ``iterations``, ``users``, ``overrides``);
    :func:`recalign.methods.dpo4rec.config.load_dpo4rec_config` is the same without argparse."""
    from recalign.methods.dpo4rec.config import load_dpo4rec_config

    return load_dpo4rec_config(args.config, _overrides(args))


def cmd_dpo4rec(args: argparse.Namespace) -> int:
    from recalign.methods.dpo4rec.config import DPO4RecConfig

    cfg = config_from_args(DPO4RecConfig, args, _overrides(args))
    if cfg is None:
        return 0
    from recalign.methods.dpo4rec.recipe import run_dpo4rec

    result = run_dpo4rec(cfg, args.output)
    if not result.metrics:  # another process of an `accelerate launch` run: the main one reports
        return 0
    for rec in result.records:
        m = rec.metrics
        print(
            f"{rec.method:28s} NDCG@5 {m.get('NDCG@5', float('nan')):.4f}  HR@1 {m.get('HR@1', float('nan')):.4f}"
        )
    r = result.metrics["reward"]
    print(
        f"mean sampled reward ({r['metric']}): before {r['before']['mean']:.4f}, after {r['after']['mean']:.4f} "
        f"(without summary {r['without_summary']:.4f})"
    )
    return 0
