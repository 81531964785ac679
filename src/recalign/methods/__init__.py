"""Training recipes (SFT, zero-shot evaluation, S-DPO/DMPO, knowledge alignment, CLLM4Rec, DPO4Rec) and
the helpers they share for choosing data.

Two helpers live here because every recipe must use the *same* ones for results to be comparable:

- :func:`load_data` prepares a dataset and split through the data layer's own entry point
  (:func:`recalign.data.prepare.prepare`: loader, filtering, split, seeded candidates), so an LM run and
  ``recalign baseline`` / ``recalign data prepare`` see identical examples and candidate sets.
- :func:`sample_examples` draws the few-shot training subset and the evaluation subset. It is seeded and
  independent of row order elsewhere, so "the 200 test examples of seed 0" are the same for zero-shot,
  SFT, preference-aligned models and the classical baselines.

Kept free of heavy imports (torch/transformers load only when a recipe runs).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pandas as pd

from recalign.data.dataset import RecDataset
from recalign.data.splits import Split
from recalign.errors import RecalignInputError

#: Mixed into the sampling seed so that the training and test subsets are not the same random stream.
_SAMPLE_SALT = {"train": 0x5F7_0001, "valid": 0x5F7_0002, "test": 0x5F7_0003}


@dataclass
class PreparedData:
    """A dataset with its split, as every recipe receives it."""

    dataset: RecDataset
    split: Split
    seconds: float = 0.0


def load_data(data_cfg) -> PreparedData:
    """Load, filter and split per a :class:`recalign.data.prepare.DataPrepareConfig`."""
    from recalign.data.prepare import prepare

    t0 = time.perf_counter()
    split, dataset, _ = prepare(data_cfg)
    return PreparedData(dataset=dataset, split=split, seconds=time.perf_counter() - t0)


def sample_examples(frame: pd.DataFrame, n: int, seed: int, stage: str = "test") -> pd.DataFrame:
    """``n`` rows of a split stage drawn uniformly without replacement, in their original order.

    ``n <= 0`` or ``n >= len(frame)`` returns every row. The draw depends only on ``(seed, stage,
    len(frame))``, so every method asking for "n test examples with seed s" gets the same rows.
    """
    if stage not in _SAMPLE_SALT:
        raise RecalignInputError(f"unknown stage '{stage}' (choose from {', '.join(_SAMPLE_SALT)})")
    if len(frame) == 0:
        raise RecalignInputError(f"the {stage} stage of this split has no examples")
    if n <= 0 or n >= len(frame):
        return frame.reset_index(drop=True)
    rng = np.random.default_rng([int(seed), _SAMPLE_SALT[stage]])
    rows = np.sort(rng.choice(len(frame), size=int(n), replace=False))
    return frame.iloc[rows].reset_index(drop=True)


def set_threads(threads: int) -> None:
    """``torch.set_num_threads(threads)`` when ``threads > 0`` (0 keeps torch's default, one per core).

    On a CPU shared with other busy processes, one thread per process is often several times faster
    than two: torch's parallel regions wait for their slowest thread, and a descheduled thread stalls
    every small operation.
    """
    if threads > 0:
        import torch

        torch.set_num_threads(int(threads))


__all__ = ["PreparedData", "load_data", "sample_examples", "set_threads"]
