"""Entry point of the ``recalign`` command.

Subcommands live in ``recalign/cli/cmd_*.py``; each module defines ``register(subparsers)`` that adds
its parser and sets ``func`` (called with the parsed namespace, returns an exit code or None). They are
discovered automatically, so adding a command never means editing this file.

User mistakes (:class:`~recalign.errors.RecalignInputError`) become a single ``error: ...`` line on
stderr and exit code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys

from recalign.errors import RecalignInputError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="recalign",
        description="Language models as recommenders, aligned with recommendation knowledge and preferences.",
    )
    from recalign import __version__

    parser.add_argument("--version", action="version", version=f"recalign {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    import recalign.cli as pkg

    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        if info.name.startswith("cmd_"):
            importlib.import_module(f"recalign.cli.{info.name}").register(sub)
    from recalign.logs import add_verbose_flag

    add_verbose_flag(parser)  # -v anywhere: library progress bars and warnings (quiet by default)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    from recalign.logs import configure

    configure(getattr(args, "verbose", 0))
    from recalign.evaluation import records

    records.set_command_argv(sys.argv[1:] if argv is None else argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from recalign.rundir import scope

    try:
        with scope():  # output directories locked by the command are released when it ends
            code = args.func(args)
    except RecalignInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        records.set_command_argv(None)
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
