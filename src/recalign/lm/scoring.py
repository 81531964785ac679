"""Log-probabilities of many short answers that share one long prompt -- computed with the prompt run once.

A recommendation prompt is long (history + candidate list, ~300 tokens) and each answer is short (a title,
~10 tokens). The obvious way (:func:`naive_answer_logprobs`, what the S-DPO reference code does) runs
``prompt + answer`` as its own sequence for every answer and computes logits over the whole vocabulary at
every position: with 20 candidates that is ~20x the prompt compute, and with SmolLM2's 49k vocabulary the
LM head alone costs as much as a dozen transformer layers per position.

:func:`answer_logprobs` computes the *same numbers* (to float tolerance, tested) by running each prompt
once and letting every answer attend to it, and by applying the LM head only at the positions that predict
answer tokens. Two implementations, selected with ``impl``:

``"packed"`` (default)
    One sequence per example (per chunk of answers): ``prompt + a_1[:-1] + a_2[:-1] + ...``, with a 4-D
    additive attention mask shaped like a tree -- causal inside the prompt; every answer token sees the
    whole prompt and, causally, the earlier tokens of its *own* answer only -- and position ids that
    restart at ``len(prompt)`` for each answer, so each answer is positioned exactly as if it followed the
    prompt alone. The last token of an answer is never fed (nothing is predicted from it). Examples are
    right-padded into one batch. transformers 5 passes a 4-D mask through unchanged
    (``masking_utils._preprocess_mask_arguments`` returns it as-is) to the ``eager`` kernel (which adds
    it to the attention scores) and to ``sdpa`` (``attn_mask``), so we build it as a float tensor with
    ``0`` (attend) and ``finfo(dtype).min`` (blocked) -- the additive format both accept. Other attention
    kernels (flash-attention, flex) ignore or reject such masks; use ``"kv"`` there.
``"kv"``
    Run the prompts (right-padded batch), take their KV cache, expand it across each example's answers
    (``index_select`` per layer into a fresh ``DynamicCache``) and run all answers as one batch against
    it, with a 4-D mask hiding the prompt padding. The expanded cache costs
    ``answers x prompt length x layers`` memory, so answers are run in passes of at most
    ``KV_CACHE_TOKENS // prompt length`` rows (the prompt itself still runs once). On CPU this is slower
    than ``"packed"`` (the expansion is memory traffic); it avoids the ``T x T`` mask and suits very many
    answers per prompt.

Both are differentiable: gradients reach the parameters through the shared prompt once per example (not
once per answer), which is what S-DPO/DMPO training with ``[B, 1+K]`` answers needs.

Hybrid prompts (:mod:`recalign.lm.hybrid`, LLaRA's item tokens) hold negative ids ``-(item + 1)`` for
soft tokens; every path here feeds the decoder through :func:`recalign.lm.hybrid.decoder_inputs`, which
passes text-only ids on as ``input_ids`` (the path above, unchanged) and gives ``inputs_embeds`` (the
LM's embeddings, a projected item embedding at each soft token) otherwise. Answers are always plain ids.

Only answer positions go through the LM head: we run the *decoder* (``get_decoder()``; for a peft
``PeftModel`` the LoRA layers are injected into that same module tree, so the adapter is active, and
``disable_adapter()`` works as usual), gather the hidden states that predict answer tokens (the last prompt
position predicts the first answer token, each answer position predicts the next) and apply
``get_output_embeddings()`` there only, in row chunks so the ``[N, vocab]`` logits never exist at once
in inference. Gemma-style ``final_logit_softcapping`` is applied when the config has it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from recalign.lm.hybrid import decoder_inputs
from recalign.lm.modules import AnswerScores, cache_kwarg, head_logits, output_cache
from recalign.lm.modules import assemble_scores as _assemble
from recalign.lm.modules import model_dtype_device as _model_dtype_device
from recalign.lm.modules import unwrap_peft as _unwrap
from recalign.lm.modules import validate_answers as _validate

IMPLS = ("packed", "kv")
#: answer-token rows per LM-head matmul: bounds the [rows, vocab] logits tensor (2048 x 49k x 4 B = 400 MB).
HEAD_CHUNK = 1024
#: "kv": answer rows per pass are limited so that rows x prompt length <= this many cached positions
#: (the expanded cache costs rows x (prompt + answer) x layers x 2 x kv_heads x head_dim floats:
#: 16k positions = ~0.75 GB for SmolLM2's 30 layers).
KV_CACHE_TOKENS = 16384


# ---------------------------------------------------------------------- model plumbing
def decoder_and_head(model) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The transformer body (input ids -> final hidden states) and the LM head of a causal LM."""
    base = _unwrap(model)
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    if decoder is None or decoder is base:
        decoder = getattr(base, "model", None)
    head = base.get_output_embeddings()
    if decoder is None or head is None:
        raise TypeError(f"cannot find decoder and LM head of {type(base).__name__}")
    return decoder, head


