"""Inference and the :class:`~recalign.recommender.Recommender` adapter.

Scoring a user is one forward pass: the recommendation prompt with the user's history (the most
recent ``finetune.max_items`` distinct items, in time order) goes through the frozen backbone on the
collaborative side, and the item head turns the last hidden state into a log-probability for every
item at once. ``score_all`` returns those raw scores (the shared protocols exclude seen items
themselves and keep a re-consumed target); :meth:`CLLM4RecRecommender.recommend` is the serving
path and never returns an item the user has already seen.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from recalign.data.dataset import RecDataset
from recalign.data.splits import Split
from recalign.errors import RecalignInputError
from recalign.methods.cllm4rec.config import CLLM4RecConfig
from recalign.methods.cllm4rec.documents import rec_prompt
from recalign.methods.cllm4rec.model import CLLM4RecModel
from recalign.methods.cllm4rec.protocol import top_k_excluding_seen
from recalign.methods.cllm4rec.training import StageResult, TrainingData, run_stage
from recalign.methods.cllm4rec.vocab import IDTokenizer


def build_model(
    cfg: CLLM4RecConfig, n_users: int, n_items: int, backbone=None, base_tokenizer=None
) -> tuple[CLLM4RecModel, IDTokenizer]:
    """Load (or take) the backbone, freeze it, add the ID tables and wrap the tokenizer."""
    if backbone is None or base_tokenizer is None:
        from recalign.lm.loading import load_model

        backbone, base_tokenizer = load_model(cfg.model.backbone)
    if cfg.model.num_layers is not None:
        truncate_layers(backbone, cfg.model.num_layers)
    vocab = max(len(base_tokenizer), backbone.get_input_embeddings().weight.shape[0])
    tok = IDTokenizer(base_tokenizer, n_users, n_items, vocab_size=vocab, add_bos=cfg.model.add_bos)
    model = CLLM4RecModel(backbone, n_users, n_items, vocab, init_std=cfg.model.init_std, seed=cfg.seed)
    return model, tok


def truncate_layers(backbone, n: int) -> None:
    """Keep the first ``n`` decoder layers (in place). The final norm and the LM head stay, so hidden
    states keep their usual scale; only the depth of the frozen computation changes."""
    from torch import nn

    stack = backbone.base_model
    name = next(
        (a for a in ("layers", "h", "blocks") if isinstance(getattr(stack, a, None), nn.ModuleList)), None
    )
    if name is None:
        raise RecalignInputError(
            f"cannot find the decoder layers of {type(backbone).__name__}", field="model.num_layers"
        )
    layers = getattr(stack, name)
    if n > len(layers):
        raise RecalignInputError(
            f"the backbone has only {len(layers)} layers, asked for {n}", field="model.num_layers"
        )
    setattr(stack, name, layers[:n])
    for cfg_name in ("num_hidden_layers", "n_layer"):
        if hasattr(backbone.config, cfg_name):
            setattr(backbone.config, cfg_name, n)
    if isinstance(getattr(backbone.config, "layer_types", None), list):
        backbone.config.layer_types = backbone.config.layer_types[:n]


def recent_unique(history: np.ndarray, k: int) -> list[int]:
    """The ``k`` most recent distinct items of a chronological history, oldest first."""
    seen: set[int] = set()
    out: list[int] = []
    for it in reversed(np.asarray(history, dtype=np.int64).tolist()):
        if it not in seen:
            seen.add(it)
            out.append(it)
            if len(out) == k:
                break
    return out[::-1]


class CLLM4RecRecommender:
    """CLLM4Rec behind the shared ``fit`` / ``score_candidates`` / ``score_all`` interface."""

    def __init__(
        self,
        config: CLLM4RecConfig | None = None,
        *,
        model: CLLM4RecModel | None = None,
        tokenizer: IDTokenizer | None = None,
        backbone=None,
        base_tokenizer=None,
    ) -> None:
        self.config = config or CLLM4RecConfig()
        self.config.validate()
        self.name = self.config.method
        self.model, self.tokenizer = model, tokenizer
        self._backbone, self._base_tokenizer = backbone, base_tokenizer
        self.results: list[StageResult] = []

    # ------------------------------------------------------------------ training
    def fit(
        self, dataset: RecDataset, split: Split, output_dir: str | Path | None = None
    ) -> CLLM4RecRecommender:
        """Pretrain then fine-tune on ``split``'s training sequences (checkpoints under ``output_dir``)."""
        if self.model is None:
            self.model, self.tokenizer = build_model(
                self.config, dataset.n_users, dataset.n_items, self._backbone, self._base_tokenizer
            )
        data = TrainingData.build(self.tokenizer, dataset, split.train_sequences(dataset))
        out = Path(output_dir) if output_dir is not None else None
        for stage in ("pretrain", "finetune"):
            ckpt = out / "checkpoints" / stage if out is not None else None
            self.results.append(run_stage(self.model, data, self.config, stage, ckpt))
        return self

    # ------------------------------------------------------------------ scoring
    def _check(self, examples: pd.DataFrame) -> None:
        if self.model is None or self.tokenizer is None:
            raise RuntimeError("CLLM4RecRecommender is not fitted; call fit(dataset, split) first")
        users = examples["user"].to_numpy()
        if len(users) and (users.min() < 0 or users.max() >= self.model.n_users):
            raise RecalignInputError(
                f"user index {int(users.max())} is outside the {self.model.n_users} users the model knows"
            )
        for h in examples["history"]:
            if len(h) and int(np.max(h)) >= self.model.n_items:
                raise RecalignInputError(
                    f"item index {int(np.max(h))} is outside the {self.model.n_items} items the model knows"
                )

    @torch.no_grad()
    def log_probs(self, users: np.ndarray, histories: list[np.ndarray]) -> torch.Tensor:
        """``[n, n_items]`` item-head log-probabilities, one forward pass per batch of prompts."""
        assert self.model is not None and self.tokenizer is not None
        self.model.eval()
        max_items, bs = self.config.finetune.max_items, self.config.eval.batch_size
        prompts = [
            rec_prompt(self.tokenizer, int(u), recent_unique(h, max_items)) for u, h in zip(users, histories)
        ]
        out = torch.empty((len(prompts), self.model.n_items))
        for start in range(0, len(prompts), bs):
            chunk = prompts[start : start + bs]
            width = max(len(p) for p in chunk)
            ids = torch.full((len(chunk), width), self.tokenizer.pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for r, p in enumerate(chunk):
                ids[r, : len(p)] = torch.tensor(p)
                mask[r, : len(p)] = 1
            out[start : start + len(chunk)] = self.model.rec_item_log_probs(ids, mask)
        return out

    def score_all(self, examples: pd.DataFrame) -> np.ndarray:
        self._check(examples)
        return self.log_probs(examples["user"].to_numpy(), list(examples["history"])).numpy()

    def score_candidates(self, examples: pd.DataFrame) -> np.ndarray:
        cands = np.stack([np.asarray(c, dtype=np.int64) for c in examples["candidates"]])
        return np.take_along_axis(self.score_all(examples), cands, axis=1)

    def recommend(self, user: int, history, k: int = 10) -> list[int]:
        """Top-``k`` items for one user, never an item already in ``history``."""
        ex = pd.DataFrame({"user": [int(user)], "history": [np.asarray(history, dtype=np.int64)]})
        scores = self.score_all(ex)
        return top_k_excluding_seen(scores, [ex["history"].iloc[0]], k)[0].tolist()
