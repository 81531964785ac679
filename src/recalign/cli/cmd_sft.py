"""``recalign sft``: few-shot LoRA supervised fine-tuning of a language model as a recommender.

    recalign sft --config configs/sft_ml100k.yaml --output DIR [--resume] [key.sub=value ...]

Every :class:`~recalign.methods.sft.SFTConfig` field can be overridden with a dotted ``key=value``
(``recalign sft --help-config`` lists them with their help). The run directory receives the adapter
(safetensors), ``config.yaml``, ``metrics.json``, ``records.json`` and trainer checkpoints.

Resuming is explicit: rerun the same command with ``--resume`` to continue from the last checkpoint in
``DIR/checkpoints``. Without ``--resume`` a directory that already holds checkpoints is refused (exit 2)
so two different runs are never mixed. A thin layer over :func:`recalign.methods.sft.run_sft`.
"""

from __future__ import annotations

import argparse

from recalign.cli.common import add_config_arguments, config_from_args, print_training_summary


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "sft",
        help="few-shot LoRA SFT of an LM on next-item prompts, then evaluation",
        description=__doc__.split("\n\n")[0],
    )
    add_config_arguments(
        p, "SFTConfig",
        output_help="run directory (adapter, config, metrics, checkpoints)",
        resume_help="continue from the last checkpoint in DIR (training.resume)",
        overrides_example="training.max_steps=20",
    )  # fmt: skip
    p.set_defaults(func=cmd_sft)


def cmd_sft(args: argparse.Namespace) -> int:
    from recalign.methods.sft import SFTConfig, run_sft

    cfg = config_from_args(SFTConfig, args, resume=args.resume)
    if cfg is None:
        return 0
    print_training_summary("sft", run_sft(cfg, args.output))
    return 0
