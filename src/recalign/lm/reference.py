"""Reference log-probabilities for DPO / S-DPO / DMPO without a second copy of the model.

Preference losses compare the policy with a frozen reference πref (the model preference training
starts from). The reference implementations keep a second full model in memory and run it on every
step. recalign offers two cheaper ways, both exact:

(a) **Precompute and cache** (:func:`precompute_reference_logprobs`). The reference never changes, so
    log πref(y|x) for every (prompt, answer) of the preference data is computed *once*, with
    shared-prefix scoring (:func:`recalign.lm.scoring.answer_logprobs`: prompt run once per example,
    LM head on answer tokens only), and saved as a safetensors file. The file name is a hash of

    - the model's identity: its class, its config (minus the path it was loaded from) and a
      fingerprint of every weight (so a different checkpoint, an SFT adapter, a dtype change all miss;
      a hybrid model's item-token projector and item table are part of the model, so they count too);
    - the exact token ids of every prompt and answer (so a different tokenizer, template, seed or
      negative-sampling draw misses too; soft item tokens are the negative ids of hybrid prompts).

    Later runs load the file instead of recomputing; there is no pickle anywhere (safetensors holds only
    tensors and a string→string metadata map). Training then needs no reference forward pass at all.
    The model is used *as given*: a peft model with an SFT adapter is scored with that adapter active.

(b) **Adapter disabled** (:func:`adapter_disabled`, :func:`reference_answer_logprobs`). When the policy
    is a peft model whose LoRA adapter is trained on top of the reference weights (a fresh adapter on the
    SFT-merged model, say), the reference is the very same module with the adapter switched off. One set
    of weights, a no-grad pass per step. This is only correct if the adapter being trained is the *only*
    difference between policy and reference: continuing to train the SFT adapter itself and disabling it
    would give the pre-SFT base as reference — use (a) in that case.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from recalign.io import atomic_write_bytes

__all__ = [
    "ReferenceLogprobs",
    "adapter_disabled",
    "cache_key",
    "cached_reference_logprobs",
    "load_reference_cache",
    "model_fingerprint",
    "precompute_reference_logprobs",
    "reference_answer_logprobs",
    "tokenize_preference_data",
]

#: Bumped whenever what is stored (or how the key is formed) changes, so stale caches simply miss.
CACHE_FORMAT = "recalign-reference-v1"
# Config entries that describe where/when a model was loaded, not what it computes.
_VOLATILE_CONFIG_KEYS = ("_name_or_path", "transformers_version", "_commit_hash", "name_or_path")


class _PreferenceLike(Protocol):
    prompts: Sequence[str]

    def __len__(self) -> int: ...

    def answers(self, i: int) -> list[str]: ...


@dataclass
class ReferenceLogprobs:
    """Reference log-probs of every answer of every example.

    Attributes:
        logprobs: ``[n, A]`` float32 summed answer log-probs (column 0 the chosen answer); ``-inf`` where
            ``mask`` is False (examples with fewer answers).
        n_tokens: ``[n, A]`` answer lengths in tokens.
        mask: ``[n, A]`` bool, real answers.
        key: the cache key (hex sha256).
        path: the safetensors file, if cached on disk.
        from_cache: True if loaded rather than computed.
    """

    logprobs: torch.Tensor
    n_tokens: torch.Tensor
    mask: torch.Tensor
    key: str
    path: Path | None = None
    from_cache: bool = False

    def __len__(self) -> int:
        return int(self.logprobs.shape[0])

    def rows(self, index: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Reference log-probs of a batch of examples (by position in the preference data)."""
        return self.logprobs[torch.as_tensor(index, dtype=torch.long)]


# ---------------------------------------------------------------------- identity and keys
def _peft_unwrap(model):
    return getattr(model, "module", model)  # DDP / accelerate wrappers


