"""Shared training and scoring for next-item sequence models (SASRec, GRU4Rec, and models built on them).

A sequence model is split in two on purpose:

- a :class:`SequenceEncoder` (``nn.Module``) that maps padded item sequences to hidden states,
  ``forward(seqs) -> [B, L, D]`` with output ``t`` depending only on items ``0..t`` (causal), and that
  owns the item embedding table used as the output layer (``item_weight() -> [n_items, D]``);
- a :class:`SequentialRecommender` that trains such an encoder and implements the ``Recommender``
  protocol. Its :meth:`~SequentialRecommender.encode` gives the user representation ``[n, D]`` and
  :meth:`~SequentialRecommender.score_representations` turns any ``[n, D]`` representation into item
  scores, so a model that fuses the sequence representation with something else (e.g. a text
  embedding, DPO4Rec's knowledge-augmented SASRec) reuses both halves unchanged.

Training ("the next item at every position", as in SASRec and RecBole's CE setting): every training
sequence is cut into windows of at most ``max_len`` inputs; the encoder runs once per window and the
loss is a softmax cross-entropy over *all* items at every position. Because the encoder is causal this
equals training on every prefix separately (each truncated to its last ``max_len`` items, up to the
window boundary) at ~``max_len`` times less compute. Window boundaries are re-drawn every epoch
(``random_windows``) so that a target is not always seen with the same context length; the windows
ending at a user's most recent training item always keep their full context. Every target is used
exactly once per epoch.

Only ``split.train_sequences(dataset)`` is trained on; validation examples are used for early stopping
(validation NDCG@10 under full ranking by default, RecBole's choice), never as training targets.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Annotated, Literal

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from recalign.baselines.common import (
    candidates_of,
    check_fitted,
    check_items,
    factor_scores,
    histories_of,
    pad_histories,
    seeded,
    torch_threads,
)
from recalign.config import Ge, Gt, cfg_field, check_constraints
from recalign.data.dataset import RecDataset
from recalign.data.splits import Split
from recalign.errors import RecalignInputError

IGNORE = -100  # target value of positions without a loss (padding, or targets owned by another window)


@dataclass
class SequentialTrainConfig:
    """Training fields shared by every sequence baseline (model fields live in subclasses)."""

    max_len: Annotated[int, Ge(1)] = cfg_field(50, "most recent items of a history the model reads")
    epochs: Annotated[int, Ge(1)] = cfg_field(
        100, "maximum training epochs (early stopping usually ends sooner)"
    )
    batch_size: Annotated[int, Ge(1)] = cfg_field(
        64, "training windows (sequences of <= max_len items) per optimiser step"
    )
    lr: Annotated[float, Gt(0)] = cfg_field(1e-3, "Adam learning rate")
    weight_decay: Annotated[float, Ge(0)] = cfg_field(0.0, "Adam L2 weight decay")
    early_stopping: bool = cfg_field(
        True, "stop when the validation metric stops improving (needs a valid stage)"
    )
    patience: Annotated[int, Ge(1)] = cfg_field(
        10, "validation evaluations without improvement before stopping"
    )
    eval_every: Annotated[int, Ge(1)] = cfg_field(1, "epochs between validation evaluations")
    valid_protocol: Literal["full", "candidates"] = cfg_field(
        "full", "protocol of the early-stopping metric on the valid stage"
    )
    valid_metric: str = cfg_field(
        "NDCG@10", "early-stopping metric (HR@K, NDCG@K, MRR@K with K in 1,5,10,20)"
    )
    random_windows: bool = cfg_field(True, "re-draw window boundaries each epoch (varies context lengths)")
    seed: int = cfg_field(0, "seed for initialisation, dropout and window order")
    threads: int = cfg_field(
        1, "torch CPU threads (1 is fastest for models this small on a shared CPU); 0 = all cores, at most 2"
    )

    def validate(self) -> None:
        check_constraints(self)  # also the fields of a subclass (SASRec, GRU4Rec)
        kind, _, k = self.valid_metric.partition("@")
        if kind not in ("HR", "NDCG", "MRR") or k not in ("1", "5", "10", "20"):
            raise RecalignInputError(f"unsupported metric {self.valid_metric!r}", field="valid_metric")


class SequenceEncoder(nn.Module):
    """Causal encoder of right-padded item sequences (internal ids: item + 1, 0 = padding)."""

    n_items: int

    def forward(self, seqs: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """``[B, L]`` internal ids -> ``[B, L, D]``; output ``t`` may depend only on inputs ``0..t``."""
        raise NotImplementedError

    def item_weight(self) -> torch.Tensor:  # pragma: no cover - abstract
        """``[n_items, D]`` output embeddings, row ``i`` = dataset item ``i`` (padding row excluded)."""
        raise NotImplementedError

    def encode(self, seqs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """``[B, D]`` representation after each sequence's last real item (position ``length - 1``)."""
        hidden = self.forward(seqs)
        return hidden[torch.arange(len(seqs)), lengths - 1]


