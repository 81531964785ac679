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

from recalign.cli.common import add_config_arguments, config_from_args
from recalign.config import parse_overrides
from recalign.errors import RecalignInputError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "knowledge",
        help="multi-task SFT on recommendation-knowledge tasks (MIM, MLM, BPR, retrieval, ranking, rating)",
    )
    p.add_argument("--tasks", default=None, help="comma-separated tasks, e.g. mim,bpr,retrieval,ranking")
    p.add_argument("--ratios", default=None, help="comma-separated mixing ratios, one per task, e.g. 1,1,2,2")
    add_config_arguments(
        p, "KnowledgeConfig",
        output_help="run directory (adapter, checkpoints, metrics)",
        resume_help="continue from the last checkpoint in --output",
        overrides_example="training.max_steps=20",
    )  # fmt: skip
    p.set_defaults(func=cmd_knowledge)


def _csv(raw: str, what: str) -> list[str]:
    items = [x.strip() for x in raw.split(",") if x.strip()]
    if not items:
        raise RecalignInputError(f"--{what} is empty", source="command line")
    return items


def _overrides(args: argparse.Namespace) -> dict:
    """The dotted overrides, then ``--tasks`` / ``--ratios`` (which win; equal ratios by default)."""
    over = parse_overrides(args.overrides)
    if args.tasks is not None:
        over["tasks"] = _csv(args.tasks, "tasks")
        if args.ratios is None and "ratios" not in over:
            over["ratios"] = [1.0] * len(over["tasks"])
    if args.ratios is not None:
        over["ratios"] = _csv(args.ratios, "ratios")
    return over


def cmd_knowledge(args: argparse.Namespace) -> int:
    from recalign.methods.knowledge.recipe import KnowledgeConfig

    cfg = config_from_args(KnowledgeConfig, args, _overrides(args), resume=args.resume)
    if cfg is None:
        return 0
    from recalign.methods.knowledge.recipe import run_knowledge

    result = run_knowledge(cfg, args.output)
    print(
        f"{cfg.method_name()}: {result.train_steps} steps on {sum(result.task_counts.values())} examples "
        f"{result.task_counts} -> {args.output}"
    )
    return 0
