"""What the libraries print on a normal run: only what the user waits for.

transformers 5 draws a progress bar per group of tensors while it loads weights, logs deprecation
notices of its own API through its logger, and peft/transformers raise ``FutureWarning``\\ s on every
adapter load (``is_gradient_checkpointing is deprecated``). None of that is actionable for someone
running ``recalign recommend``. :func:`configure` (called by the CLI entry point) silences it unless
``-v`` is given; recalign's own progress bars (scoring, training, batch recommendation) are not
affected, and neither are warnings raised by recalign itself.
"""

from __future__ import annotations

import logging
import os
import warnings

#: third-party packages whose FutureWarning / DeprecationWarning / logger noise is hidden by default
LIBRARIES = ("transformers", "peft", "torch", "accelerate", "huggingface_hub", "sentence_transformers")

_STATE: dict = {"verbose": None, "filters": [], "env": []}


def configure(verbose: int = 0) -> None:
    """``verbose == 0``: hide library progress bars, library warnings and library log lines below ERROR.
    ``verbose >= 1``: the libraries' defaults (everything shows; what an earlier quiet call changed in
    this process is undone), and recalign's logger at INFO."""
    _STATE["verbose"] = int(verbose)
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - transformers is a dependency
        hf_logging = None
    if verbose > 0:
        for f in _STATE["filters"]:
            if f in warnings.filters:
                warnings.filters.remove(f)
        warnings._filters_mutated()  # type: ignore[attr-defined]
        for var in _STATE["env"]:
            os.environ.pop(var, None)
        _STATE["filters"], _STATE["env"] = [], []
        if hf_logging is not None:
            hf_logging.set_verbosity_warning()
            hf_logging.enable_progress_bar()
        for name in LIBRARIES:
            logging.getLogger(name).setLevel(logging.NOTSET)
        logging.getLogger("recalign").setLevel(logging.INFO)
        return
    for var, value in (("HF_HUB_DISABLE_PROGRESS_BARS", "1"), ("TRANSFORMERS_VERBOSITY", "error")):
        if var not in os.environ:
            os.environ[var] = value
            _STATE["env"].append(var)
    pattern = r"(" + "|".join(LIBRARIES) + r")(\..*)?$"
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category, module=pattern)
        _STATE["filters"].append(warnings.filters[0])
    if hf_logging is not None:
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    for name in LIBRARIES:
        logging.getLogger(name).setLevel(logging.ERROR)


def verbose() -> int:
    """The level :func:`configure` was called with (0 when it was not called)."""
    return int(_STATE["verbose"] or 0)


def parse_args(parser, argv: list[str] | None = None):
    """``parser.parse_args(argv)`` for a script (a benchmark): adds ``-v/--verbose`` and applies
    :func:`configure` with it, so the script is as quiet as the CLI unless ``-v`` is given."""
    add_verbose_flag(parser)
    args = parser.parse_args(argv)
    configure(args.verbose)
    return args


def add_verbose_flag(parser) -> None:
    """``-v/--verbose`` on ``parser`` and on every (nested) subcommand parser, so that both
    ``recalign -v recommend ...`` and ``recalign recommend ... -v`` work."""
    import argparse

    def walk(p, top: bool) -> None:
        if not any("-v" in a.option_strings for a in p._actions):
            p.add_argument(
                "-v",
                "--verbose",
                action="count",
                default=0 if top else argparse.SUPPRESS,
                help="show library progress bars, warnings and log lines (hidden by default)",
            )
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    walk(sub, False)

    walk(parser, True)
