"""What every LM module needs to know about a model and an answer batch, in one place.

- :func:`unwrap_peft` is the transformers model inside a peft wrapper (LoRA layers stay injected);
  :func:`is_seq2seq`, :func:`model_dtype_device` and :func:`softcap` read it.
- :class:`AnswerScores` is what both scoring families return (decoder-only in :mod:`recalign.lm.scoring`,
  encoder-decoder in :mod:`recalign.lm.seq2seq`); :func:`validate_answers` is their one input check and
  :func:`assemble_scores` scatters per-answer sums into it.

Kept free of the scorers themselves, so that neither scoring module imports the other at load time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


def unwrap_peft(model) -> torch.nn.Module:
    """The transformers model inside a peft wrapper (LoRA layers stay injected), or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def is_seq2seq(model) -> bool:
    """True for encoder-decoder models (T5, FLAN-T5, BART, ...)."""
    return bool(getattr(unwrap_peft(model).config, "is_encoder_decoder", False))


def model_dtype_device(model) -> tuple[torch.dtype, torch.device]:
    """The dtype and device of the model's first parameter."""
    p = next(unwrap_peft(model).parameters())
    return p.dtype, p.device


def softcap(model) -> float | None:
    """The final-logit soft-capping of the model's (text) config (Gemma-2 style), None for most models."""
    cfg = unwrap_peft(model).config
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return getattr(cfg, "final_logit_softcapping", None)


def head_logits(model, head, hidden: torch.Tensor) -> torch.Tensor:
    """float32 next-token logits of ``hidden`` through the LM ``head``, soft-capped where the model's config
    asks (:func:`softcap`): what every decoding loop and scorer applies to a hidden state."""
    logits = head(hidden).float()
    cap = softcap(model)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


@dataclass
class AnswerScores:
    """Per-answer log-probabilities, padded to ``[B, A_max]``.

    ``sum``: summed log-prob of each answer's tokens given its prompt; padded entries are ``-inf``.
    ``n_tokens``: answer lengths in tokens (0 where padded). ``mask``: which entries are real answers.
    """

    sum: torch.Tensor
    n_tokens: torch.Tensor
    mask: torch.Tensor

    @property
    def mean(self) -> torch.Tensor:
        """Length-normalised log-prob (``sum / n_tokens``); ``-inf`` where padded."""
        return torch.where(self.mask, self.sum / self.n_tokens.clamp(min=1), self.sum)

    def select(self, length_normalize: bool = False) -> torch.Tensor:
        return self.mean if length_normalize else self.sum


def validate_answers(prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[Sequence[int]]]) -> int:
    """Check a scoring batch (non-empty prompts and answers, plain ids in answers); returns ``A_max``."""
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answer lists")
    a_max = 0
    for b, (p, ans) in enumerate(zip(prompts, answers)):
        if len(p) == 0:
            raise ValueError(f"prompt {b} is empty (it must contain at least one token)")
        for j, a in enumerate(ans):
            if len(a) == 0:
                raise ValueError(f"answer {j} of prompt {b} is empty")
            if min(a) < 0:
                raise ValueError(f"answer {j} of prompt {b} holds a soft item token (answers are plain ids)")
        a_max = max(a_max, len(ans))
    return a_max


def assemble_scores(
    per_answer: list[tuple[int, int, torch.Tensor]], n_tokens: list[list[int]], a_max: int, device
) -> AnswerScores:
    """Scatter per-answer sums ``(b, j, value)`` into a ``[B, A_max]`` tensor of ``-inf`` (differentiably)."""
    b_n = len(n_tokens)
    ntok = torch.zeros(b_n, a_max, dtype=torch.long, device=device)
    mask = torch.zeros(b_n, a_max, dtype=torch.bool, device=device)
    for b, lens in enumerate(n_tokens):
        if lens:
            ntok[b, : len(lens)] = torch.tensor(lens, dtype=torch.long, device=device)
            mask[b, : len(lens)] = True
    out = torch.full((b_n, a_max), float("-inf"), device=device)
    if per_answer:
        rows = torch.tensor([b for b, _, _ in per_answer], device=device)
        cols = torch.tensor([j for _, j, _ in per_answer], device=device)
        vals = torch.stack([v for _, _, v in per_answer])
        out = out.index_put((rows, cols), vals)
    return AnswerScores(sum=out, n_tokens=ntok, mask=mask)


__all__ = [
    "AnswerScores",
    "assemble_scores",
    "is_seq2seq",
    "model_dtype_device",
    "softcap",
    "unwrap_peft",
    "validate_answers",
]


_CACHE_NAMES: dict[type, str] = {}


def cache_kwarg(decoder: torch.nn.Module, cache) -> dict:
    """``{name: cache}`` for a decoder's forward, under the name its transformers version expects.

    transformers >= 5.2x renamed ``past_key_values`` to ``cache``; the old name still works there but
    warns on every call (a FutureWarning, once per scored batch), older versions only know the old one.
    The name is read from the forward signature once per decoder class.
    """
    import inspect

    cls = type(decoder)
    name = _CACHE_NAMES.get(cls)
    if name is None:
        params = inspect.signature(cls.forward).parameters
        name = _CACHE_NAMES[cls] = "cache" if "cache" in params else "past_key_values"
    return {name: cache}


def output_cache(output):
    """The KV cache a decoder returned (``output.cache``; ``past_key_values`` on older transformers)."""
    fields = getattr(output, "__dataclass_fields__", {})
    return output.cache if "cache" in fields else output.past_key_values
