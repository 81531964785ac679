"""Pieces shared by the classical baselines: seeding, CPU threads, history padding, factor scoring.

Why these helpers exist:

- **Seeding without side effects.** ``fit`` must be reproducible from the config's seed alone, but a
  library call should not reset the caller's global RNG. :func:`seeded` forks torch's CPU RNG, seeds it,
  and restores the previous state on exit.
- **Threads.** The reference machine has 2 cores shared by several jobs. Models this small gain little
  from intra-op parallelism, and when the CPU is oversubscribed OpenMP's spin-waiting makes 2 threads
  dramatically slower than 1 (measured: 95 BPR steps took 0.7 s with 1 thread, 45 s with 2 under a
  load average of 12). The configs therefore default to ``threads = 1``; ``0`` means "all cores, at
  most 2". The previous setting is restored afterwards, so a caller's process-wide choice is kept.
- **Item ids.** Dataset item indices are ``0..n_items-1``. Sequence models reserve index 0 for padding,
  so inside them an item is ``item + 1`` (:func:`pad_histories` does the shift); scores are always
  returned over dataset indices.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import pandas as pd
import torch

from recalign.errors import RecalignInputError


def resolve_threads(threads: int) -> int:
    """``threads`` if positive, else the number of CPUs capped at 2 (more only adds contention)."""
    if threads > 0:
        return threads
    return max(1, min(2, os.cpu_count() or 1))


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run a block with ``resolve_threads(threads)`` intra-op threads, restoring the old value after."""
    old = torch.get_num_threads()
    torch.set_num_threads(resolve_threads(threads))
    try:
        yield
    finally:
        torch.set_num_threads(old)


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed torch's CPU generator for a block (parameter init, dropout) without leaking the state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def histories_of(examples: pd.DataFrame) -> list[np.ndarray]:
    """The ``history`` column as a list of int64 arrays (full, chronological)."""
    return [np.asarray(h, dtype=np.int64) for h in examples["history"]]


def candidates_of(examples: pd.DataFrame) -> np.ndarray:
    """``[n, C]`` candidate matrix; a clear error if the split has no materialised candidates."""
    cands = [np.asarray(c, dtype=np.int64) for c in examples["candidates"]]
    if not cands:
        return np.zeros((0, 0), dtype=np.int64)
    lengths = {len(c) for c in cands}
    if lengths == {0} or len(lengths) != 1:
        raise RecalignInputError(
            "examples have no (or ragged) candidate lists; build the split with candidates"
        )
    return np.stack(cands)


def pad_histories(histories: Sequence[np.ndarray], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``[n, L]`` tensor of the last ``max_len`` items (shifted by +1) and their lengths.

    Right padding keeps the first kept item at position 0, so a context of length ``c`` always occupies
    positions ``0..c-1`` both in training windows and at inference (absolute position embeddings then
    mean the same thing in both). An empty history becomes a single padding token with length 1; the
    model's output for it is whatever it learned for "no context", which is the best it can do.
    """
    n = len(histories)
    lengths = np.array([min(len(h), max_len) for h in histories], dtype=np.int64)
    width = max(1, int(lengths.max()) if n else 1)
    out = np.zeros((n, width), dtype=np.int64)
    for i, h in enumerate(histories):
        k = lengths[i]
        if k:
            out[i, :k] = np.asarray(h[-k:], dtype=np.int64) + 1
    return torch.from_numpy(out), torch.from_numpy(np.maximum(lengths, 1))


def factor_scores(
    users: torch.Tensor, items: torch.Tensor, candidates: np.ndarray | None = None
) -> np.ndarray:
    """Dot-product scores of user vectors ``[n, d]`` against all item vectors ``[n_items, d]``
    (``candidates is None``) or against each row's candidates ``[n, C]``."""
    with torch.no_grad():
        if candidates is None:
            return (users @ items.T).numpy()
        cand = torch.from_numpy(np.asarray(candidates, dtype=np.int64))
        return torch.einsum("nd,ncd->nc", users, items[cand]).numpy()


def check_fitted(model: object, attribute: str) -> None:
    if getattr(model, attribute, None) is None:
        raise RuntimeError(f"{type(model).__name__} is not fitted; call fit(dataset, split) first")


def check_items(examples: pd.DataFrame, n_items: int, *, candidates: bool) -> None:
    """Reject item ids outside the catalogue the model was fitted on (a split of another dataset)."""
    hi = -1
    for h in examples["history"]:
        if len(h):
            hi = max(hi, int(np.max(h)))
    if candidates:
        for c in examples["candidates"]:
            if len(c):
                hi = max(hi, int(np.max(c)))
    if hi >= n_items:
        raise RecalignInputError(
            f"item index {hi} is outside the {n_items} items the model was fitted on "
            "(examples from a different dataset or split?)"
        )