def model_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over the model's class, its config and every tensor of its state dict.

    Tensors shared between names (tied embeddings) are hashed once. Hashing the bytes of a 135M-parameter
    float32 model takes about a second, negligible next to the scoring it saves.
    """
    model = _peft_unwrap(model)
    h = hashlib.sha256()
    h.update(type(model).__name__.encode())
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "to_dict"):
        d = {k: v for k, v in cfg.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
        h.update(json.dumps(d, sort_keys=True, default=str).encode())
    seen: set[tuple[int, int]] = set()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        ident = (t.untyped_storage().data_ptr(), t.storage_offset())
        if t.numel() and ident in seen:
            h.update(b"=shared")
            continue
        seen.add(ident)
        t = t.contiguous().cpu()
        if t.numel():
            # view as raw bytes: works for bfloat16 too, which numpy cannot represent
            h.update(t.view(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def cache_key(
    fingerprint: str, prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[Sequence[int]]]
) -> str:
    """sha256 of (format, model fingerprint, every prompt's and answer's token ids, with lengths)."""
    h = hashlib.sha256()
    h.update(CACHE_FORMAT.encode())
    h.update(fingerprint.encode())
    h.update(np.int64(len(prompts)).tobytes())
    for p, ans in zip(prompts, answers, strict=True):
        h.update(np.asarray([len(p), len(ans)], dtype=np.int64).tobytes())
        h.update(np.asarray(p, dtype=np.int64).tobytes())
        for a in ans:
            h.update(np.int64(len(a)).tobytes())
            h.update(np.asarray(a, dtype=np.int64).tobytes())
    return h.hexdigest()


def _cache_path(cache_dir: str | Path, key: str) -> Path:
    return Path(cache_dir) / f"reference-{key[:40]}.safetensors"


def load_reference_cache(cache_dir: str | Path, key: str) -> ReferenceLogprobs | None:
    """The cached reference log-probs for ``key``, or None if absent (or written for another key)."""
    from safetensors import safe_open

    path = _cache_path(cache_dir, key)
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("key") != key or meta.get("format") != CACHE_FORMAT:
            return None
        tensors = {name: f.get_tensor(name) for name in ("logprobs", "n_tokens", "mask")}
    return ReferenceLogprobs(
        logprobs=tensors["logprobs"],
        n_tokens=tensors["n_tokens"],
        mask=tensors["mask"],
        key=key,
        path=path,
        from_cache=True,
    )


def _save_cache(cache_dir: str | Path, ref: ReferenceLogprobs, extra_meta: dict[str, str]) -> Path:
    from safetensors.torch import save

    path = _cache_path(cache_dir, ref.key)
    data = save(
        {
            "logprobs": ref.logprobs.contiguous(),
            "n_tokens": ref.n_tokens.contiguous(),
            "mask": ref.mask.contiguous(),
        },
        metadata={"key": ref.key, "format": CACHE_FORMAT, **extra_meta},
    )
    atomic_write_bytes(path, data)  # a killed run never leaves a truncated cache behind
    return path


# ---------------------------------------------------------------------- computing
def _score(
    model, prompts, answers, *, batch_size: int, impl: str, progress: bool
) -> tuple[torch.Tensor, ...]:
    from recalign.lm.scoring import answer_logprobs

    n = len(prompts)
    a_max = max((len(a) for a in answers), default=0)
    logprobs = torch.full((n, a_max), float("-inf"), dtype=torch.float32)
    n_tokens = torch.zeros(n, a_max, dtype=torch.long)
    mask = torch.zeros(n, a_max, dtype=torch.bool)
    starts = range(0, n, batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="reference log-probs", unit="batch")
    was_training = model.training
    model.eval()  # the reference is deterministic: no dropout
    try:
        with torch.no_grad():
            for s in starts:
                e = min(n, s + batch_size)
                out = answer_logprobs(model, prompts[s:e], answers[s:e], impl=impl)
                w = out.sum.shape[1]
                logprobs[s:e, :w] = out.sum.float().cpu()
                n_tokens[s:e, :w] = out.n_tokens.cpu()
                mask[s:e, :w] = out.mask.cpu()
    finally:
        model.train(was_training)
    return logprobs, n_tokens, mask


def tokenize_preference_data(
    tokenizer, pref_data: _PreferenceLike
) -> tuple[list[list[int]], list[list[list[int]]]]:
    """Prompt and answer token ids (chosen first) with the one tokenisation rule of recalign."""
    from recalign.lm.prompts import encode_answer, encode_prompt

    prompts = [encode_prompt(tokenizer, p) for p in pref_data.prompts]
    answers = [[encode_answer(tokenizer, a) for a in pref_data.answers(i)] for i in range(len(pref_data))]
    return prompts, answers


def precompute_reference_logprobs(
    model: torch.nn.Module,
    tokenizer,
    pref_data: _PreferenceLike,
    cache_dir: str | Path | None,
    *,
    batch_size: int = 8,
    impl: str = "packed",
    progress: bool = False,
    fingerprint: str | None = None,
) -> ReferenceLogprobs:
    """Reference log-probs of every (prompt, answer) of ``pref_data``, computed once and cached.

    Args:
        model: the frozen starting model (used as given; see the module docstring).
        tokenizer: the tokenizer prompts and answers are encoded with (``encode_prompt`` /
            ``encode_answer``, the same rule as training).
        pref_data: a :class:`recalign.methods.preference_data.PreferenceData` (anything with
            ``prompts`` and ``answers(i)``).
        cache_dir: where the safetensors file lives; ``None`` computes without caching.
        batch_size: examples per scoring call.
        impl: shared-prefix scoring implementation (``"packed"`` or ``"kv"``).
        fingerprint: precomputed :func:`model_fingerprint` (skip re-hashing the weights).

    Returns:
        :class:`ReferenceLogprobs`; ``from_cache`` tells whether the file was reused.
    """
    prompts, answers = tokenize_preference_data(tokenizer, pref_data)
    return cached_reference_logprobs(
        model,
        prompts,
        answers,
        cache_dir,
        batch_size=batch_size,
        impl=impl,
        progress=progress,
        fingerprint=fingerprint,
    )


def cached_reference_logprobs(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    answers: Sequence[Sequence[Sequence[int]]],
    cache_dir: str | Path | None,
    *,
    batch_size: int = 8,
    impl: str = "packed",
    progress: bool = False,
    fingerprint: str | None = None,
) -> ReferenceLogprobs:
    """:func:`precompute_reference_logprobs` on token ids (prompts ``[n]``, answers ``[n][A]``)."""
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answer lists")
    fp = fingerprint or model_fingerprint(model)
    key = cache_key(fp, prompts, answers)
    if cache_dir is not None:
        hit = load_reference_cache(cache_dir, key)
        if hit is not None:
            return hit
    logprobs, n_tokens, mask = _score(
        model, list(prompts), list(answers), batch_size=batch_size, impl=impl, progress=progress
    )
    ref = ReferenceLogprobs(logprobs=logprobs, n_tokens=n_tokens, mask=mask, key=key)
    if cache_dir is not None:
        cfg = getattr(_peft_unwrap(model), "config", None)
        ref.path = _save_cache(
            cache_dir,
            ref,
            {
                "model_fingerprint": fp,
                "model_name": str(getattr(cfg, "_name_or_path", "")),
                "n_examples": str(len(prompts)),
            },
        )
    return ref


# ---------------------------------------------------------------------- adapter disabled
def _is_peft(model) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


@contextmanager
def adapter_disabled(model) -> Iterator[torch.nn.Module]:
    """Run ``model`` (a peft model) as its base model inside the block: the reference, for free.

    Raises ``TypeError`` for a model without adapters, where "disabling" would silently make the policy
    its own reference (every reward identically zero, nothing learned).
    """
    inner = _peft_unwrap(model)
    if not _is_peft(inner):
        raise TypeError(
            f"{type(inner).__name__} has no LoRA adapter to disable; precompute reference log-probs instead"
        )
    with inner.disable_adapter():
        yield model


def reference_answer_logprobs(
    model,
    prompts: Sequence[Sequence[int]],
    answers: Sequence[Sequence[Sequence[int]]],
    *,
    impl: str = "packed",
):
    """Shared-prefix answer log-probs of the base model under a peft ``model``: no grad, no dropout.

    Returns the scoring module's ``AnswerScores`` (``.sum`` ``[B, A]``), detached.
    """
    from recalign.lm.scoring import answer_logprobs

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), adapter_disabled(model):
            return answer_logprobs(model, prompts, answers, impl=impl)
    finally:
        model.train(was_training)
