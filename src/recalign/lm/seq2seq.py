"""Encoder-decoder (FLAN-T5 family) support: tokenisation, answer scoring, a tiny T5 for tests.

Cao et al. align FLAN-T5 models, so recalign treats encoder-decoder models as a second family next to
decoder-only ones. What changes for them:

Tokenisation (the seq2seq counterpart of ``recalign.lm.prompts.encode_prompt/encode_answer``)
    The prompt is the *encoder* input: its text without special tokens, then EOS (what T5 tokenizers
    produce by default, and what the tiny test tokenizer gets explicitly). The answer is the *decoder*
    target: its text without special tokens, then EOS. The decoder input is the target shifted right
    behind ``decoder_start_token_id`` (T5 uses the pad id). No leading space is added: T5's
    sentencepiece starts every text with a word boundary anyway, and the decoder does not continue the
    prompt's text.

Scoring many answers per prompt (the "shared prefix" of an encoder-decoder model)
    The prompt only enters through the encoder, so :func:`seq2seq_answer_logprobs` runs the encoder
    *once per prompt* and the decoder over all of that prompt's answers as one batch, cross-attending to
    the encoder states expanded (``index_select``) across the answers. The LM head is applied only at
    real answer positions (padding never reaches the vocabulary matmul), in row chunks. The result is the
    same :class:`~recalign.lm.scoring.AnswerScores` as the decoder-only scorer, equal to
    :func:`naive_seq2seq_answer_logprobs` (one full encoder + decoder pass per answer) to float tolerance,
    and differentiable (the encoder's gradient is accumulated once per prompt).

Tiny model
    :func:`build_tiny_t5` builds a randomly initialised T5 from ``T5Config`` (FLAN-T5's gated-GELU
    feed-forward) around an in-process BPE tokenizer, so tests never touch a hub.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import torch
from transformers import PreTrainedTokenizerBase, T5Config, T5ForConditionalGeneration

from recalign.lm.modules import AnswerScores, assemble_scores, is_seq2seq, unwrap_peft
from recalign.lm.modules import validate_answers as _validate

IMPLS = ("shared", "naive")
#: answer-token rows per LM-head matmul (bounds the ``[rows, vocab]`` logits tensor).
HEAD_CHUNK = 1024


# ---------------------------------------------------------------------- family and tokenisation
def encode_source(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    """Encoder input ids of ``prompt``: text tokens, then EOS."""
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    return [int(i) for i in ids] + [int(tokenizer.eos_token_id)]


def encode_target(tokenizer: PreTrainedTokenizerBase, answer: str) -> list[int]:
    """Decoder target ids of ``answer``: text tokens, then EOS (generation stops there)."""
    ids = tokenizer.encode(answer.strip(), add_special_tokens=False)
    return [int(i) for i in ids] + [int(tokenizer.eos_token_id)]


def decoder_start_id(model) -> int:
    cfg = unwrap_peft(model).config
    start = getattr(cfg, "decoder_start_token_id", None)
    if start is None:
        start = cfg.pad_token_id
    if start is None:
        raise ValueError("model config has neither decoder_start_token_id nor pad_token_id")
    return int(start)


# ---------------------------------------------------------------------- tiny model for tests
def build_tiny_t5(
    tokenizer: PreTrainedTokenizerBase,
    *,
    d_model: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    d_ff: int = 128,
    seed: int = 0,
) -> T5ForConditionalGeneration:
    """A randomly initialised FLAN-T5-shaped model small enough for unit tests (seeded).

    ``decoder_start_token_id`` is the pad id, as in T5. transformers 5 always ties T5's LM head to the
    shared embedding; we keep T5's decoder-output scaling (``d_model ** -0.5``) so that the tied head's
    initial logits stay moderate (without it a randomly initialised tiny model is absurdly confident).
    """
    if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer needs pad and eos tokens for a T5 model")
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=d_model // num_heads,
        d_ff=d_ff,
        num_layers=num_layers,
        num_decoder_layers=num_layers,
        num_heads=num_heads,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return T5ForConditionalGeneration(config)


# ---------------------------------------------------------------------- scoring helpers (inputs are
# checked by recalign.lm.modules.validate_answers: one rule for both families)
def _assemble(values: dict[tuple[int, int], torch.Tensor], answers, a_max: int, device) -> AnswerScores:
    per_answer = [(b, j, v) for (b, j), v in values.items()]
    return assemble_scores(per_answer, [[len(a) for a in ans] for ans in answers], a_max, device)


def _head_logprobs(base, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target | decoder state) for ``[N, d]`` states: T5's output scaling, then the head in chunks."""
    cfg = base.config
    if getattr(cfg, "scale_decoder_outputs", getattr(cfg, "tie_word_embeddings", False)):
        hidden = hidden * (cfg.d_model**-0.5)
    head = base.get_output_embeddings()
    out = []
    for s in range(0, hidden.shape[0], HEAD_CHUNK):
        lp = head(hidden[s : s + HEAD_CHUNK]).float().log_softmax(-1)
        out.append(lp.gather(-1, targets[s : s + HEAD_CHUNK, None]).squeeze(-1))
    return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)


def _pad(seqs: Sequence[Sequence[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    t = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), t), pad, dtype=torch.long, device=device)
    att = torch.zeros(len(seqs), t, dtype=torch.long, device=device)
    for r, s in enumerate(seqs):
        ids[r, : len(s)] = torch.tensor(list(s), dtype=torch.long, device=device)
        att[r, : len(s)] = 1
    return ids, att


