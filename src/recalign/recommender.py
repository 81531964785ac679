"""The interface every recommender implements, classical or language model.

A recommender is fitted on a dataset and a split, then scores examples (rows of a split's examples
frame: ``user``, ``history``, ``target``, ``candidates``). Evaluation protocols only ever call these two
scoring methods, which is what makes results comparable across methods.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
import pandas as pd

from recalign.data.dataset import RecDataset
from recalign.data.splits import Split


@runtime_checkable
class Recommender(Protocol):
    name: str

    def fit(self, dataset: RecDataset, split: Split) -> Recommender:
        """Train on ``split``'s training data only (never on valid/test targets)."""
        ...

    def score_candidates(self, examples: pd.DataFrame) -> np.ndarray:
        """``[len(examples), n_candidates]`` scores, higher is better, aligned with ``candidates``."""
        ...

    def score_all(self, examples: pd.DataFrame) -> np.ndarray:
        """``[len(examples), n_items]`` scores over the whole catalogue (seen items are masked by the caller)."""
        ...
