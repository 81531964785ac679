"""GRU4Rec (Hidasi et al., 2016) in the now-standard form used by RecBole: a GRU over item embeddings.

item embedding (64) → dropout → GRU (hidden 64) → linear back to the embedding width; the output at
a history's last item is the user representation and item scores are dot products with the (tied)
item embeddings, trained with softmax cross-entropy over all items. A GRU is causal by construction,
so it shares SASRec's window training (:mod:`recalign.baselines.sequential`); right padding never
reaches a real position because the recurrence only runs forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import torch
from torch import nn

from recalign.baselines.sequential import SequenceEncoder, SequentialRecommender, SequentialTrainConfig
from recalign.config import Ge, cfg_field
from recalign.errors import RecalignInputError


@dataclass
class GRU4RecConfig(SequentialTrainConfig):
    embedding_size: Annotated[int, Ge(1)] = cfg_field(
        64, "item embedding width (also the output/scoring width)"
    )
    hidden_size: Annotated[int, Ge(1)] = cfg_field(64, "GRU hidden state width")
    n_layers: Annotated[int, Ge(1)] = cfg_field(1, "stacked GRU layers")
    dropout_prob: float = cfg_field(0.3, "dropout on the item embeddings fed to the GRU (RecBole default)")

    def validate(self) -> None:
        super().validate()  # with the Ge annotations of these fields
        if not 0.0 <= self.dropout_prob < 1.0:
            raise RecalignInputError("must be in [0, 1)", field="dropout_prob")


class GRU4RecEncoder(SequenceEncoder):
    """GRU sequence encoder; ``forward(seqs) -> [B, L, embedding_size]``."""

    def __init__(self, n_items: int, config: GRU4RecConfig) -> None:
        super().__init__()
        c = config
        self.n_items = n_items
        self.item_emb = nn.Embedding(n_items + 1, c.embedding_size, padding_idx=0)
        self.dropout = nn.Dropout(c.dropout_prob)
        self.gru = nn.GRU(
            c.embedding_size, c.hidden_size, num_layers=c.n_layers, bias=False, batch_first=True
        )
        self.dense = nn.Linear(c.hidden_size, c.embedding_size)
        nn.init.xavier_normal_(self.item_emb.weight)
        for name, p in self.gru.named_parameters():
            if name.startswith("weight"):
                nn.init.xavier_uniform_(p)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    def forward(self, seqs: torch.Tensor) -> torch.Tensor:
        out, _ = self.gru(self.dropout(self.item_emb(seqs)))
        return self.dense(out)

    def item_weight(self) -> torch.Tensor:
        return self.item_emb.weight[1:]


class GRU4Rec(SequentialRecommender):
    """GRU4Rec recommender (see module docstring)."""

    name = "gru4rec"
    config: GRU4RecConfig

    def __init__(self, config: GRU4RecConfig | None = None, *, progress: bool = False) -> None:
        super().__init__(config or GRU4RecConfig(), progress=progress)

    def build_module(self, n_items: int) -> GRU4RecEncoder:
        return GRU4RecEncoder(n_items, self.config)
