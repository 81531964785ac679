"""Classical recommenders on the same splits and candidates as the language-model methods.

``BASELINES`` maps each method name (as used in result records and ``recalign baseline --method``) to
its config dataclass and recommender class. :func:`make_baseline` builds one from a config file plus
dotted overrides; :func:`~recalign.baselines.runner.run_baseline` fits and evaluates it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from recalign.baselines.bprmf import BPRMFConfig, BPRMFRecommender
from recalign.baselines.gru4rec import GRU4Rec, GRU4RecConfig, GRU4RecEncoder
from recalign.baselines.pop import PopConfig, PopRecommender
from recalign.baselines.sasrec import SASRec, SASRecConfig, SASRecEncoder
from recalign.baselines.sequential import SequenceEncoder, SequentialRecommender, SequentialTrainConfig
from recalign.config import load_config
from recalign.errors import RecalignInputError

BASELINES: dict[str, tuple[type, type]] = {
    "pop": (PopConfig, PopRecommender),
    "bprmf": (BPRMFConfig, BPRMFRecommender),
    "sasrec": (SASRecConfig, SASRec),
    "gru4rec": (GRU4RecConfig, GRU4Rec),
}


def baseline_config_class(method: str) -> type:
    if method not in BASELINES:
        raise RecalignInputError(
            f"unknown baseline '{method}' (choose from {', '.join(BASELINES)})", field="method"
        )
    return BASELINES[method][0]


def load_baseline_config(
    method: str, path: str | Path | None = None, overrides: list[str] | dict | None = None
) -> Any:
    """The method's config: defaults ← YAML ``path`` ← ``key=value`` overrides (unknown keys rejected)."""
    return load_config(baseline_config_class(method), path, overrides)


def make_baseline(method: str, config: Any = None, *, progress: bool = False, **overrides: Any) -> Any:
    """A fresh, unfitted baseline. ``config`` defaults to the method's defaults; keyword overrides
    (``make_baseline("sasrec", epochs=5)``) are validated like command-line ones."""
    cls = baseline_config_class(method)
    if config is None:
        config = load_config(cls, None, overrides or None)
    elif overrides:
        raise TypeError("pass either a config or keyword overrides, not both")
    if not isinstance(config, cls):
        raise TypeError(f"{method} needs a {cls.__name__}, got {type(config).__name__}")
    return BASELINES[method][1](config, progress=progress)


__all__ = [
    "BASELINES",
    "BPRMFConfig",
    "BPRMFRecommender",
    "GRU4Rec",
    "GRU4RecConfig",
    "GRU4RecEncoder",
    "PopConfig",
    "PopRecommender",
    "SASRec",
    "SASRecConfig",
    "SASRecEncoder",
    "SequenceEncoder",
    "SequentialRecommender",
    "SequentialTrainConfig",
    "baseline_config_class",
    "load_baseline_config",
    "make_baseline",
]
