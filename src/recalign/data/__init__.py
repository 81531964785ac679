"""Data layer: one representation (:class:`RecDataset`), loaders, preprocessing, splits, candidates."""

from recalign.data.dataset import RecDataset
from recalign.data.splits import SPLITS, STAGES, Split, build_split

__all__ = ["SPLITS", "STAGES", "RecDataset", "Split", "build_split"]