# ---------------------------------------------------------------------- the reference
def naive_seq2seq_answer_logprobs(
    model, prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[Sequence[int]]]
) -> AnswerScores:
    """One full forward (encoder + decoder, full logits) per (prompt, answer) pair: the obvious way."""
    a_max = _validate(prompts, answers)
    base = unwrap_peft(model)
    device = next(base.parameters()).device
    start = decoder_start_id(model)
    values = {}
    for b, (p, ans) in enumerate(zip(prompts, answers)):
        src = torch.tensor([list(p)], dtype=torch.long, device=device)
        for j, a in enumerate(ans):
            tgt = torch.tensor(list(a), dtype=torch.long, device=device)
            dec_in = torch.tensor([[start] + list(a)[:-1]], dtype=torch.long, device=device)
            logits = model(
                input_ids=src, attention_mask=torch.ones_like(src), decoder_input_ids=dec_in
            ).logits
            lp = logits[0].float().log_softmax(-1)
            values[(b, j)] = lp.gather(-1, tgt[:, None]).sum()
    return _assemble(values, answers, a_max, device)


# ---------------------------------------------------------------------- shared encoder pass
def seq2seq_answer_logprobs(
    model,
    prompts: Sequence[Sequence[int]],
    answers: Sequence[Sequence[Sequence[int]]],
    *,
    impl: str = "shared",
    chunk_size: int | None = None,
) -> AnswerScores:
    """Summed log-probs of every answer given its prompt, for an encoder-decoder model.

    Args:
        model: ``T5ForConditionalGeneration`` or similar, possibly wrapped by peft.
        prompts: ``B`` encoder inputs (:func:`encode_source`).
        answers: per prompt, its answers as decoder targets (:func:`encode_target`); counts may differ.
        impl: ``"shared"`` (encoder once per prompt) or ``"naive"`` (the reference).
        chunk_size: at most this many answers per decoder batch (``None``: all answers of the batch at
            once). The encoder still runs once: chunks reuse its states.

    Returns:
        :class:`AnswerScores` (``sum`` ``[B, A_max]``, ``-inf`` where padded).
    """
    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r} (choose from {', '.join(IMPLS)})")
    if impl == "naive":
        return naive_seq2seq_answer_logprobs(model, prompts, answers)
    a_max = _validate(prompts, answers)
    base = unwrap_peft(model)
    device = next(base.parameters()).device
    if a_max == 0:
        return _assemble({}, answers, 0, device)
    pad = base.config.pad_token_id if base.config.pad_token_id is not None else 0
    start = decoder_start_id(model)
    src, src_att = _pad(prompts, pad, device)
    enc = base.get_encoder()(input_ids=src, attention_mask=src_att).last_hidden_state  # [B, P, d]
    flat = [(b, j) for b, ans in enumerate(answers) for j in range(len(ans))]
    size = len(flat) if not chunk_size or chunk_size <= 0 else int(chunk_size)
    values: dict[tuple[int, int], torch.Tensor] = {}
    for s in range(0, len(flat), size):
        part = flat[s : s + size]
        owner = torch.tensor([b for b, _ in part], device=device)
        dec_in, dec_att = _pad([[start] + list(answers[b][j])[:-1] for b, j in part], pad, device)
        hidden = base.decoder(
            input_ids=dec_in,
            attention_mask=dec_att,
            encoder_hidden_states=enc.index_select(0, owner),
            encoder_attention_mask=src_att.index_select(0, owner),
            use_cache=False,
        ).last_hidden_state  # [n, La, d]
        rows, cols, targets, tok_owner = [], [], [], []
        for r, (b, j) in enumerate(part):
            a = list(answers[b][j])
            rows.extend([r] * len(a))
            cols.extend(range(len(a)))
            targets.extend(a)
            tok_owner.extend([r] * len(a))
        h = hidden[torch.tensor(rows, device=device), torch.tensor(cols, device=device)]
        tok_lp = _head_logprobs(base, h, torch.tensor(targets, device=device))
        sums = torch.zeros(len(part), device=device, dtype=tok_lp.dtype).index_add(
            0, torch.tensor(tok_owner, device=device), tok_lp
        )
        for r, key in enumerate(part):
            values[key] = sums[r]
    return _assemble(values, answers, a_max, device)


# ---------------------------------------------------------------------- one entry point for both families
def text_encoders(model, tokenizer) -> tuple[Callable[[str], list[int]], Callable[[str], list[int]]]:
    """``(encode prompt, encode answer)`` for ``model``'s family: this module's rule for encoder-decoder
    models, :mod:`recalign.lm.prompts`' one rule for decoder-only models."""
    if is_seq2seq(model):
        return partial(encode_source, tokenizer), partial(encode_target, tokenizer)
    from recalign.lm.prompts import encode_answer, encode_prompt

    return partial(encode_prompt, tokenizer), partial(encode_answer, tokenizer)


def answer_stop_ids(model, tokenizer) -> list[int]:
    """Tokens that end a generated answer for ``model``'s family."""
    if is_seq2seq(model):
        return [int(tokenizer.eos_token_id)]
    from recalign.lm.prompts import stop_token_ids

    return stop_token_ids(tokenizer)


def load_seq2seq(path: str, dtype: torch.dtype = torch.float32):
    """A local encoder-decoder model directory (FLAN-T5 style): safetensors only, no remote code."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from recalign.errors import RecalignInputError

    try:
        model = AutoModelForSeq2SeqLM.from_pretrained(
            path, dtype=dtype, use_safetensors=True, trust_remote_code=False
        )
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except OSError as e:
        raise RecalignInputError(f"cannot load model: {str(e).splitlines()[0]}", source=path) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok
