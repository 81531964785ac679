"""``recalign knowledge``: recommendation-knowledge alignment (Cao et al., NAACL Findings 2024).

    recalign knowledge --tasks mim,bpr,retrieval,ranking --ratios 1,1,2,2 --output DIR \\
        [--config configs/knowledge_ml100k.yaml] [--resume] [key.sub=value ...]

Writes the mixture's LoRA adapter, ``config.yaml``, ``metrics.json`` and ``records.json`` to ``DIR``
(see :mod:`recalign.methods.knowledge.recipe`, the Python API doing the work). ``--tasks`` and
``--ratios`` are shorthands for the ``tasks`` / ``ratios`` config fields and win over the YAML file;
``--help-config`` lists every field.
"""

from __future__ import annotations

import argparse

from recalign.config import describe_config, load_config, parse_overrides
from recalign.errors import RecalignInputError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "knowledge",
        help="multi-task SFT on recommendation-knowledge tasks (MIM, MLM, BPR, retrieval, ranking, rating)",
    )
    p.add_argument("--tasks", default=None, help="comma-separated tasks, e.g. mim,bpr,retrieval,ranking")
    p.add_argument("--ratios", default=None, help="comma-separated mixing ratios, one per task, e.g. 1,1,2,2")
    p.add_argument("--config", default=None, help="YAML file with KnowledgeConfig fields")
    p.add_argument("--output", default=None, help="run directory (adapter, checkpoints, metrics)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output")
    p.add_argument("--help-config", action="store_true", help="list every config field and exit")
    p.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. training.max_steps=20"
    )
    p.set_defaults(func=cmd_knowledge)


def _csv(raw: str, what: str) -> list[str]:
    items = [x.strip() for x in raw.split(",") if x.strip()]
    if not items:
        raise RecalignInputError(f"--{what} is empty", source="command line")
    return items


def cmd_knowledge(args: argparse.Namespace) -> int:
    from recalign.methods.knowledge.recipe import KnowledgeConfig

    if args.help_config:
        print("\n".join(describe_config(KnowledgeConfig)))
        return 0
    if not args.output:
        raise RecalignInputError("--output DIR is required", source="command line")
    over = parse_overrides(args.overrides)
    if args.tasks is not None:
        over["tasks"] = _csv(args.tasks, "tasks")
        if args.ratios is None and "ratios" not in over:
            over["ratios"] = [1.0] * len(over["tasks"])
    if args.ratios is not None:
        over["ratios"] = _csv(args.ratios, "ratios")
    if args.resume:
        over.setdefault("training", {})["resume"] = True
    cfg = load_config(KnowledgeConfig, args.config, over)

    from recalign.methods.knowledge.recipe import run_knowledge

    result = run_knowledge(cfg, args.output)
    print(
        f"{cfg.method_name()}: {result.train_steps} steps on {sum(result.task_counts.values())} examples "
        f"{result.task_counts} -> {args.output}"
    )
    return 0
