"""The command-line pattern of the config-driven commands (``sft``, ``align``, ``knowledge``, ``dpo4rec``,
``cllm4rec``, ``quickstart``): ``--config FILE``, ``--output DIR``, ``--resume``, ``--help-config`` and
dotted ``KEY=VALUE`` overrides, resolved into the command's typed config.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any, TypeVar

from recalign.config import describe_config, load_config
from recalign.errors import RecalignInputError

T = TypeVar("T")


def add_config_arguments(
    p: argparse.ArgumentParser,
    config_name: str,
    *,
    output_help: str,
    overrides_example: str,
    resume_help: str | None = None,
    shortcuts: Callable[[argparse.ArgumentParser], None] | None = None,
) -> None:
    """Add ``--config``, ``--output``, the command's ``shortcuts`` flags (if any), ``--resume`` (when
    ``resume_help`` is given), ``--help-config`` and the ``KEY=VALUE`` overrides, in that order."""
    p.add_argument("--config", default=None, help=f"YAML file with {config_name} fields")
    p.add_argument("--output", default=None, help=output_help)
    if shortcuts is not None:
        shortcuts(p)
    if resume_help is not None:
        p.add_argument("--resume", action="store_true", help=resume_help)
    p.add_argument("--help-config", action="store_true", help="list every config field and exit")
    p.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help=f"dotted overrides, e.g. {overrides_example}"
    )


def config_from_args(
    cls: type[T],
    args: argparse.Namespace,
    overrides: list[str] | dict[str, Any] | None = None,
    *,
    resume: bool = False,
) -> T | None:
    """The command's config: defaults <- ``--config`` <- ``overrides`` (default: the positional
    ``KEY=VALUE`` list); ``resume`` (the command's ``--resume``) sets ``training.resume``.

    With ``--help-config`` the fields are printed and None is returned (the command then exits 0).
    ``--output`` is required (one-line error, exit 2).
    """
    if args.help_config:
        print("\n".join(describe_config(cls)))
        return None
    if not args.output:
        raise RecalignInputError("--output DIR is required", source="command line")
    cfg = load_config(cls, args.config, args.overrides if overrides is None else overrides)
    if resume:
        cfg.training.resume = True  # type: ignore[attr-defined]
    return cfg


def print_training_summary(command: str, res: Any) -> None:
    """The closing lines of ``recalign sft`` / ``align``: steps, loss, time, headline metrics, adapter."""
    print(
        f"{command}: {res.train_steps} steps, train loss {res.train_loss:.4f}, {res.train_seconds:.0f} s"
        + (f" (resumed from {res.resumed_from})" if res.resumed_from else "")
    )
    for k, v in res.metrics["metrics"].items():
        if k.endswith(("HR@1", "NDCG@10", "ValidRatio", "HR@1 (valid)")):
            print(f"  {k}: {v:.4f}")
    print(f"adapter: {res.adapter_dir}")
