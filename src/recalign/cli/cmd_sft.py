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

from recalign.config import describe_config, load_config
from recalign.errors import RecalignInputError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "sft",
        help="few-shot LoRA SFT of an LM on next-item prompts, then evaluation",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--config", default=None, help="YAML file with SFTConfig fields")
    p.add_argument("--output", default=None, help="run directory (adapter, config, metrics, checkpoints)")
    p.add_argument(
        "--resume", action="store_true", help="continue from the last checkpoint in DIR (training.resume)"
    )
    p.add_argument("--help-config", action="store_true", help="list every config field and exit")
    p.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. training.max_steps=20"
    )
    p.set_defaults(func=cmd_sft)


def cmd_sft(args: argparse.Namespace) -> int:
    from recalign.methods.sft import SFTConfig, run_sft

    if args.help_config:
        print("\n".join(describe_config(SFTConfig)))
        return 0
    cfg = load_config(SFTConfig, args.config, args.overrides)
    if args.resume:
        cfg.training.resume = True
    if not args.output:
        raise RecalignInputError("--output DIR is required", source="command line")
    res = run_sft(cfg, args.output)
    print(
        f"sft: {res.train_steps} steps, train loss {res.train_loss:.4f}, {res.train_seconds:.0f} s"
        + (f" (resumed from {res.resumed_from})" if res.resumed_from else "")
    )
    for k, v in res.metrics["metrics"].items():
        if k.endswith(("HR@1", "NDCG@10", "ValidRatio", "HR@1 (valid)")):
            print(f"  {k}: {v:.4f}")
    print(f"adapter: {res.adapter_dir}")
    return 0
