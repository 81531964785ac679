"""Fixtures of the knowledge-alignment tests: the hand-written log of knowledge_tinylog.py."""

import pytest
from knowledge_tinylog import make_tiny

from recalign.data.splits import build_split


@pytest.fixture
def tiny():
    ds = make_tiny()
    return ds, build_split(ds, "loo", seed=0, n_candidates=3)
