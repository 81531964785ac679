"""SASRec (Kang & McAuley, 2018) with RecBole's default hyper-parameters and cross-entropy loss.

Architecture, as RecBole configures it by default: item embedding + learned absolute position
embedding → LayerNorm → dropout → 2 post-LN Transformer blocks (2 heads, hidden 64, feed-forward 256
with GELU, ``hidden_dropout_prob`` = ``attn_dropout_prob`` = 0.5, LayerNorm eps 1e-12) with a causal
mask; weights initialised N(0, 0.02). The representation of a history is the output at its last item,
and item scores are dot products with the (tied) input item embeddings; the loss is softmax
cross-entropy over all items, optimised with Adam (lr 1e-3).

Training and scoring live in :class:`~recalign.baselines.sequential.SequentialRecommender`; this file
only defines the encoder, so that a model fusing SASRec's user representation with other signals can
import :class:`SASRecEncoder` (or call :meth:`SASRec.encode`) without touching the training loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import torch
import torch.nn.functional as F
from torch import nn

from recalign.baselines.sequential import SequenceEncoder, SequentialRecommender, SequentialTrainConfig
from recalign.config import Ge, cfg_field
from recalign.errors import RecalignInputError


@dataclass
class SASRecConfig(SequentialTrainConfig):
    n_layers: Annotated[int, Ge(1)] = cfg_field(2, "Transformer blocks")
    n_heads: Annotated[int, Ge(1)] = cfg_field(2, "attention heads per block (must divide hidden_size)")
    hidden_size: Annotated[int, Ge(1)] = cfg_field(64, "width of item/position embeddings and of every block")
    inner_size: Annotated[int, Ge(1)] = cfg_field(256, "width of the feed-forward layer inside each block")
    hidden_dropout_prob: float = cfg_field(0.5, "dropout on embeddings and block outputs (RecBole default)")
    attn_dropout_prob: float = cfg_field(0.5, "dropout on attention probabilities (RecBole default)")
    layer_norm_eps: float = cfg_field(1e-12, "LayerNorm epsilon (RecBole default)")
    initializer_range: float = cfg_field(0.02, "std of the normal initialisation of weights")

    def validate(self) -> None:
        super().validate()  # with the Ge annotations of these fields
        if self.hidden_size % self.n_heads:
            raise RecalignInputError(
                f"hidden_size {self.hidden_size} is not divisible by n_heads {self.n_heads}", field="n_heads"
            )
        for name in ("hidden_dropout_prob", "attn_dropout_prob"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise RecalignInputError("must be in [0, 1)", field=name)


class _CausalSelfAttention(nn.Module):
    def __init__(
        self, hidden: int, heads: int, attn_dropout: float, hidden_dropout: float, eps: float
    ) -> None:
        super().__init__()
        self.heads = heads
        self.attn_dropout = attn_dropout
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.dropout = nn.Dropout(hidden_dropout)
        self.norm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, length, h = x.shape
        q, k, v = self.qkv(x).view(b, length, 3, self.heads, h // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.attn_dropout if self.training else 0.0, is_causal=True
        )
        a = a.transpose(1, 2).reshape(b, length, h)
        return self.norm(x + self.dropout(self.proj(a)))


class _FeedForward(nn.Module):
    def __init__(self, hidden: int, inner: int, dropout: float, eps: float) -> None:
        super().__init__()
        self.up = nn.Linear(hidden, inner)
        self.down = nn.Linear(inner, hidden)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.dropout(self.down(F.gelu(self.up(x)))))


class SASRecEncoder(SequenceEncoder):
    """Self-attentive causal sequence encoder; ``forward(seqs) -> [B, L, hidden]``."""

    def __init__(self, n_items: int, config: SASRecConfig) -> None:
        super().__init__()
        c = config
        self.n_items = n_items
        self.max_len = c.max_len
        self.item_emb = nn.Embedding(n_items + 1, c.hidden_size, padding_idx=0)
        self.pos_emb = nn.Embedding(c.max_len, c.hidden_size)
        self.norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.dropout = nn.Dropout(c.hidden_dropout_prob)
        self.blocks = nn.ModuleList()
        for _ in range(c.n_layers):
            self.blocks.append(
                _CausalSelfAttention(
                    c.hidden_size, c.n_heads, c.attn_dropout_prob, c.hidden_dropout_prob, c.layer_norm_eps
                )
            )
            self.blocks.append(
                _FeedForward(c.hidden_size, c.inner_size, c.hidden_dropout_prob, c.layer_norm_eps)
            )
        self.apply(lambda m: self._init(m, c.initializer_range))
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    @staticmethod
    def _init(module: nn.Module, std: float) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, 0.0, std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def forward(self, seqs: torch.Tensor) -> torch.Tensor:
        if seqs.shape[1] > self.max_len:
            raise ValueError(f"sequence width {seqs.shape[1]} exceeds max_len {self.max_len}")
        positions = torch.arange(seqs.shape[1], device=seqs.device)
        x = self.dropout(self.norm(self.item_emb(seqs) + self.pos_emb(positions)[None]))
        for block in self.blocks:
            x = block(x)
        return x

    def item_weight(self) -> torch.Tensor:
        return self.item_emb.weight[1:]


class SASRec(SequentialRecommender):
    """SASRec recommender (see module docstring); ``encode(histories) -> [n, hidden_size]``."""

    name = "sasrec"
    config: SASRecConfig

    def __init__(self, config: SASRecConfig | None = None, *, progress: bool = False) -> None:
        super().__init__(config or SASRecConfig(), progress=progress)

    def build_module(self, n_items: int) -> SASRecEncoder:
        return SASRecEncoder(n_items, self.config)
