"""Exact top-k of a whole catalogue under a language model, without scoring the whole catalogue.

A title's score is ``log p(title + end-of-answer | prompt)``, the sum of its tokens' log-probs, each
``<= 0``; so the score of a title *prefix* bounds the score of every title below it in the title trie
(:class:`~recalign.methods.knowledge.grounding.TitleTrie`, the structure knowledge retrieval grounds and
ranks titles with). :func:`exact_top_k` walks that trie best-first:

1. the prompt runs once; its KV cache is kept (batch 1) for the whole search;
2. the frontier holds trie nodes with their prefix scores; each round pops the best ``nodes_per_pass``
   nodes and feeds their last tokens in **one** forward pass: every fed token attends to the prompt's
   cache, to the cached keys/values of its own ancestors (a tree-shaped 4-D mask) and to itself, at the
   position it would have right after the prompt. A trie node is therefore run through the model once,
   and one LM-head row at a node gives the scores of all its children;
3. a child that is the end-of-answer token is a complete title; the k-th best complete title (items in
   ``exclude`` -- the history -- do not count) is the bound ``tau``, and the search stops when no node of
   the frontier scores ``>= tau - margin``: every title not found has a prefix below ``tau - margin``,
   hence a score below it.

The titles found are then re-scored with the shared-prefix scorer that exhaustive ranking uses
(:func:`recalign.lm.scoring.answer_logprobs`, in one pass), so the returned scores are the exhaustive
path's numbers and the order is its order (ties by catalogue index, like a stable sort). ``margin``
absorbs the float differences between the incremental kernel path of the search and the packed one of
the scorer (``1e-3`` for float32 weights; bfloat16 activations round to ~3 significant digits, hence a
wider default there, :func:`default_margin`).

The cost is the number of trie nodes whose prefix scores at least the k-th best title -- for SmolLM2 on
ML-100K and k = 10 about 2,200-3,000 tokens (``results/recommend_ml100k.json``) instead of the
catalogue's ~20k answer tokens, and no prompt re-runs. ``seed_beams`` optionally runs
:func:`~recalign.methods.knowledge.grounding.trie_beam_search` first (the knowledge-retrieval seeds) so
that ``tau`` is known from the first round; best-first order finds the top titles before it has to
expand the nodes that need it anyway, so seeding expands the same nodes and only adds the beam search's
own cost: off by default (measured in ``benchmarks/recommend.py``).

Decoder-only models only (attention ``eager`` or ``sdpa``, which accept custom 4-D masks).
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from recalign.lm.hybrid import decoder_inputs
from recalign.lm.modules import cache_kwarg, head_logits, unwrap_peft
from recalign.lm.scoring import answer_logprobs, check_attn_impl, decoder_and_head

#: nodes fed per forward pass of the search (one token each)
NODES_PER_PASS = 128


def default_margin(model) -> float:
    """``1e-3`` for float32 weights, ``0.25`` for 16-bit ones (see the module docstring)."""
    dtype = next(unwrap_peft(model).parameters()).dtype
    return 1e-3 if dtype == torch.float32 else 0.25


@dataclass
class TopK:
    """Result of :func:`exact_top_k`.

    ``items``/``scores``: the top ``k`` items (catalogue indices) and their exhaustive-path scores, best
    first. ``candidates``: every item the search proved could be in the top ``k`` (re-scored).
    ``nodes``: trie nodes run through the model; ``passes``: forward passes; ``seconds``: wall time.
    """

    items: list[int]
    scores: list[float]
    candidates: int = 0
    nodes: int = 0
    passes: int = 0
    seconds: float = 0.0
    stats: dict = field(default_factory=dict)


class _NodeStore:
    """Keys/values of every trie node run so far: per layer a ``[1, h, capacity, d]`` buffer that
    doubles when full (rows ``0..n-1`` are used)."""

    def __init__(self) -> None:
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.n = 0

    def append(self, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        m = layers[0][0].shape[-2]
        cap = self.keys[0].shape[-2] if self.keys else 0
        if self.n + m > cap:
            new_cap = max(2 * cap, self.n + m, 256)
            grown_k, grown_v = [], []
            for i, (k, v) in enumerate(layers):
                shape = (*k.shape[:-2], new_cap, k.shape[-1])
                gk, gv = k.new_empty(shape), v.new_empty((*v.shape[:-2], new_cap, v.shape[-1]))
                if self.n:
                    gk[..., : self.n, :] = self.keys[i][..., : self.n, :]
                    gv[..., : self.n, :] = self.values[i][..., : self.n, :]
                grown_k.append(gk)
                grown_v.append(gv)
            self.keys, self.values = grown_k, grown_v
        for i, (k, v) in enumerate(layers):
            self.keys[i][..., self.n : self.n + m, :] = k
            self.values[i][..., self.n : self.n + m, :] = v
        self.n += m


@torch.no_grad()
def exact_top_k(
    model,
    prompt_ids: Sequence[int],
    trie,
    k: int,
    *,
    exclude: set[int] | frozenset[int] = frozenset(),
    margin: float | None = None,
    nodes_per_pass: int = NODES_PER_PASS,
    seed_beams: int = 0,
    rescore: bool = True,
) -> TopK:
    """The exact top-``k`` items of ``trie`` (a :class:`TitleTrie` of answer ids) given ``prompt_ids``.

    Equal to scoring every title with :func:`~recalign.lm.scoring.answer_logprobs` and sorting (scores
    descending, ties by item index), ``exclude`` removed -- see the module docstring for why.
    ``rescore=False`` returns the search's own scores (same items, float-level differences).
    """
    t0 = time.perf_counter()
    check_attn_impl(model)
    margin = default_margin(model) if margin is None else float(margin)
    decoder, head = decoder_and_head(model)
    base = unwrap_peft(model)
    device = next(base.parameters()).device
    dtype = next(base.parameters()).dtype
    n_items = len(trie.sequences)
    k_eff = min(int(k), n_items - len([i for i in exclude if 0 <= i < n_items]))
    if k_eff < 1:
        return TopK([], [], seconds=time.perf_counter() - t0)
    was_training = model.training
    model.eval()
    try:
        plen = len(prompt_ids)
        cache = DynamicCache(config=base.config)
        ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)
        out = decoder(**decoder_inputs(model, ids), use_cache=True, **cache_kwarg(decoder, cache))
        prompt_kv = [(layer.keys, layer.values) for layer in cache.layers]

        def logsoftmax(hidden: torch.Tensor) -> torch.Tensor:
            return torch.log_softmax(head_logits(model, head, hidden), dim=-1)

        found: dict[int, float] = {}  # item -> search score
        best: list[float] = []  # min-heap of the k best counted scores
        tau = -float("inf")

        def add_title(item: int, score: float) -> None:
            nonlocal tau
            if item in found:
                return
            found[item] = score
            if item in exclude:
                return
            if len(best) < k_eff:
                heapq.heappush(best, score)
            elif score > best[0]:
                heapq.heapreplace(best, score)
            if len(best) == k_eff:
                tau = best[0]

        if seed_beams:
            from recalign.methods.knowledge.grounding import trie_beam_search

            for item, s in trie_beam_search(model, prompt_ids, trie, beams=int(seed_beams)).items():
                add_title(int(item), float(s))

        # frontier entries: (-score, order, trie node dict, ancestor store rows, token, depth)
        frontier: list[tuple[float, int, dict, tuple[int, ...], int, int]] = []
        order = 0

        def push_children(node: dict, score: float, logp_row: torch.Tensor, anc: tuple[int, ...], depth):
            nonlocal order
            toks = list(node)
            vals = logp_row[toks].tolist()
            for tok, v in zip(toks, vals):
                s = score + v
                child = node[tok]
                if not child:  # the end-of-answer token: a complete title
                    for item in trie.items(anc_tokens(anc) + (tok,)):
                        add_title(item, s)
                    continue
                if s >= tau - margin:
                    heapq.heappush(frontier, (-s, order, child, anc, tok, depth + 1))
                    order += 1

        store = _NodeStore()
        tokens_of: list[int] = []  # store row -> its token

        def anc_tokens(anc: tuple[int, ...]) -> tuple[int, ...]:
            return tuple(tokens_of[r] for r in anc)

        root_lp = logsoftmax(out.last_hidden_state[:, -1])[0]
        push_children(trie.root, 0.0, root_lp, (), 0)
        passes = 0
        while frontier and -frontier[0][0] >= tau - margin:
            batch = []
            while frontier and len(batch) < nodes_per_pass and -frontier[0][0] >= tau - margin:
                batch.append(heapq.heappop(frontier))
            n = len(batch)
            anc_rows = sorted({r for e in batch for r in e[3]})
            col = {r: j for j, r in enumerate(anc_rows)}
            n_anc = len(anc_rows)
            allowed = torch.zeros(n, plen + n_anc + n, dtype=torch.bool, device=device)
            allowed[:, :plen] = True
            for i, e in enumerate(batch):
                for r in e[3]:
                    allowed[i, plen + col[r]] = True
                allowed[i, plen + n_anc + i] = True
            mask = torch.zeros(1, 1, n, plen + n_anc + n, dtype=dtype, device=device)
            mask.masked_fill_(~allowed[None, None], torch.finfo(dtype).min)
            if n_anc:
                sel = torch.tensor(anc_rows, dtype=torch.long, device=device)
                past = [
                    (
                        torch.cat([pk, sk.index_select(-2, sel)], dim=-2),
                        torch.cat([pv, sv.index_select(-2, sel)], dim=-2),
                    )
                    for (pk, pv), sk, sv in zip(prompt_kv, store.keys, store.values)
                ]
            else:
                past = prompt_kv
            step_cache = DynamicCache(ddp_cache_data=past, config=base.config)
            step_ids = torch.tensor([[e[4] for e in batch]], dtype=torch.long, device=device)
            pos = torch.tensor([[plen + e[5] - 1 for e in batch]], dtype=torch.long, device=device)
            res = decoder(
                input_ids=step_ids,
                attention_mask=mask,
                position_ids=pos,
                use_cache=True,
                **cache_kwarg(decoder, step_cache),
            )
            passes += 1
            new_kv = [(layer.keys[..., -n:, :], layer.values[..., -n:, :]) for layer in step_cache.layers]
            first = store.n
            store.append(new_kv)
            tokens_of.extend(e[4] for e in batch)
            lp = logsoftmax(res.last_hidden_state[0])
            for i, e in enumerate(batch):
                row = first + i
                push_children(e[2], -e[0], lp[i], e[3] + (row,), e[5])

        cands = sorted(j for j, s in found.items() if j not in exclude and s >= tau - margin)
        stats = {"search_seconds": round(time.perf_counter() - t0, 3), "margin": margin}
        if rescore and cands:
            a_ids = [list(trie.sequences[j]) for j in cands]
            sc = answer_logprobs(model, [list(prompt_ids)], [a_ids]).sum[0].float().tolist()
        else:
            sc = [found[j] for j in cands]
        ranked = sorted(zip(cands, sc), key=lambda x: (-x[1], x[0]))[:k_eff]
        return TopK(
            items=[int(j) for j, _ in ranked],
            scores=[float(s) for _, s in ranked],
            candidates=len(cands),
            nodes=store.n,
            passes=passes,
            seconds=time.perf_counter() - t0,
            stats=stats,
        )
    finally:
        if was_training:
            model.train()