def training_windows(
    sequences: list[np.ndarray], max_len: int, rng: np.random.Generator | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Cut training sequences into causal windows: inputs ``[W, max_len]`` and targets ``[W, max_len]``.

    Window inputs are internal ids (item + 1, right-padded with 0); ``targets[w, t]`` is the dataset
    index of the item following input ``t``, or ``IGNORE``. Every position ``p >= 1`` of every sequence
    is the target of exactly one window. Windows are laid backwards from the end of each sequence with
    stride ``max_len``; with ``rng`` the first stride is shortened by a random ``r`` in
    ``[0, max_len)``, and the window ending at the last item keeps full context but only the last ``r``
    targets.
    """
    inputs: list[np.ndarray] = []
    targets: list[np.ndarray] = []
    for s in sequences:
        s = np.asarray(s, dtype=np.int64)
        n = len(s)
        if n < 2:
            continue
        r = int(rng.integers(0, max_len)) if rng is not None else 0
        ends = [n - 1]
        e = n - 1 - r if r > 0 else n - 1 - max_len
        while e >= 1:
            ends.append(e)
            e -= max_len
        for k, e in enumerate(ends):
            owned_after = ends[k + 1] if k + 1 < len(ends) else 0  # positions <= this belong to later windows
            start = max(0, e - max_len)
            inp = np.zeros(max_len, dtype=np.int64)
            tgt = np.full(max_len, IGNORE, dtype=np.int64)
            m = e - start
            inp[:m] = s[start:e] + 1
            positions = np.arange(start + 1, e + 1)
            t = s[start + 1 : e + 1].copy()
            t[positions <= owned_after] = IGNORE
            tgt[:m] = t
            inputs.append(inp)
            targets.append(tgt)
    if not inputs:
        return np.zeros((0, max_len), np.int64), np.zeros((0, max_len), np.int64)
    return np.stack(inputs), np.stack(targets)


class SequentialRecommender:
    """Trains a :class:`SequenceEncoder` with full-softmax cross-entropy; scores by dot product."""

    name = "sequential"
    config: SequentialTrainConfig

    def __init__(self, config: SequentialTrainConfig, *, progress: bool = False) -> None:
        config.validate()
        self.config = config
        self.progress = progress
        self.module: SequenceEncoder | None = None
        self.n_items: int | None = None
        self.fit_info: dict = {}

    # ------------------------------------------------------------------ to implement
    def build_module(self, n_items: int) -> SequenceEncoder:  # pragma: no cover - abstract
        raise NotImplementedError

    # ------------------------------------------------------------------ training
    def loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over all items at every position that has a target."""
        hidden = self.module(inputs)
        mask = targets != IGNORE
        logits = hidden[mask] @ self.module.item_weight().T
        return F.cross_entropy(logits, targets[mask])

    def fit(self, dataset: RecDataset, split: Split) -> SequentialRecommender:
        cfg = self.config
        sequences = split.train_sequences(dataset)
        valid = split.stage("valid") if cfg.early_stopping else split.examples.iloc[:0]
        if cfg.early_stopping and cfg.valid_protocol == "candidates" and len(valid):
            candidates_of(valid)  # fail now, not after the first epoch
        rng = np.random.default_rng(cfg.seed)
        self.n_items = dataset.n_items
        history: list[dict] = []
        best_score, best_epoch, best_state, since_best = -np.inf, 0, None, 0
        start_time = time.perf_counter()
        with torch_threads(cfg.threads), seeded(cfg.seed):
            self.module = self.build_module(dataset.n_items)
            opt = torch.optim.Adam(self.module.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
            tiled = training_windows(sequences, cfg.max_len)
            if not len(tiled[0]):
                raise RecalignInputError("no training sequence has two or more items", field="split")
            fixed = None if cfg.random_windows else tiled
            bar = tqdm(range(1, cfg.epochs + 1), desc=self.name, unit="epoch", disable=not self.progress)
            epoch = 0
            for epoch in bar:
                inputs, targets = (
                    fixed if fixed is not None else training_windows(sequences, cfg.max_len, rng)
                )
                order = rng.permutation(len(inputs))
                self.module.train()
                total, count = 0.0, 0
                for b in range(0, len(order), cfg.batch_size):
                    idx = order[b : b + cfg.batch_size]
                    inp = torch.from_numpy(inputs[idx])
                    tgt = torch.from_numpy(targets[idx])
                    width = int((inp != 0).sum(1).max())  # drop all-padding columns
                    loss = self.loss(inp[:, :width], tgt[:, :width])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    n_t = int((tgt != IGNORE).sum())
                    total += loss.item() * n_t
                    count += n_t
                row = {"epoch": epoch, "loss": total / max(count, 1)}
                if len(valid) and epoch % cfg.eval_every == 0:
                    score = self._validate(valid)
                    row["valid"] = score
                    if score > best_score:
                        best_score, best_epoch, since_best = score, epoch, 0
                        best_state = copy.deepcopy(self.module.state_dict())
                    else:
                        since_best += 1
                    bar.set_postfix(loss=f"{row['loss']:.3f}", valid=f"{score:.4f}", best=f"{best_score:.4f}")
                else:
                    bar.set_postfix(loss=f"{row['loss']:.3f}")
                history.append(row)
                if len(valid) and since_best >= cfg.patience:
                    break
            bar.close()
        if best_state is not None:
            self.module.load_state_dict(best_state)
        self.module.eval()
        self.fit_info = {
            "epochs_run": epoch,
            "best_epoch": best_epoch if best_state is not None else epoch,
            f"best_valid_{cfg.valid_protocol}_{cfg.valid_metric}": (
                float(best_score) if best_state is not None else None
            ),
            "train_windows": len(tiled[0]),
            "seconds": time.perf_counter() - start_time,
            "history": history,
        }
        return self

    def _validate(self, valid: pd.DataFrame) -> float:
        from recalign.evaluation.protocols import evaluate_candidates, evaluate_full

        k = int(self.config.valid_metric.split("@")[1])
        evaluate = evaluate_full if self.config.valid_protocol == "full" else evaluate_candidates
        self.module.eval()
        try:
            return float(evaluate(self, valid, ks=(k,))[self.config.valid_metric])
        finally:
            self.module.train()

    # ------------------------------------------------------------------ scoring
    def encode(self, histories: list[np.ndarray], batch_size: int = 1024) -> torch.Tensor:
        """User representations ``[n, D]`` from histories (dataset item indices, chronological).

        Only the last ``max_len`` items are read. Runs without gradients in eval mode; callers that
        train on top of the representation should call ``self.module.encode`` themselves.
        """
        check_fitted(self, "module")
        was_training = self.module.training
        self.module.eval()
        outs = []
        try:
            with torch.no_grad(), torch_threads(self.config.threads):
                for b in range(0, len(histories), batch_size):
                    seqs, lengths = pad_histories(histories[b : b + batch_size], self.config.max_len)
                    outs.append(self.module.encode(seqs, lengths))
        finally:
            self.module.train(was_training)
        if not outs:
            return torch.zeros(0, self.module.item_weight().shape[1])
        return torch.cat(outs)

    def item_embeddings(self) -> torch.Tensor:
        """``[n_items, D]`` output item embeddings (detached), aligned with dataset item indices."""
        check_fitted(self, "module")
        return self.module.item_weight().detach()

    def score_representations(self, reps: torch.Tensor, candidates: np.ndarray | None = None) -> np.ndarray:
        """Scores of representations ``[n, D]`` over all items, or over each row's ``candidates``."""
        return factor_scores(reps.detach(), self.item_embeddings(), candidates)

    def score_all(self, examples: pd.DataFrame) -> np.ndarray:
        check_fitted(self, "module")
        check_items(examples, self.n_items, candidates=False)
        return self.score_representations(self.encode(histories_of(examples)))

    def score_candidates(self, examples: pd.DataFrame) -> np.ndarray:
        check_fitted(self, "module")
        check_items(examples, self.n_items, candidates=True)
        return self.score_representations(self.encode(histories_of(examples)), candidates_of(examples))