def token_logprobs(model, head, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target | hidden) for ``[N, H]`` hidden states, LM head applied in row chunks (soft-capped
    where the model's config asks): the one place where hidden states meet the vocabulary."""
    out = []
    for start in range(0, hidden.shape[0], HEAD_CHUNK):
        lp = head_logits(model, head, hidden[start : start + HEAD_CHUNK]).log_softmax(-1)
        out.append(lp.gather(-1, targets[start : start + HEAD_CHUNK, None]).squeeze(-1))
    return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)


def _chunks(n: int, chunk_size: int | None) -> list[tuple[int, int]]:
    if n == 0:
        return []
    size = n if not chunk_size or chunk_size <= 0 else int(chunk_size)
    return [(s, min(n, s + size)) for s in range(0, n, size)]


# ---------------------------------------------------------------------- the reference
def naive_answer_logprobs(
    model,
    prompts: Sequence[Sequence[int]],
    answers: Sequence[Sequence[Sequence[int]]],
    *,
    batch_size: int | None = None,
) -> AnswerScores:
    """The obvious reference: one full ``prompt + answer`` sequence per answer, full logits, log_softmax.

    Sequences are right-padded with a 2-D attention mask (position ids are then ``0..len-1`` for the real
    tokens, as the model would see them alone). ``batch_size`` sequences per forward (default: all answers
    of one prompt together).
    """
    a_max = _validate(prompts, answers)
    _, device = _model_dtype_device(model)
    seqs: list[tuple[int, int, list[int], int]] = []  # (b, j, ids, prompt_len)
    for b, (p, ans) in enumerate(zip(prompts, answers)):
        for j, a in enumerate(ans):
            seqs.append((b, j, list(p) + list(a), len(p)))
    groups: list[list[tuple[int, int, list[int], int]]] = []
    if batch_size is None:
        for b in range(len(prompts)):
            g = [s for s in seqs if s[0] == b]
            if g:
                groups.append(g)
    else:
        groups = [seqs[i : i + batch_size] for i in range(0, len(seqs), batch_size)]
    per_answer = []
    for g in groups:
        t_max = max(len(s[2]) for s in g)
        ids = torch.zeros(len(g), t_max, dtype=torch.long, device=device)
        att = torch.zeros(len(g), t_max, dtype=torch.long, device=device)
        for r, (_, _, s, _) in enumerate(g):
            ids[r, : len(s)] = torch.tensor(s, device=device)
            att[r, : len(s)] = 1
        # the full model's forward applies any logit post-processing (e.g. soft-capping) itself
        logits = model(**decoder_inputs(model, ids), attention_mask=att).logits.float()
        lp = logits.log_softmax(-1)
        for r, (b, j, s, plen) in enumerate(g):
            tgt = torch.tensor(s[plen:], device=device)
            tok = lp[r, plen - 1 : len(s) - 1].gather(-1, tgt[:, None]).squeeze(-1)
            per_answer.append((b, j, tok.sum()))
    n_tokens = [[len(a) for a in ans] for ans in answers]
    return _assemble(per_answer, n_tokens, a_max, device)


