"""N sampled continuations of each prompt from ONE prefill of that prompt.

DPO4Rec draws N = 8 preference summaries per user from the same prompt (~260 tokens of chat template
and history) and compares them. ``model.generate(num_return_sequences=N)`` -- or, as before, the prompt
listed N times -- runs that prompt through the model N times. On this project's CPU that prefill is
about half of the cost of a 40-token summary (SmolLM2, batch 16: prefill 6.5 s, 40 decode steps 6 s),
and the decode steps themselves get cheaper per row as the batch grows (9 ms per row at 16 rows, 5.5 ms
at 64). So this module:

1. runs the ``U`` distinct prompts once, right-padded, with a causal mask over each prompt's own tokens
   and a ``DynamicCache`` (position ids 0..len-1: exactly the positions ``generate`` gives a left-padded
   prompt, whose position ids follow the attention mask);
2. copies each prompt's cache entries ``N`` times into a preallocated ``StaticCache`` of ``U * N`` rows
   (row ``u * N + s`` is sample ``s`` of prompt ``u``), with room for the new tokens;
3. decodes all ``U * N`` rows together, one token per row per step, the LM head on that one position
   only, with a 4-D additive mask that lets a row see its prompt's entries and its own new tokens (the
   same loop as :mod:`recalign.lm.joint`'s greedy decoding, with a sampler in place of the arg-max).

Sampling is nucleus sampling as ``generate(do_sample=True, temperature=T, top_p=p, top_k=0)`` defines it:
logits divided by ``T``, then the smallest set of most likely tokens whose probability reaches ``p``
(the most likely token always kept), renormalised; draws come from a caller-seeded
``torch.Generator``, so a batch is reproducible and the global random state is untouched. The
continuations' log-probabilities under the model itself (temperature 1, no nucleus) are returned too:
they equal what :func:`recalign.lm.scoring.answer_logprobs` gives the same tokens (tested), which is the
exactness check of the whole path.

Only models :func:`recalign.lm.joint.joint_unsupported` accepts (decoder-only, full attention, eager/sdpa
kernels, no logits processors in the generation config) qualify; :func:`shared_sampling_unsupported`
says why another model does not, and callers fall back to ``generate``. Hybrid prompts (soft item tokens,
negative ids) enter the prefill as embeddings, as in every other shared-prefix path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from recalign.lm.hybrid import decoder_inputs
from recalign.lm.joint import decode_step, joint_unsupported, prompt_static_cache
from recalign.lm.modules import cache_kwarg, head_logits
from recalign.lm.modules import model_dtype_device as _model_dtype_device
from recalign.lm.modules import unwrap_peft as _unwrap
from recalign.lm.scoring import decoder_and_head


@dataclass
class SampleOutput:
    """``generated[u][s]``: the new token ids of sample ``s`` of prompt ``u``, up to (excluding) the first
    stop id. ``logprobs[u, s]``: their summed log-probability under the model (temperature 1, and the
    stop token's own log-prob included when the sample stopped), float32. ``steps``: decode steps run."""

    generated: list[list[list[int]]]
    logprobs: torch.Tensor
    steps: int


def shared_sampling_unsupported(model, *, max_new_tokens: int = 32) -> str | None:
    """Why :func:`sample_continuations` cannot serve ``model`` (one line), or ``None`` if it can."""
    return joint_unsupported(model, max_new_tokens=max_new_tokens)


def nucleus_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """``logits`` ([R, V]) with every token outside the nucleus set to -inf.

    The nucleus of a row is the smallest set of most likely tokens whose probability reaches ``top_p``;
    the most likely token is always in it. ``top_p >= 1`` keeps everything.
    """
    if top_p >= 1.0:
        return logits
    if top_p <= 0.0:
        raise ValueError("top_p must be > 0")
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    mass_before = probs.cumsum(-1) - probs  # probability of the strictly more likely tokens
    drop_sorted = mass_before >= top_p
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


#: the nucleus is looked for among this many most likely tokens first (a full sort of a 49k vocabulary
#: for 32 rows costs ~0.1 s per decode step on this CPU, as much as the model's step itself)
NUCLEUS_TOPK = 256


def _nucleus_top(probs: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(weights, ids, wide)``: each row's nucleus as unnormalised weights over its ``NUCLEUS_TOPK`` most
    likely token ``ids``, and the rows whose nucleus is wider than that (``wide``: their weights are not
    the nucleus; use the full sort)."""
    k = min(NUCLEUS_TOPK, probs.shape[-1])
    top, ids = probs.topk(k, dim=-1)  # descending
    cum = top.cumsum(-1)
    keep = (cum - top) < top_p
    keep[..., 0] = True
    return top * keep, ids, cum[..., -1] < top_p


def nucleus_probs(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """The renormalised nucleus distribution of each row of ``logits`` ([R, V]): ``softmax`` of
    :func:`nucleus_filter`, computed from the ``NUCLEUS_TOPK`` most likely tokens where their mass
    reaches ``top_p`` (then the nucleus lies among them) and from a full sort for the other rows.
    :func:`next_tokens` draws from exactly this distribution."""
    probs = logits.softmax(-1)
    if top_p >= 1.0:
        return probs
    weights, ids, wide = _nucleus_top(probs, top_p)
    out = torch.zeros_like(probs).scatter(-1, ids, weights)
    if bool(wide.any()):
        out[wide] = nucleus_filter(logits[wide], top_p).softmax(-1)
    return out / out.sum(-1, keepdim=True)


def next_tokens(
    logits: torch.Tensor,
    *,
    do_sample: bool,
    temperature: float,
    top_p: float,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """One token per row of float32 ``logits`` ([R, V]): arg-max, or a draw from the nucleus at
    ``temperature`` (:func:`nucleus_probs`). The draw is made among the top tokens where the nucleus
    lies there: ``torch.multinomial`` over a whole 49k vocabulary costs ~1 ms per row on this CPU."""
    if not do_sample:
        return logits.argmax(-1)
    if temperature <= 0:
        raise ValueError("temperature must be > 0 when sampling")
    scaled = logits / temperature
    probs = scaled.softmax(-1)
    if top_p >= 1.0:
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    weights, ids, wide = _nucleus_top(probs, top_p)
    tok = ids.gather(-1, torch.multinomial(weights, 1, generator=generator)).squeeze(-1)
    if bool(wide.any()):
        full = nucleus_filter(scaled[wide], top_p).softmax(-1)
        tok[wide] = torch.multinomial(full, 1, generator=generator).squeeze(-1)
    return tok


def sample_continuations(
    model,
    prompts: Sequence[Sequence[int]],
    *,
    n_samples: int,
    stop_ids: Sequence[int],
    max_new_tokens: int = 32,
    do_sample: bool = True,
    temperature: float = 1.0,
    top_p: float = 1.0,
    pad_id: int = 0,
    generator: torch.Generator | None = None,
) -> SampleOutput:
    """``n_samples`` continuations of each of ``prompts`` (token ids), each prompt prefilled once.

    Call with the model in eval mode; runs under ``torch.inference_mode()``. A row stops at a stop id or
    after ``max_new_tokens`` tokens; the loop ends when every row has stopped.
    """
    reason = shared_sampling_unsupported(model, max_new_tokens=max_new_tokens)
    if reason:
        raise ValueError(f"shared-prompt sampling not available: {reason}")
    if n_samples < 1 or max_new_tokens < 1:
        raise ValueError("n_samples and max_new_tokens must be >= 1")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    decoder, head = decoder_and_head(model)
    dtype, device = _model_dtype_device(model)
    cfg = _unwrap(model).config
    u_n, rows = len(prompts), len(prompts) * n_samples
    stops = torch.tensor(sorted({int(s) for s in stop_ids}), dtype=torch.long, device=device)
    plens = torch.tensor([len(p) for p in prompts], device=device)
    p_max = int(plens.max())
    neg = torch.finfo(dtype).min

    with torch.inference_mode():
        # 1. every distinct prompt once: right-padded, causal over its own tokens
        ids = torch.full((u_n, p_max), pad_id, dtype=torch.long, device=device)
        for u, p in enumerate(prompts):
            ids[u, : len(p)] = torch.tensor(list(p), dtype=torch.long, device=device)
        pos = torch.arange(p_max, device=device)
        valid = pos[None, :] < plens[:, None]  # [U, P]
        allowed = (pos[None, :, None] >= pos[None, None, :]) & valid[:, None, :]  # [U, Q, K]
        mask = torch.zeros(u_n, 1, p_max, p_max, dtype=dtype, device=device)
        mask.masked_fill_(~allowed[:, None], neg)
        cache = DynamicCache(config=cfg)
        hidden = decoder(
            **decoder_inputs(model, ids),  # soft item tokens (negative ids) enter as embeddings
            attention_mask=mask,
            position_ids=pos[None, :].expand(u_n, -1),
            use_cache=True,
            **cache_kwarg(decoder, cache),
        ).last_hidden_state
        last = hidden[torch.arange(u_n, device=device), plens - 1].repeat_interleave(n_samples, 0)
        del hidden

        # 2. each prompt's entries copied to its n_samples rows of a preallocated cache
        length = p_max + max_new_tokens - 1
        static = prompt_static_cache(cfg, cache, p_max, length, n_samples) if max_new_tokens > 1 else None
        del cache
        key_ok = torch.zeros(rows, length, dtype=torch.bool, device=device)
        key_ok[:, :p_max] = valid.repeat_interleave(n_samples, 0)
        row_plens = plens.repeat_interleave(n_samples)

        # 3. decode every row together
        logits = head_logits(model, head, last)
        done = torch.zeros(rows, dtype=torch.bool, device=device)
        total = torch.zeros(rows, dtype=torch.float32, device=device)
        generated: list[list[int]] = [[] for _ in range(rows)]
        steps = 0
        for step in range(max_new_tokens):
            tok = next_tokens(
                logits, do_sample=do_sample, temperature=temperature, top_p=top_p, generator=generator
            )
            lp = logits.log_softmax(-1).gather(-1, tok[:, None]).squeeze(-1)
            total += torch.where(done, torch.zeros_like(lp), lp)
            stopped = torch.isin(tok, stops)
            for r in (~done & ~stopped).nonzero().flatten().tolist():
                generated[r].append(int(tok[r]))
            done |= stopped
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            feed = torch.where(done, torch.full_like(tok, pad_id), tok)
            h = decode_step(decoder, static, key_ok, p_max + step, feed, row_plens + step, dtype)
            logits = head_logits(model, head, h)
            steps += 1
    nested = [generated[u * n_samples : (u + 1) * n_samples] for u in range(u_n)]
    return SampleOutput(generated=nested, logprobs=total.view(u_n, n_samples), steps=steps)
