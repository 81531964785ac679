"""The CLLM4Rec model: a frozen decoder-only backbone plus four trainable ID embedding tables.

Zhu et al. (WWW 2024) keep the pretrained LM fixed and learn only the new user/item token
embeddings, on two *sides*:

- the **collaborative** side (``z^l``): tables ``collab_user`` and ``collab_item``, learnt from
  interaction documents; ``collab_item`` doubles as the item head (weight tying), so "which item comes
  next" is a softmax over item embeddings only — the word vocabulary can never be predicted there;
- the **content** side (``z^c``): tables ``content_user`` and ``content_item``, learnt from reviews or
  item descriptions with the backbone's own (frozen) word LM head.

The two sides only talk through the mutual regulariser ``λ‖z^l − sg(z^c)‖²`` (or the reverse), which
is why each side needs its own tables: sharing one table would make the regulariser vacuous.

The backbone is fed ``inputs_embeds`` built by :meth:`CLLM4RecModel.embed`, which routes each id
range (words / users / items, see :mod:`.vocab`) to its table. The word table and every transformer
weight have ``requires_grad=False``; gradients still flow *through* the transformer to the ID rows in
the input, which is the whole cost of a step.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes
from torch import nn

from recalign.io import atomic_write_bytes
from recalign.methods.cllm4rec.documents import packed_attention

Side = Literal["collab", "content"]
TABLES = ("collab_user", "collab_item", "content_user", "content_item")


class CLLM4RecModel(nn.Module):
    """Frozen backbone + ID tables.

    Args:
        backbone: a Hugging Face causal LM (``LlamaForCausalLM`` & co.). It is frozen and put in eval mode.
        n_users, n_items: number of user / item tokens.
        vocab_size: first ID-token id (see :class:`~.vocab.IDTokenizer`).
        init_std: std of the random initialisation; ``None`` uses the std of the backbone's word
            embeddings, so new tokens start at the same scale as words (the frozen layers' norms expect it).
        seed: seed of the initialisation. Both sides start from the *same* draw, so the mutual
            regulariser is zero at step 0 and measures how far the sides drift apart.
    """

    def __init__(
        self,
        backbone: nn.Module,
        n_users: int,
        n_items: int,
        vocab_size: int,
        init_std: float | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        self.backbone.eval()
        self.n_users, self.n_items, self.vocab_size = int(n_users), int(n_items), int(vocab_size)
        word = self.word_embeddings.weight
        self.hidden_size = word.shape[1]
        std = float(word.detach().float().std()) if init_std is None else float(init_std)
        gen = torch.Generator().manual_seed(int(seed))
        users = torch.randn(self.n_users, self.hidden_size, generator=gen) * std
        items = torch.randn(self.n_items, self.hidden_size, generator=gen) * std
        self.collab_user = nn.Embedding.from_pretrained(users.clone(), freeze=False)
        self.collab_item = nn.Embedding.from_pretrained(items.clone(), freeze=False)
        self.content_user = nn.Embedding.from_pretrained(users.clone(), freeze=False)
        self.content_item = nn.Embedding.from_pretrained(items.clone(), freeze=False)

    def train(self, mode: bool = True) -> CLLM4RecModel:
        """Only the ID tables train; the backbone stays in eval mode (no dropout) whatever the caller asks."""
        super().train(mode)
        self.backbone.eval()
        return self

    # ------------------------------------------------------------------ pieces of the backbone
    @property
    def word_embeddings(self) -> nn.Embedding:
        return self.backbone.get_input_embeddings()

    @property
    def transformer(self) -> nn.Module:
        """The decoder stack without the LM head (``LlamaModel`` for ``LlamaForCausalLM``)."""
        return self.backbone.base_model

    def tables(self, side: Side) -> tuple[nn.Embedding, nn.Embedding]:
        if side == "collab":
            return self.collab_user, self.collab_item
        if side == "content":
            return self.content_user, self.content_item
        raise ValueError(f"unknown side {side!r}")

    def side_parameters(self, side: Side) -> list[nn.Parameter]:
        u, i = self.tables(side)
        return [u.weight, i.weight]

    # ------------------------------------------------------------------ forward
    def embed(self, input_ids: torch.Tensor, side: Side) -> torch.Tensor:
        """``[B, L, d]`` input embeddings in the backbone's dtype: word rows from the frozen table, ID rows
        from ``side``'s (float32) tables."""
        users, items = self.tables(side)
        v, u_off = self.vocab_size, self.vocab_size + self.n_users
        is_word = input_ids < v
        is_user = (input_ids >= v) & (input_ids < u_off)
        is_item = input_ids >= u_off
        emb = self.word_embeddings(torch.where(is_word, input_ids, 0))
        emb = torch.where(is_user[..., None], users(torch.where(is_user, input_ids - v, 0)), emb)
        emb = torch.where(is_item[..., None], items(torch.where(is_item, input_ids - u_off, 0)), emb)
        return emb.to(self.compute_dtype)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The backbone's dtype (float32, or bfloat16 where the CPU runs it natively): the ID rows are
        cast to it on the way in; the tables, their gradients and the Adam state stay float32."""
        return self.word_embeddings.weight.dtype

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        side: Side,
        position_ids: torch.Tensor | None = None,
        segment: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Last-layer hidden states ``[B, L, d]`` (after the backbone's final norm).

        ``segment`` (packed rows, see :func:`~.documents.collate_lm`): document number of every position
        (-1 = padding); the 2-D ``attention_mask`` is then replaced by the block-diagonal causal 4-D mask
        and ``position_ids`` restart at 0 for every document.
        """
        dtype = self.compute_dtype
        if segment is not None:
            attention_mask = packed_attention(segment, dtype)
        out = self.transformer(
            inputs_embeds=self.embed(input_ids, side),
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
        )
        return out.last_hidden_state

    def _lm_hidden(self, batch: dict, side: Side) -> torch.Tensor:
        return self.hidden_states(
            batch["input_ids"], batch["attention_mask"], side, batch.get("position_ids"), batch.get("segment")
        )

    def item_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Item head: scores over *items only*, tied to the collaborative item table (no word can win).
        Computed in float32 whatever the backbone's dtype."""
        return hidden.float() @ self.collab_item.weight.T

    def word_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The backbone's (frozen) word LM head, used by the content LM on text positions."""
        return self.backbone.get_output_embeddings()(hidden)

    # ------------------------------------------------------------------ losses
    def collab_target_nlls(self, batch: dict) -> torch.Tensor:
        """``[N]`` next-item NLL at the positions whose next token is an item of the document's item list,
        in ``collate_lm``'s order (document by document).

        ``batch["pred_pos"]`` ``[N, 2]`` holds (row, position) of the hidden state that predicts
        ``batch["targets"]`` ``[N]`` (item indices). Only those N rows go through the item head.
        """
        h = self._lm_hidden(batch, "collab")
        rows, pos = batch["pred_pos"][:, 0], batch["pred_pos"][:, 1]
        return F.cross_entropy(self.item_logits(h[rows, pos]), batch["targets"], reduction="none")

    def collab_lm_loss(self, batch: dict) -> torch.Tensor:
        """Mean of :meth:`collab_target_nlls`: the collaborative LM's training loss."""
        return self.collab_target_nlls(batch).mean()

    def content_lm_loss(self, batch: dict) -> torch.Tensor:
        """Mean next-word NLL on the main text (review / description) with the backbone's LM head.

        Only the hidden states of main-text positions go through the vocabulary head (the prompt's and
        the padding's never do): the head is ``d x |V|``, the largest matrix product of a step."""
        h = self._lm_hidden(batch, "content")
        rows, pos = batch["pred_pos"][:, 0], batch["pred_pos"][:, 1]
        return F.cross_entropy(self.word_logits(h[rows, pos]).float(), batch["targets"])

    def rec_item_log_probs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``[B, n_items]`` log-softmax of the item head at each prompt's last real token (collab side)."""
        h = self.hidden_states(input_ids, attention_mask, "collab")
        last = attention_mask.long().sum(1) - 1
        return F.log_softmax(self.item_logits(h[torch.arange(len(h)), last]), dim=-1)

    def rec_loss(self, batch: dict) -> torch.Tensor:
        """Multinomial NLL of the held-out (masked) items: ``−Σ_{j∈held-out} log softmax(h W_item^T)_j``,
        averaged over users. ``batch["target_rows"]``/``batch["targets"]`` list (row, item) pairs."""
        logp = self.rec_item_log_probs(batch["input_ids"], batch["attention_mask"])
        picked = logp[batch["target_rows"], batch["targets"]]
        return -picked.sum() / len(logp)

    def mutual_regulariser(
        self, side: Side, users: torch.Tensor, items: torch.Tensor, lam: float
    ) -> torch.Tensor:
        """``λ · mean_ids ‖z_side − sg(z_other)‖²`` over the given user and item indices.

        Only ``side``'s rows receive gradient: the other side is detached, which is the alternating
        scheme of the paper (each side is regularised towards the *current, fixed* other side).
        """
        if lam == 0 or (len(users) == 0 and len(items) == 0):
            return torch.zeros((), dtype=self.collab_item.weight.dtype)
        other: Side = "content" if side == "collab" else "collab"
        su, si = self.tables(side)
        ou, oi = self.tables(other)
        sq = []
        if len(users):
            sq.append((su(users) - ou(users).detach()).pow(2).sum(-1))
        if len(items):
            sq.append((si(items) - oi(items).detach()).pow(2).sum(-1))
        return lam * torch.cat(sq).mean()

    # ------------------------------------------------------------------ persistence (ID tables only)
    def id_state(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name).weight.detach().clone().contiguous() for name in TABLES}

    def load_id_state(self, state: dict[str, torch.Tensor]) -> None:
        for name in TABLES:
            t = state[name]
            w = getattr(self, name).weight
            if t.shape != w.shape:
                raise ValueError(f"{name}: checkpoint shape {tuple(t.shape)} != model {tuple(w.shape)}")
            with torch.no_grad():
                w.copy_(t)

    def save_tables(self, path) -> None:
        """The four ID tables as safetensors (write-then-rename). The backbone is not saved: it is frozen."""
        atomic_write_bytes(path, save_safetensors_bytes(self.id_state()))

    def load_tables(self, path) -> None:
        with open(path, "rb") as f:
            self.load_id_state(load_safetensors_bytes(f.read()))