# ---------------------------------------------------------------------- packed: one tree-masked sequence
def _packed_rows(
    prompts: Sequence[Sequence[int]],
    answers: Sequence[Sequence[Sequence[int]]],
    chunk_size: int | None,
) -> list[list[tuple[int, int, int]]]:
    """Forward passes as lists of rows; a row is ``(example b, first answer, end answer)``.

    Forward pass ``k`` holds chunk ``k`` of every example that has one, so the batch dimension stays the
    caller's number of examples.
    """
    per_example = [_chunks(len(ans), chunk_size) for ans in answers]
    n_pass = max((len(c) for c in per_example), default=0)
    passes = []
    for k in range(n_pass):
        rows = [(b, *c[k]) for b, c in enumerate(per_example) if k < len(c)]
        if rows:
            passes.append(rows)
    return passes


@dataclass
class PackedBatch:
    """The inputs of one packed forward pass and where to read each answer's log-probs from it."""

    input_ids: torch.Tensor  # [n, T]
    position_ids: torch.Tensor  # [n, T]
    mask: torch.Tensor  # [n, 1, T, T] additive (0 / finfo.min)
    #: per answer: (example b, answer j, row, hidden positions predicting its tokens, target ids)
    gathers: list[tuple[int, int, int, list[int], list[int]]]


def packed_batch(prompts, answers, rows: list[tuple[int, int, int]], dtype, device) -> PackedBatch:
    """Build the tree-masked packed rows (``prompt + a_1[:-1] + a_2[:-1] + ...``) of one forward pass.

    Each row starts with its whole prompt at positions ``0..len(prompt)-1`` (the joint evaluation path,
    :mod:`recalign.lm.joint`, relies on this: the first ``len(prompt)`` cache entries of a row are the
    prompt's exact KV).
    """
    seqs, pos, seg = [], [], []
    gathers: list[tuple[int, int, int, list[int], list[int]]] = []
    for r, (b, start, end) in enumerate(rows):
        p = list(prompts[b])
        plen = len(p)
        ids, positions, segments = list(p), list(range(plen)), [0] * plen
        for j in range(start, end):
            a = list(answers[b][j])
            first = len(ids)
            fed = a[:-1]
            ids.extend(fed)
            positions.extend(range(plen, plen + len(fed)))
            segments.extend([j - start + 1] * len(fed))
            gathers.append((b, j, r, [plen - 1] + list(range(first, first + len(fed))), a))
        seqs.append(ids)
        pos.append(positions)
        seg.append(segments)
    t_max = max(len(s) for s in seqs)
    n = len(rows)
    input_ids = torch.zeros(n, t_max, dtype=torch.long, device=device)
    position_ids = torch.zeros(n, t_max, dtype=torch.long, device=device)
    segment = torch.full((n, t_max), -1, dtype=torch.long, device=device)
    for r in range(n):
        L = len(seqs[r])
        input_ids[r, :L] = torch.tensor(seqs[r], device=device)
        position_ids[r, :L] = torch.tensor(pos[r], device=device)
        segment[r, :L] = torch.tensor(seg[r], device=device)
    idx = torch.arange(t_max, device=device)
    causal = idx[None, :, None] >= idx[None, None, :]  # [1, q, k]
    seg_q, seg_k = segment[:, :, None], segment[:, None, :]
    allowed = causal & (seg_k != -1) & ((seg_k == 0) | (seg_k == seg_q))
    # padding queries attend to themselves only (their outputs are never read; avoids empty rows)
    allowed = allowed | ((seg_q == -1) & (idx[None, :, None] == idx[None, None, :]))
    mask = torch.zeros(n, 1, t_max, t_max, dtype=dtype, device=device)
    mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)
    return PackedBatch(input_ids, position_ids, mask, gathers)


def packed_scores(
    model, head, hidden: torch.Tensor, batch: PackedBatch
) -> list[tuple[int, int, torch.Tensor]]:
    """Per-answer summed log-probs ``(b, j, value)`` from the hidden states of a packed pass."""
    device = hidden.device
    flat_rows, flat_pos, targets, owner = [], [], [], []
    for k, (_, _, r, hpos, a) in enumerate(batch.gathers):
        flat_rows.extend([r] * len(hpos))
        flat_pos.extend(hpos)
        targets.extend(a)
        owner.extend([k] * len(a))
    if not batch.gathers:
        return []
    h = hidden[torch.tensor(flat_rows, device=device), torch.tensor(flat_pos, device=device)]
    tok_lp = token_logprobs(model, head, h, torch.tensor(targets, device=device))
    sums = torch.zeros(len(batch.gathers), device=device, dtype=tok_lp.dtype).index_add(
        0, torch.tensor(owner, device=device), tok_lp
    )
    return [(b, j, sums[k]) for k, (b, j, _, _, _) in enumerate(batch.gathers)]


