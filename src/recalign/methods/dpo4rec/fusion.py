"""The knowledge-augmented sequential recommender: SASRec's user representation fused with a summary.

SASRec maps a history to a user vector ``h`` (``[D]``, D = 64) and scores item ``i`` by ``h · v_i`` with
its item embeddings ``v``. DPO4Rec adds what the LM wrote about the user: the summary's sentence
embedding ``e`` (``[E]``, E = 384 for MiniLM) is fused into the user vector, and items are scored by
``u · v_i`` with the fused ``u``. Two fusions:

- ``gated`` (default): ``u = h + g ⊙ W_t e`` with ``g = σ(W_g [h; e] + b_g)``. The gate lets the model
  trust the text more for some users (short or ambiguous histories) than for others.
- ``concat``: ``u = W [h; e] + b``, a linear layer on the concatenation.

Optionally (``item_text``, on by default) the summary is also matched against each item's own text
(title, year, genres; embedded by the same sentence encoder): ``score_i = u · v_i + α (e · t_i)`` with a
learned scalar ``α``. This is the "knowledge" side of the augmentation: a summary that says *horror
and thrillers* raises horror candidates directly, a relation the model does not have to learn from a
few hundred examples, and it makes the recommender's judgement of a summary depend on what it says.

All parts are initialised so that the augmented model's scores equal SASRec's exactly (``α = 0`` too) (``W_t = 0``; ``W = [I | 0]``): before training, the
augmented model *is* the SASRec baseline, and training can only move it away from that when the text
helps on the training data. With few summaries (hundreds, each costing seconds of LM sampling) this
matters: a randomly initialised fusion would start worse than the baseline it is compared with.

Training (:meth:`AugmentedRecommender.fit`) is next-item cross-entropy over *all* items, like SASRec,
on ``(history, summary) -> target`` examples. By default the pretrained backbone is frozen and its
(eval-mode) representations are computed once, so each epoch only runs the small fusion layer. A
fraction of users is held out to pick the epoch with the lowest held-out cross-entropy (grouped by
user, since one user contributes N examples that share history and target).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from recalign.baselines.common import pad_histories, seeded, torch_threads
from recalign.baselines.sequential import SequenceEncoder
from recalign.io import atomic_write_bytes
from recalign.methods.dpo4rec.config import FusionConfig

FUSIONS = ("gated", "concat")


class SummaryFusion(nn.Module):
    """Fuses a user vector ``h`` ``[B, D]`` with a text embedding ``e`` ``[B, E]`` into ``u`` ``[B, D]``."""

    def __init__(self, hidden: int, text_dim: int, mode: str = "gated", text_dropout: float = 0.0) -> None:
        super().__init__()
        if mode not in FUSIONS:
            raise ValueError(f"unknown fusion {mode!r} (choose from {', '.join(FUSIONS)})")
        self.mode = mode
        self.hidden = hidden
        self.text_dim = text_dim
        self.text_dropout = nn.Dropout(text_dropout)
        if mode == "gated":
            self.text_proj = nn.Linear(text_dim, hidden)
            self.gate = nn.Linear(hidden + text_dim, hidden)
            nn.init.zeros_(self.text_proj.weight)
            nn.init.zeros_(self.text_proj.bias)
            nn.init.normal_(self.gate.weight, 0.0, 0.02)
            nn.init.zeros_(self.gate.bias)
        else:
            self.mix = nn.Linear(hidden + text_dim, hidden)
            with torch.no_grad():
                self.mix.weight.zero_()
                self.mix.weight[:, :hidden] = torch.eye(hidden)
                self.mix.bias.zero_()

    def forward(self, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        if h.shape[0] != e.shape[0]:
            raise ValueError(f"{h.shape[0]} user vectors but {e.shape[0]} text embeddings")
        if e.shape[1] != self.text_dim:
            raise ValueError(f"text embeddings have dim {e.shape[1]}, the fusion expects {self.text_dim}")
        e = self.text_dropout(e)
        if self.mode == "gated":
            g = torch.sigmoid(self.gate(torch.cat([h, e], dim=1)))
            return h + g * self.text_proj(e)
        return self.mix(torch.cat([h, e], dim=1))


class KnowledgeAugmentedSASRec(nn.Module):
    """A sequence encoder (SASRec's) plus a :class:`SummaryFusion`; scores with the encoder's item table.

    ``item_text`` (``[n_items, E]``, optional) adds the summary-to-item-text match ``α (e · t_i)``.
    """

    def __init__(
        self,
        backbone: SequenceEncoder,
        text_dim: int,
        mode: str = "gated",
        text_dropout: float = 0.0,
        item_text: torch.Tensor | None = None,
    ):
        super().__init__()
        self.backbone = backbone
        hidden = int(backbone.item_weight().shape[1])
        self.fusion = SummaryFusion(hidden, text_dim, mode, text_dropout)
        if item_text is not None:
            n_items = int(backbone.item_weight().shape[0])
            if tuple(item_text.shape) != (n_items, text_dim):
                raise ValueError(f"item_text must be [{n_items}, {text_dim}], got {tuple(item_text.shape)}")
            self.register_buffer("item_text", item_text.detach().float().clone())
            self.text_match = nn.Parameter(torch.zeros(()))
        else:
            self.item_text = None
            self.text_match = None

    def user_vectors(self, seqs: torch.Tensor, lengths: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """``[B, D]`` fused representation from padded sequences (internal ids) and text embeddings."""
        return self.fusion(self.backbone.encode(seqs, lengths), text)

    def item_logits(self, users: torch.Tensor, text: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, n_items]`` scores of fused user vectors (plus the text match, given ``text``)."""
        logits = users @ self.backbone.item_weight().T
        if self.item_text is not None and text is not None:
            logits = logits + self.text_match * (text @ self.item_text.T)
        return logits

    def candidate_scores(
        self, users: torch.Tensor, text: torch.Tensor, candidates: torch.Tensor
    ) -> torch.Tensor:
        """``[B, C]`` scores of each row's candidates (``candidates``: dataset item indices)."""
        scores = torch.einsum("nd,ncd->nc", users, self.backbone.item_weight()[candidates])
        if self.item_text is not None:
            scores = scores + self.text_match * torch.einsum("ne,nce->nc", text, self.item_text[candidates])
        return scores

    def forward(self, seqs: torch.Tensor, lengths: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return self.item_logits(self.user_vectors(seqs, lengths, text), text)


class AugmentedRecommender:
    """Trains and applies a :class:`KnowledgeAugmentedSASRec` on top of a fitted SASRec encoder.

    Args:
        backbone: the fitted SASRec encoder (``SASRec.module``); it is deep-copied, so fold models never
            share (or modify) the baseline's weights.
        max_len: how many recent items the backbone reads (SASRec's ``max_len``).
        text_dim: the sentence-encoder dimension.
        config: fusion mode, optimisation and hold-out settings.
        item_text: ``[n_items, E]`` embeddings of the items' own text, for the text-match term (used
            only when ``config.item_text`` is on).
    """

    def __init__(
        self,
        backbone: SequenceEncoder,
        max_len: int,
        text_dim: int,
        config: FusionConfig | None = None,
        *,
        item_text: np.ndarray | torch.Tensor | None = None,
        threads: int = 0,
        progress: bool = False,
    ) -> None:
        self.config = config or FusionConfig()
        if self.config.item_text and item_text is None:
            raise ValueError("config.item_text is on but no item text embeddings were given")
        item_text_t = (
            torch.as_tensor(np.asarray(item_text, dtype=np.float32)) if self.config.item_text else None
        )
        self.max_len = max_len
        self.threads = threads
        self.progress = progress
        with seeded(self.config.seed):
            self.model = KnowledgeAugmentedSASRec(
                copy.deepcopy(backbone), text_dim, self.config.mode, self.config.text_dropout, item_text_t
            )
        if self.config.freeze_backbone:
            for p in self.model.backbone.parameters():
                p.requires_grad_(False)
        self.model.eval()
        self.fit_info: dict = {}

    # ------------------------------------------------------------------ training
    def _backbone_vectors(self, histories: Sequence[np.ndarray], batch_size: int = 1024) -> torch.Tensor:
        """Eval-mode backbone representations (used as fixed inputs when the backbone is frozen)."""
        outs = []
        self.model.eval()
        with torch.no_grad():
            for b in range(0, len(histories), batch_size):
                seqs, lengths = pad_histories(histories[b : b + batch_size], self.max_len)
                outs.append(self.model.backbone.encode(seqs, lengths))
        return torch.cat(outs) if outs else torch.zeros(0, self.model.fusion.hidden)

    def loss(
        self,
        histories: Sequence[np.ndarray],
        text: torch.Tensor,
        targets: torch.Tensor,
        backbone_vectors: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Mean next-item cross-entropy over all items (``backbone_vectors`` skips the backbone)."""
        if backbone_vectors is not None:
            users = self.model.fusion(backbone_vectors, text)
        else:
            seqs, lengths = pad_histories(list(histories), self.max_len)
            users = self.model.user_vectors(seqs, lengths, text)
        return F.cross_entropy(self.model.item_logits(users, text), targets)

    def fit(
        self,
        histories: Sequence[np.ndarray],
        embeddings: np.ndarray,
        targets: np.ndarray,
        groups: np.ndarray | None = None,
    ) -> AugmentedRecommender:
        """Train on ``(history, summary embedding) -> target`` examples.

        Args:
            histories: per example, the item history (dataset indices, chronological).
            embeddings: ``[n, E]`` summary embeddings.
            targets: ``[n]`` true next items.
            groups: ``[n]`` user of each example; the hold-out split never separates a user's examples.
        """
        cfg = self.config
        n = len(histories)
        if n == 0:
            raise ValueError("no training examples for the fusion model")
        if len(embeddings) != n or len(targets) != n:
            raise ValueError("histories, embeddings and targets must have the same length")
        groups = np.arange(n) if groups is None else np.asarray(groups)
        rng = np.random.default_rng(cfg.seed)
        uniq = np.unique(groups)
        n_hold = int(round(len(uniq) * cfg.holdout_fraction)) if len(uniq) > 1 else 0
        held = set(rng.choice(uniq, size=n_hold, replace=False).tolist()) if n_hold else set()
        is_held = np.array([g in held for g in groups.tolist()], dtype=bool)
        train_idx, hold_idx = np.flatnonzero(~is_held), np.flatnonzero(is_held)
        text_all = torch.as_tensor(np.asarray(embeddings, dtype=np.float32))
        tgt_all = torch.as_tensor(np.asarray(targets, dtype=np.int64))
        hist_all = [np.asarray(h, dtype=np.int64) for h in histories]
        history: list[dict] = []
        best_loss, best_epoch, best_state = np.inf, 0, None
        with torch_threads(self.threads), seeded(cfg.seed):
            fixed = self._backbone_vectors(hist_all) if cfg.freeze_backbone else None
            match = self.model.text_match
            params = [p for p in self.model.parameters() if p.requires_grad and p is not match]
            groups_ = [{"params": params}]
            if match is not None:
                # a single scalar multiplying similarities in [-1, 1]: it needs a larger step than the
                # weight matrices to reach a useful size within a few hundred steps
                groups_.append({"params": [match], "lr": cfg.text_match_lr, "weight_decay": 0.0})
            opt = torch.optim.Adam(groups_, lr=cfg.lr, weight_decay=cfg.weight_decay)
            bar = tqdm(range(1, cfg.epochs + 1), desc="fusion", unit="epoch", disable=not self.progress)
            for epoch in bar:
                self.model.train()
                if cfg.freeze_backbone:
                    self.model.backbone.eval()  # frozen: no dropout noise in its (precomputed) output
                order = rng.permutation(train_idx)
                total = 0.0
                for b in range(0, len(order), cfg.batch_size):
                    idx = order[b : b + cfg.batch_size]
                    loss = self.loss(
                        [hist_all[i] for i in idx],
                        text_all[idx],
                        tgt_all[idx],
                        fixed[idx] if fixed is not None else None,
                    )
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    total += float(loss.detach()) * len(idx)
                row = {"epoch": epoch, "loss": total / max(len(order), 1)}
                if match is not None:
                    row["text_match"] = float(match.detach())
                if len(hold_idx):
                    row["holdout_loss"] = self._eval_loss(hist_all, text_all, tgt_all, hold_idx, fixed)
                    if row["holdout_loss"] < best_loss:
                        best_loss, best_epoch = row["holdout_loss"], epoch
                        best_state = copy.deepcopy(self.model.state_dict())
                history.append(row)
                bar.set_postfix({k: f"{v:.4f}" for k, v in row.items() if k != "epoch"}, refresh=False)
            bar.close()
        if best_state is not None:
            self.model.load_state_dict(best_state)
        self.model.eval()
        self.fit_info = {
            "examples": int(n),
            "train_examples": int(len(train_idx)),
            "holdout_examples": int(len(hold_idx)),
            "best_epoch": int(best_epoch) if best_state is not None else int(cfg.epochs),
            "best_holdout_loss": float(best_loss) if best_state is not None else None,
            "text_match": float(self.model.text_match.detach())
            if self.model.text_match is not None
            else None,
            "history": history,
        }
        return self

    def _eval_loss(self, hist_all, text_all, tgt_all, idx, fixed) -> float:
        self.model.eval()
        with torch.no_grad():
            loss = self.loss(
                [hist_all[i] for i in idx],
                text_all[idx],
                tgt_all[idx],
                fixed[idx] if fixed is not None else None,
            )
        return float(loss)

    # ------------------------------------------------------------------ scoring
    def user_vectors(self, histories: Sequence[np.ndarray], embeddings: np.ndarray, batch_size: int = 512):
        """Fused user vectors ``[n, D]`` (eval mode, no gradients)."""
        self.model.eval()
        outs = []
        with torch.no_grad(), torch_threads(self.threads):
            for b in range(0, len(histories), batch_size):
                seqs, lengths = pad_histories(list(histories[b : b + batch_size]), self.max_len)
                text = torch.as_tensor(np.asarray(embeddings[b : b + batch_size], dtype=np.float32))
                outs.append(self.model.user_vectors(seqs, lengths, text))
        return torch.cat(outs) if outs else torch.zeros(0, self.model.fusion.hidden)

    def score_candidates(
        self, histories: Sequence[np.ndarray], embeddings: np.ndarray, candidates: np.ndarray
    ) -> np.ndarray:
        """``[n, C]`` scores of each row's candidates given its history and summary embedding."""
        users = self.user_vectors(histories, embeddings)
        text = torch.as_tensor(np.asarray(embeddings, dtype=np.float32))
        cand = torch.as_tensor(np.asarray(candidates, dtype=np.int64))
        with torch.no_grad():
            return self.model.candidate_scores(users, text, cand).numpy()

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path) -> None:
        """Weights (backbone + fusion) as safetensors, written atomically."""
        from safetensors.torch import save

        state = {k: v.detach().contiguous() for k, v in self.model.state_dict().items()}
        atomic_write_bytes(path, save(state, metadata={"mode": self.config.mode}))

    def load(self, path: str | Path) -> AugmentedRecommender:
        from safetensors.torch import load_file

        self.model.load_state_dict(load_file(str(path)))
        self.model.eval()
        return self
