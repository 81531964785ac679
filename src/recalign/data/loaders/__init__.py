"""Loaders: each turns one on-disk format into a :class:`~recalign.data.dataset.RecDataset`.

``load_dataset(name_or_path, **options)`` is the single entry point used by the CLI and the API.
"""

from recalign.data.loaders.registry import DATASETS, load_dataset

__all__ = ["DATASETS", "load_dataset"]