def _packed_pass(
    model, decoder, head, prompts, answers, rows: list[tuple[int, int, int]], dtype, device
) -> list[tuple[int, int, torch.Tensor]]:
    batch = packed_batch(prompts, answers, rows, dtype, device)
    hidden = decoder(
        **decoder_inputs(model, batch.input_ids),
        attention_mask=batch.mask,
        position_ids=batch.position_ids,
        use_cache=False,
    ).last_hidden_state
    return packed_scores(model, head, hidden, batch)


def check_attn_impl(model) -> None:
    """Refuse an attention implementation that cannot take packed scoring's custom 4-D masks."""
    impl = getattr(_unwrap(model).config, "_attn_implementation", None)
    if impl not in (None, "eager", "sdpa"):
        raise ValueError(
            f"impl='packed' needs attn_implementation 'eager' or 'sdpa' (custom 4-D masks); model uses {impl!r}"
        )


def _packed(model, prompts, answers, chunk_size) -> list[tuple[int, int, torch.Tensor]]:
    check_attn_impl(model)
    decoder, head = decoder_and_head(model)
    dtype, device = _model_dtype_device(model)
    out = []
    for rows in _packed_rows(prompts, answers, chunk_size):
        out.extend(_packed_pass(model, decoder, head, prompts, answers, rows, dtype, device))
    return out


# ---------------------------------------------------------------------- kv: prompt cache expanded
def _kv(model, prompts, answers, chunk_size) -> list[tuple[int, int, torch.Tensor]]:
    check_attn_impl(model)
    decoder, head = decoder_and_head(model)
    dtype, device = _model_dtype_device(model)
    cfg = _unwrap(model).config
    b_n = len(prompts)
    plens = [len(p) for p in prompts]
    p_max = max(plens)
    ids = torch.zeros(b_n, p_max, dtype=torch.long, device=device)
    att = torch.zeros(b_n, p_max, dtype=torch.long, device=device)
    for b, p in enumerate(prompts):
        ids[b, : len(p)] = torch.tensor(list(p), device=device)
        att[b, : len(p)] = 1
    cache = DynamicCache(config=cfg)
    prompt_out = decoder(
        **decoder_inputs(model, ids), attention_mask=att, use_cache=True, **cache_kwarg(decoder, cache)
    )
    prompt_hidden = prompt_out.last_hidden_state  # [B, P_max, H]
    cache = output_cache(prompt_out)
    layers = [(layer.keys, layer.values) for layer in cache.layers]
    last_prompt = prompt_hidden[torch.arange(b_n, device=device), torch.tensor(plens, device=device) - 1]

    # one batch row per answer; rows are cut so that one expanded cache holds at most
    # KV_CACHE_TOKENS prompt positions (rows x P_max) per layer
    flat_all = [
        (b, j) for rows in _packed_rows(prompts, answers, chunk_size) for b, s, e in rows for j in range(s, e)
    ]
    per_pass = max(1, KV_CACHE_TOKENS // p_max)
    if chunk_size and chunk_size > 0:
        per_pass = min(per_pass, int(chunk_size))
    out = []
    for start in range(0, len(flat_all), per_pass):
        flat = flat_all[start : start + per_pass]
        lens_fed = [len(answers[b][j]) - 1 for b, j in flat]
        l_max = max(lens_fed)
        n = len(flat)
        hidden_ans = None
        if l_max > 0:
            owner = torch.tensor([b for b, _ in flat], device=device)
            a_ids = torch.zeros(n, l_max, dtype=torch.long, device=device)
            a_pos = torch.zeros(n, l_max, dtype=torch.long, device=device)
            valid = torch.zeros(n, l_max, dtype=torch.bool, device=device)
            for r, (b, j) in enumerate(flat):
                fed = list(answers[b][j])[:-1]
                if fed:
                    a_ids[r, : len(fed)] = torch.tensor(fed, device=device)
                    valid[r, : len(fed)] = True
                a_pos[r] = torch.arange(plens[b], plens[b] + l_max, device=device)
            prompt_ok = att.bool()[owner]  # [n, P_max]
            q = torch.arange(l_max, device=device)
            own = (q[None, :, None] >= q[None, None, :]) & valid[:, None, :]  # [n, q, k]
            own = own | (~valid[:, :, None] & (q[None, :, None] == q[None, None, :]))
            allowed = torch.cat([prompt_ok[:, None, :].expand(n, l_max, p_max), own], dim=-1)
            mask = torch.zeros(n, 1, l_max, p_max + l_max, dtype=dtype, device=device)
            mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)
            expanded = DynamicCache(
                ddp_cache_data=[(k.index_select(0, owner), v.index_select(0, owner)) for k, v in layers],
                config=cfg,
            )
            hidden_ans = decoder(
                input_ids=a_ids,
                attention_mask=mask,
                position_ids=a_pos,
                use_cache=True,
                **cache_kwarg(decoder, expanded),
            ).last_hidden_state  # [n, l_max, H]
        h_parts, targets, tok_owner = [], [], []
        for r, (b, j) in enumerate(flat):
            a = list(answers[b][j])
            h_parts.append(last_prompt[b : b + 1])
            if len(a) > 1:
                h_parts.append(hidden_ans[r, : len(a) - 1])
            targets.extend(a)
            tok_owner.extend([r] * len(a))
        h = torch.cat(h_parts)
        tok_lp = token_logprobs(model, head, h, torch.tensor(targets, device=device))
        sums = torch.zeros(n, device=device, dtype=tok_lp.dtype).index_add(
            0, torch.tensor(tok_owner, device=device), tok_lp
        )
        out.extend((b, j, sums[r]) for r, (b, j) in enumerate(flat))
    return out


