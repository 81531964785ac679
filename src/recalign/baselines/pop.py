"""Popularity: score every item by how often it occurs in the *training* sequences.

The counts come from :meth:`Split.train_sequences` and nothing else: counting the whole dataset
(``RecDataset.item_popularity``) would include the validation and test targets and inflate the
baseline, the classic leak in popularity baselines. Every user gets the same scores, so the model is
deterministic; ties between equally popular items are ranked against the target by the metrics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import numpy as np
import pandas as pd

from recalign.baselines.common import candidates_of, check_fitted, check_items
from recalign.config import Ge, cfg_field, check_constraints
from recalign.data.dataset import RecDataset
from recalign.data.splits import Split


@dataclass
class PopConfig:
    seed: int = cfg_field(
        0, "unused by popularity (it is deterministic); kept so every baseline takes a seed"
    )
    smoothing: Annotated[float, Ge(0)] = cfg_field(
        0.0, "added to every count; > 0 only changes anything for never-seen items (they tie at the bottom)"
    )

    def validate(self) -> None:
        check_constraints(self)


class PopRecommender:
    """Most-popular recommender over training interactions."""

    name = "pop"

    def __init__(self, config: PopConfig | None = None, *, progress: bool = False) -> None:
        self.config = config or PopConfig()
        self.config.validate()
        self.counts: np.ndarray | None = None
        self.fit_info: dict = {}

    def fit(self, dataset: RecDataset, split: Split) -> PopRecommender:
        seqs = split.train_sequences(dataset)
        flat = np.concatenate(seqs) if seqs else np.zeros(0, np.int64)
        self.counts = np.bincount(flat, minlength=dataset.n_items).astype(np.float64) + self.config.smoothing
        self.fit_info = {"train_interactions": int(len(flat))}
        return self

    def score_all(self, examples: pd.DataFrame) -> np.ndarray:
        check_fitted(self, "counts")
        check_items(examples, len(self.counts), candidates=False)
        return np.tile(self.counts, (len(examples), 1))

    def score_candidates(self, examples: pd.DataFrame) -> np.ndarray:
        check_fitted(self, "counts")
        check_items(examples, len(self.counts), candidates=True)
        return self.counts[candidates_of(examples)]
