"""Candidate scoring and greedy generation from ONE pass over each prompt.

Evaluating an LM recommender with both protocols (rank the 20 candidate titles by log-prob, and generate
an answer greedily) used to run every prompt (~440 tokens for SmolLM2's chat template) through the model
twice: packed with its 20 answers for scoring (:func:`recalign.lm.scoring.answer_logprobs`), and again as
the prefill of ``model.generate``. On a CPU that second prompt pass is ~40% of the evaluation's cost. Both
passes compute the same thing for the prompt positions, so this module does it once:

1. One forward over the packed row of :func:`recalign.lm.scoring.packed_batch` -- ``prompt + a_1[:-1] +
   a_2[:-1] + ...``, tree-shaped 4-D mask, position ids restarting after the prompt -- exactly what
   ``impl="packed"`` scoring runs, but with ``use_cache=True``. The answer log-probs are read from it as
   before (same inputs, same kernels: the same numbers). Under the tree mask a prompt token attends to
   earlier prompt tokens only, so the first ``len(prompt)`` cache entries of a row *are* the prompt's KV,
   exactly as a prompt-only prefill would produce them; the answer entries behind them are simply never
   looked at again. The hidden state at the last prompt position (which scores every answer's first
   token) also gives the first greedy token.
2. A small greedy loop continues from that cache. The prompt part of the packed cache (the first
   ``max(len(prompt))`` entries of every row) is copied into a ``StaticCache`` with room for the new
   tokens (preallocated: no per-step ``torch.cat`` of the whole cache as with ``DynamicCache``). Each step
   feeds one token per row at position ``len(prompt_i) + step`` and passes a 4-D additive mask that lets
   row ``i`` see its own prompt entries (``< len(prompt_i)``; not the answer tokens of longer rows' prompt
   slots, not padding) and its own generated tokens. The LM head runs on that one position only. A row
   stops at a stop id (end-of-turn or EOS, :func:`recalign.lm.prompts.stop_token_ids`, as
   :func:`recalign.lm.generation.generate_answers` uses) or after ``max_new_tokens`` tokens; the loop
   ends when every row has stopped (finished rows keep feeding a pad token, whose output is ignored,
   like ``generate`` does).

Greedy decoding here is what ``model.generate(do_sample=False)`` does with recalign's settings (no
repetition penalty or other logits processors: :func:`joint_unsupported` refuses models whose generation
config asks for one, and the caller falls back to the separate path). The answers are the same as
``generate_answers``' up to float rounding: both see identical inputs and positions, but the kernels
see differently shaped inputs (``generate`` left-pads the prompts), so a near-tie between two tokens
could in principle resolve differently. In float32: identical (tested on tiny models). In bfloat16 on
a CPU with AMX, ``generate``'s left padding itself changes the rounding -- its answer for a prompt
depends on which prompts share its batch (tiny Llama, 48 ML-100K prompts: batch 8 vs batch 1 differ on
14) -- while this path reproduced the unpadded (batch-1) ``generate`` answer on all 48, in batches of 8
or 1. ``benchmarks/eval_joint.py`` classifies every difference on real models this way.

Hybrid prompts (soft item tokens, :mod:`recalign.lm.hybrid`) enter the shared pass as ``inputs_embeds``;
the greedy loop feeds generated (plain) tokens as before.

Only decoder-only models with full attention in every layer and an ``eager``/``sdpa`` attention kernel
(custom 4-D masks) qualify; encoder-decoders (their shared prefix is the encoder pass anyway), sliding-
window or hybrid caches, and other kernels use the separate protocols.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache, StaticCache
from transformers.cache_utils import StaticLayer

from recalign.lm.hybrid import decoder_inputs
from recalign.lm.modules import AnswerScores, cache_kwarg, head_logits
from recalign.lm.modules import assemble_scores as _assemble
from recalign.lm.modules import model_dtype_device as _model_dtype_device
from recalign.lm.modules import unwrap_peft as _unwrap
from recalign.lm.modules import validate_answers as _validate
from recalign.lm.scoring import decoder_and_head, packed_batch, packed_scores

#: generation-config fields that would add a logits processor / stopping rule the joint loop does not apply
_PROCESSOR_FIELDS = {
    "repetition_penalty": 1.0,
    "encoder_repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0,
    "bad_words_ids": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "sequence_bias": None,
    "min_length": 0,
    "min_new_tokens": None,
    "exponential_decay_length_penalty": None,
    "renormalize_logits": False,
    "watermarking_config": None,
    "stop_strings": None,
    "max_time": None,
}


@dataclass
class JointOutput:
    """Scores and greedy answers of one batch of prompts, with where the time went.

    ``generated``: per prompt, the new token ids up to (excluding) the first stop id.
    ``forward_seconds``: the shared packed forward (prompt + answers); ``scoring_seconds``: the LM head
    over answer positions; ``decode_seconds``: first token + the greedy loop.
    """

    scores: AnswerScores
    generated: list[list[int]]
    forward_seconds: float = 0.0
    scoring_seconds: float = 0.0
    decode_seconds: float = 0.0
    steps: int = 0


def joint_unsupported(model, *, max_new_tokens: int = 32) -> str | None:
    """Why the joint path cannot serve ``model`` (a one-line reason), or ``None`` if it can."""
    base = _unwrap(model)
    cfg = base.config
    if getattr(cfg, "is_encoder_decoder", False):
        return "encoder-decoder model (its shared prefix is the encoder pass)"
    impl = getattr(cfg, "_attn_implementation", None)
    if impl not in (None, "eager", "sdpa"):
        return f"attention kernel {impl!r} does not take custom 4-D masks"
    try:
        probe = StaticCache(config=cfg, max_cache_len=1 + max_new_tokens)
    except Exception as e:  # pragma: no cover - exotic configs
        return f"no static cache for this config ({type(e).__name__})"
    if any(type(layer) is not StaticLayer for layer in probe.layers):
        return "not full attention in every layer (sliding-window, chunked or shared KV)"
    gen = getattr(base, "generation_config", None)
    if gen is not None:
        for name, neutral in _PROCESSOR_FIELDS.items():
            value = getattr(gen, name, neutral)
            if value not in (neutral, None) and not (isinstance(value, (list, tuple, dict)) and not value):
                return (
                    f"generation_config.{name}={value!r} (a logits processor the joint loop does not apply)"
                )
    return None


def prompt_static_cache(cfg, cache: DynamicCache, p_max: int, length: int, repeat: int = 1) -> StaticCache:
    """A preallocated cache of ``length`` slots whose first ``p_max`` hold every layer's prompt entries
    from ``cache`` (each row repeated ``repeat`` times: one prompt, several continuations). Decoding then
    writes one slot per step instead of growing (re-allocating) the keys and values."""
    static = StaticCache(config=cfg, max_cache_len=length)
    for li, layer in enumerate(cache.layers):
        keys, values = layer.keys[:, :, :p_max], layer.values[:, :, :p_max]
        if repeat > 1:
            keys, values = keys.repeat_interleave(repeat, 0), values.repeat_interleave(repeat, 0)
        static.update(keys, values, li)
    return static


def decode_step(
    decoder,
    static: StaticCache,
    key_ok: torch.Tensor,
    slot: int,
    feed: torch.Tensor,
    positions: torch.Tensor,
    dtype: torch.dtype,
) -> torch.Tensor:
    """One token per row through ``decoder`` into cache slot ``slot``; the last hidden states ``[R, H]``.

    ``key_ok`` ``[R, length]`` says which cache slots each row may attend to (its own prompt tokens and
    the tokens fed so far); ``slot`` is marked valid for every row first. Rows that have stopped are fed
    a pad token by the caller, and their outputs are ignored. Shared by greedy decoding
    (:func:`score_and_generate`) and sampling (:func:`~recalign.lm.sampling.sample_continuations`)."""
    key_ok[:, slot] = True
    mask = torch.zeros(key_ok.shape[0], 1, 1, key_ok.shape[1], dtype=dtype, device=key_ok.device)
    mask.masked_fill_(~key_ok[:, None, None, :], torch.finfo(dtype).min)
    return decoder(
        input_ids=feed[:, None],
        attention_mask=mask,
        position_ids=positions[:, None],
        use_cache=True,
        **cache_kwarg(decoder, static),
    ).last_hidden_state[:, -1]


def _greedy(model, head, hidden: torch.Tensor) -> torch.Tensor:
    """argmax of the next-token logits for ``[B, H]`` hidden states (float32, soft-capped like the model)."""
    return head_logits(model, head, hidden).argmax(-1)


def score_and_generate(
    model,
    prompts: Sequence[Sequence[int]],
    answers: Sequence[Sequence[Sequence[int]]],
    *,
    stop_ids: Sequence[int],
    max_new_tokens: int = 32,
    pad_id: int = 0,
) -> JointOutput:
    """Summed answer log-probs (as :func:`~recalign.lm.scoring.answer_logprobs` with ``impl="packed"``)
    and greedy continuations (as :func:`~recalign.lm.generation.generate_answers`) of ``B`` prompts,
    each prompt run through the model once.

    Call under ``torch.inference_mode()`` / ``no_grad`` with the model in eval mode (the evaluation
    drivers do). All answers of a prompt share its row (no chunking): this is the evaluation layout.
    """
    reason = joint_unsupported(model, max_new_tokens=max_new_tokens)
    if reason:
        raise ValueError(f"joint scoring + generation not available: {reason}")
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be >= 1")
    a_max = _validate(prompts, answers)
    decoder, head = decoder_and_head(model)
    dtype, device = _model_dtype_device(model)
    cfg = _unwrap(model).config
    b_n = len(prompts)
    stops = {int(s) for s in stop_ids}

    # 1. the shared pass: prompt + all answers, tree mask, cache kept
    t0 = time.perf_counter()
    rows = [(b, 0, len(answers[b])) for b in range(b_n)]
    batch = packed_batch(prompts, answers, rows, dtype, device)
    cache = DynamicCache(config=cfg)
    hidden = decoder(
        **decoder_inputs(model, batch.input_ids),
        attention_mask=batch.mask,
        position_ids=batch.position_ids,
        use_cache=True,
        **cache_kwarg(decoder, cache),
    ).last_hidden_state
    t1 = time.perf_counter()
    per_answer = packed_scores(model, head, hidden, batch)
    scores = _assemble(per_answer, [[len(a) for a in ans] for ans in answers], a_max, device)
    t2 = time.perf_counter()

    # 2. greedy decoding from the prompt part of that cache
    plens = torch.tensor([len(p) for p in prompts], device=device)
    p_max = int(plens.max())
    tok = _greedy(model, head, hidden[torch.arange(b_n, device=device), plens - 1])
    del hidden, batch
    generated: list[list[int]] = [[] for _ in range(b_n)]
    done = [False] * b_n
    steps = 0
    static = None
    key_ok = None
    for step in range(max_new_tokens):
        for i, t in enumerate(tok.tolist()):
            if done[i]:
                continue
            if t in stops:
                done[i] = True
            else:
                generated[i].append(t)
        if all(done) or step == max_new_tokens - 1:
            break
        if static is None:
            # room for the at most max_new_tokens - 1 tokens fed back; prompt entries copied once
            length = p_max + max_new_tokens - 1
            static = prompt_static_cache(cfg, cache, p_max, length)
            del cache
            key_ok = torch.zeros(b_n, length, dtype=torch.bool, device=device)
            key_ok[:, :p_max] = torch.arange(p_max, device=device)[None, :] < plens[:, None]
        feed = torch.where(torch.tensor(done, device=device), torch.full_like(tok, pad_id), tok)
        h = decode_step(decoder, static, key_ok, p_max + step, feed, plens + step, dtype)
        tok = _greedy(model, head, h)
        steps += 1
    t3 = time.perf_counter()
    return JointOutput(
        scores=scores,
        generated=generated,
        forward_seconds=t1 - t0,
        scoring_seconds=t2 - t1,
        decode_seconds=t3 - t2,
        steps=steps,
    )