# ---------------------------------------------------------------------- public entry point
def answer_logprobs(
    model,
    prompts: Sequence[Sequence[int]],
    answers: Sequence[Sequence[Sequence[int]]],
    *,
    impl: str = "packed",
    chunk_size: int | None = None,
) -> AnswerScores:
    """Summed log-probs of every answer given its prompt, each prompt computed once.

    Args:
        model: a causal LM (``*ForCausalLM``), possibly wrapped by peft.
        prompts: ``B`` prompts as token ids (from :func:`recalign.lm.prompts.encode_prompt`).
        answers: for each prompt, its answers as token ids (from ``encode_answer``); counts may differ
            (the result is padded to the largest count).
        impl: ``"packed"`` (tree-masked single sequence) or ``"kv"`` (expanded prompt cache).
        chunk_size: at most this many answers share one pass with their prompt (``None``: all). Bounds
            memory when scoring a whole catalogue; ``"packed"`` recomputes the prompt once per chunk of
            each example, ``"kv"`` reuses its prompt cache and runs at most this many answer rows per
            pass (in any case at most ``KV_CACHE_TOKENS // prompt length``).

    Returns:
        :class:`AnswerScores` with ``sum`` ``[B, A_max]`` (differentiable unless under ``no_grad``).
        Exactly equal (to float rounding) to :func:`naive_answer_logprobs`.
    """
    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r} (choose from {', '.join(IMPLS)})")
    if getattr(_unwrap(model).config, "is_encoder_decoder", False):
        # Encoder-decoder (T5 family): the shared prefix is the encoder pass (recalign.lm.seq2seq), so
        # every caller (SFT, preference objectives, evaluation) serves both families unchanged.
        from recalign.lm.seq2seq import seq2seq_answer_logprobs

        return seq2seq_answer_logprobs(model, prompts, answers, chunk_size=chunk_size)
    a_max = _validate(prompts, answers)
    _, device = _model_dtype_device(model)
    n_tokens = [[len(a) for a in ans] for ans in answers]
    if a_max == 0:
        return _assemble([], n_tokens, 0, device)
    keep = [b for b, ans in enumerate(answers) if len(ans)]
    sub_p = [prompts[b] for b in keep]
    sub_a = [answers[b] for b in keep]
    fn = _packed if impl == "packed" else _kv
    per_answer = [(keep[b], j, v) for b, j, v in fn(model, sub_p, sub_a, chunk_size)]
    return _assemble(per_answer, n_tokens, a_max, device)
