"""``recalign align``: preference alignment (DPO, S-DPO, DMPO) of an LM recommender.

    recalign align --loss sdpo --negatives 3 --model runs/sft --config configs/align_ml100k.yaml \
        --output DIR [--resume] [key.sub=value ...]

``--loss``, ``--negatives``, ``--model`` and ``--strategy`` are shortcuts for the config fields of the
same name; every :class:`~recalign.methods.align.AlignConfig` field takes a dotted override
(``recalign align --help-config`` lists them). Resuming is explicit, as for ``recalign sft``.
"""

from __future__ import annotations

import argparse

from recalign.cli.common import add_config_arguments, config_from_args, print_training_summary


def _shortcuts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--loss", choices=["dpo", "sdpo", "dmpo"], default=None, help="preference loss")
    p.add_argument("--negatives", type=int, default=None, metavar="K", help="negatives per positive")
    p.add_argument(
        "--strategy", choices=["random", "popularity", "hard"], default=None, help="negative sampling"
    )
    p.add_argument("--model", default=None, help="start model: SFT run dir, adapter dir or base model")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "align",
        help="DPO / S-DPO / DMPO alignment of an LM recommender",
        description=__doc__.split("\n\n")[0],
    )
    add_config_arguments(
        p, "AlignConfig",
        output_help="run directory (adapter, config, metrics, checkpoints)",
        shortcuts=_shortcuts,
        resume_help="continue from the last checkpoint in DIR",
        overrides_example="beta=0.5",
    )  # fmt: skip
    p.set_defaults(func=cmd_align)


def cmd_align(args: argparse.Namespace) -> int:
    from recalign.methods.align import AlignConfig, run_align

    overrides = list(args.overrides)
    for name in ("loss", "negatives", "strategy", "model"):
        value = getattr(args, name)
        if value is not None:
            overrides.append(f"{name}={value}")
    cfg = config_from_args(AlignConfig, args, overrides, resume=args.resume)
    if cfg is None:
        return 0
    print_training_summary("align", run_align(cfg, args.output))
    return 0
