"""``recalign align``: preference alignment (DPO, S-DPO, DMPO) of an LM recommender.

    recalign align --loss sdpo --negatives 3 --model runs/sft --config configs/align_ml100k.yaml \
        --output DIR [--resume] [key.sub=value ...]

``--loss``, ``--negatives``, ``--model`` and ``--strategy`` are shortcuts for the config fields of the
same name; every :class:`~recalign.methods.align.AlignConfig` field takes a dotted override
(``recalign align --help-config`` lists them). Resuming is explicit, as for ``recalign sft``.
"""

from __future__ import annotations

import argparse

from recalign.config import describe_config, load_config
from recalign.errors import RecalignInputError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "align",
        help="DPO / S-DPO / DMPO alignment of an LM recommender",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--config", default=None, help="YAML file with AlignConfig fields")
    p.add_argument("--output", default=None, help="run directory (adapter, config, metrics, checkpoints)")
    p.add_argument("--loss", choices=["dpo", "sdpo", "dmpo"], default=None, help="preference loss")
    p.add_argument("--negatives", type=int, default=None, metavar="K", help="negatives per positive")
    p.add_argument(
        "--strategy", choices=["random", "popularity", "hard"], default=None, help="negative sampling"
    )
    p.add_argument("--model", default=None, help="start model: SFT run dir, adapter dir or base model")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in DIR")
    p.add_argument("--help-config", action="store_true", help="list every config field and exit")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. beta=0.5")
    p.set_defaults(func=cmd_align)


def cmd_align(args: argparse.Namespace) -> int:
    from recalign.methods.align import AlignConfig, run_align

    if args.help_config:
        print("\n".join(describe_config(AlignConfig)))
        return 0
    overrides = list(args.overrides)
    for name in ("loss", "negatives", "strategy", "model"):
        value = getattr(args, name)
        if value is not None:
            overrides.append(f"{name}={value}")
    cfg = load_config(AlignConfig, args.config, overrides)
    if args.resume:
        cfg.training.resume = True
    if not args.output:
        raise RecalignInputError("--output DIR is required", source="command line")
    res = run_align(cfg, args.output)
    print(
        f"align: {res.train_steps} steps, train loss {res.train_loss:.4f}, {res.train_seconds:.0f} s"
        + (f" (resumed from {res.resumed_from})" if res.resumed_from else "")
    )
    for k, v in res.metrics["metrics"].items():
        if k.endswith(("HR@1", "NDCG@10", "ValidRatio", "HR@1 (valid)")):
            print(f"  {k}: {v:.4f}")
    print(f"adapter: {res.adapter_dir}")
    return 0
