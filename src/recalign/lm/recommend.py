"""Recommendations and explanations for a typed history: the library behind ``recalign recommend``,
``recalign explain`` and ``recalign serve``.

A :class:`RecommendSession` holds a loaded model and its catalogue (titles, their answer token ids and
the title trie, built once) and answers requests:

- :meth:`RecommendSession.recommend` ranks

  - the **whole catalogue minus the history** (default), against the next-item prompt *without* a
    list. ``method="exact"`` (default) finds the exact top-k with the pruned title-trie search of
    :mod:`recalign.lm.topk` (seconds for SmolLM2 on ML-100K instead of minutes);
    ``method="exhaustive"`` scores every title (the reference the exact search equals);
    ``method="two-stage"`` lets a classical recommender (:mod:`recalign.baselines`: ``pop``,
    ``sasrec``, ``gru4rec``, trained once when the session is made) retrieve the top ``retrieve``
    unseen items and the LM re-rank them with the candidate prompt it was trained on -- the usual
    production shape, and a different question from the catalogue-wide one;
  - or exactly the ``candidates`` given (or ``sample`` random unseen items), listed in the candidate
    prompt as in evaluation.

  ID-based models (a CLLM4Rec run directory) score every item in one forward pass of the
  recommendation prompt through the item head; a history typed for a user the model does not know
  uses the mean of the user-token embeddings in place of a user token.
- :meth:`RecommendSession.explain` generates a short rationale for why an item fits the history (the
  DMPO paper's explanation case study): the model is asked, in its chat format, what the item has in
  common with the history, and answers greedily in a sentence or two. CLLM4Rec explains with its
  (untruncated) backbone LM.

Titles are matched exactly, then case-insensitively (with or without the year); an unknown or ambiguous
title is a one-line :class:`~recalign.errors.RecalignInputError` with the closest catalogue titles.

Where it lives (every name is re-exported here): the session, its ranking paths and
:class:`Recommendation` in this module; the catalogue (:func:`load_catalogue`, :func:`match_titles`,
:func:`is_cllm4rec_run`) in :mod:`recalign.lm.catalogue`; the explanation prompt and its generation
(:func:`explain_prompt`, :func:`explain_texts`, :func:`tidy_explanation`) in :mod:`recalign.lm.explain`.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from recalign.errors import RecalignInputError
from recalign.lm.catalogue import is_cllm4rec_run, load_catalogue, match_titles
from recalign.lm.explain import (
    EXPLAIN_PROMPT,
    EXPLAIN_TOKENS,
    explain_prompt,
    explain_texts,
    tidy_explanation,
)

METHODS = ("exact", "exhaustive", "two-stage")
RETRIEVERS = ("pop", "sasrec", "gru4rec")
#: answers per pass of exhaustive scoring (one KV-cached prompt pass per chunk)
EXHAUSTIVE_CHUNK = 256


@dataclass
class Recommendation:
    rank: int
    item_idx: int
    item_id: str
    title: str
    score: float
    explanation: str | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["explanation"] is None:
            d.pop("explanation")
        return d


@dataclass
class _CLLM:
    """A CLLM4Rec recommender plus what explanations need (its backbone name, loaded lazily)."""

    rec: object
    backbone: str
    explainer: tuple | None = None


@dataclass
class RecommendSession:
    """A loaded model and catalogue answering recommend / explain requests (see the module docstring).

    Build one with :meth:`load` (any ``--model`` argument: base model, adapter or run directory, or a
    CLLM4Rec run directory) or directly from a model, tokenizer and dataset. Not thread-safe: callers
    that serve concurrent requests serialise calls (``recalign serve`` does).
    """

    model: object
    tokenizer: object
    dataset: object
    seed: int = 0
    max_history: int = 10
    label: str = ""
    retriever: object | None = None
    retriever_name: str | None = None
    retrieve: int = 20
    cllm: _CLLM | None = None
    last_stats: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        from recalign.lm.prompts import display_titles

        self.titles = display_titles(self.dataset)
        self.item_ids = [str(i) for i in self.dataset.items["item_id"].tolist()]
        self._answers: list[list[int]] | None = None
        self._trie = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def load(
        cls,
        model: str | Path,
        *,
        dataset: str | None = None,
        path: str | None = None,
        options: dict | None = None,
        dtype: str = "float32",
        retriever: str | None = None,
        retrieve: int = 20,
        progress: bool = False,
        catalogue=None,
    ) -> RecommendSession:
        """Load ``model`` and its catalogue (``catalogue``, a loaded dataset, or :func:`load_catalogue`'s
        choice). ``retriever`` trains that baseline for ``method="two-stage"``."""
        run = Path(model)
        if is_cllm4rec_run(run):
            return cls._load_cllm4rec(run, catalogue, dataset, path, options, retriever, retrieve, progress)
        from recalign.lm.lora import ADAPTER_META, load_lm, resolve_model

        src = resolve_model(model)
        meta = {}
        if src.adapter is not None and (src.adapter / ADAPTER_META).is_file():
            meta = json.loads((src.adapter / ADAPTER_META).read_text(encoding="utf-8"))
        ds = catalogue if catalogue is not None else load_catalogue(model, dataset, path, options)
        lm, tok, _ = load_lm(model, dtype=dtype)
        session = cls(
            lm, tok, ds, seed=int(meta.get("seed", 0)), max_history=int(meta.get("max_history", 10)),
            label=str(model), retrieve=retrieve,
        )  # fmt: skip
        if retriever:
            session.fit_retriever(retriever, progress=progress)
        return session

    @classmethod
    def _load_cllm4rec(cls, run, catalogue, dataset, path, options, retriever, retrieve, progress):
        from recalign.config import load_config
        from recalign.methods.cllm4rec.config import CLLM4RecConfig
        from recalign.methods.cllm4rec.pipeline import load_recommender

        cfg = load_config(CLLM4RecConfig, run / "config.yaml")
        ds = catalogue if catalogue is not None else load_catalogue(run, dataset, path, options)
        rec = load_recommender(cfg, run, ds)
        session = cls(
            rec.model, rec.tokenizer, ds, seed=cfg.seed, max_history=cfg.finetune.max_items,
            label=str(run), retrieve=retrieve, cllm=_CLLM(rec, cfg.model.backbone),
        )  # fmt: skip
        if retriever:
            session.fit_retriever(retriever, progress=progress)
        return session

    def fit_retriever(self, name: str, *, progress: bool = False) -> None:
        """Train baseline ``name`` on the catalogue's interactions (the ``loo`` split's training part)
        for ``method="two-stage"``."""
        if name not in RETRIEVERS:
            raise RecalignInputError(
                f"unknown retriever {name!r} (choose from {', '.join(RETRIEVERS)}; bprmf needs known users)",
                field="retriever",
            )
        from recalign.baselines import make_baseline
        from recalign.data.splits import build_split

        split = build_split(self.dataset, "loo", stages_with_candidates=())
        model = make_baseline(name, progress=progress)
        model.fit(self.dataset, split)
        self.retriever, self.retriever_name = model, name

    # ------------------------------------------------------------------ catalogue
    @property
    def kind(self) -> str:
        return "cllm4rec" if self.cllm is not None else "lm"

    @property
    def n_items(self) -> int:
        return len(self.titles)

    def _encoders(self):
        from recalign.lm.seq2seq import text_encoders

        return text_encoders(self.model, self.tokenizer)

    @property
    def answers(self) -> list[list[int]]:
        """Answer token ids of every title (computed once)."""
        if self._answers is None:
            enc = self._encoders()[1]
            self._answers = [enc(t) for t in self.titles]
        return self._answers

    @property
    def trie(self):
        if self._trie is None:
            from recalign.methods.knowledge.grounding import TitleTrie

            self._trie = TitleTrie(self.answers)
        return self._trie

    def item(self, title: str, what: str = "item") -> int:
        return match_titles(self.dataset, [title], what)[0]

    # ------------------------------------------------------------------ recommending
    def recommend(
        self,
        history: list[str],
        *,
        k: int = 10,
        candidates: list[str] | None = None,
        sample: int | None = None,
        method: str = "exact",
        user: str | None = None,
        explain: bool = False,
        progress: bool = False,
    ) -> list[Recommendation]:
        """Top-``k`` items for a typed ``history`` (titles, oldest first), best first."""
        t0 = time.perf_counter()
        if method not in METHODS:
            raise RecalignInputError(f"must be one of {', '.join(METHODS)}, got {method!r}", field="method")
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= self.n_items:
            raise RecalignInputError(f"must be between 1 and {self.n_items}, got {k!r}", field="k")
        if not history:
            raise RecalignInputError("needs at least one title", field="history")
        hist = match_titles(self.dataset, list(history), "history")
        seen = set(hist)
        pool: list[int] | None = None
        if candidates:
            pool = list(dict.fromkeys(match_titles(self.dataset, list(candidates), "candidate")))
        elif sample is not None:
            if sample < 1:
                raise RecalignInputError(f"must be >= 1, got {sample}", field="sample")
            unseen = np.array([i for i in range(self.n_items) if i not in seen], dtype=np.int64)
            rng = np.random.default_rng([self.seed, len(hist)])
            pool = rng.choice(unseen, size=min(sample, len(unseen)), replace=False).tolist()
        if len(seen) >= self.n_items and pool is None:
            raise RecalignInputError("nothing to rank: every catalogue item is in the history")
        stats: dict = {"method": "candidates" if pool is not None else method}
        if self.cllm is not None:
            items, scores = self._cllm_rank(hist, pool, k, user)
            stats["method"] = "candidates" if pool is not None else "one-pass"
        elif pool is not None:
            items, scores = self._rank_listed(hist, pool, k)
        elif method == "two-stage":
            items, scores = self._two_stage(hist, k, stats)
        elif method == "exhaustive" or not self._exact_supported():
            stats["method"] = "exhaustive"
            items, scores = self._exhaustive(hist, k, progress)
        else:
            items, scores = self._exact(hist, k, stats)
        recs = [
            Recommendation(r + 1, int(j), self.item_ids[j], self.titles[j], float(s))
            for r, (j, s) in enumerate(zip(items, scores))
        ]
        if explain and recs:
            texts = self._explain_items(hist, [r.item_idx for r in recs])
            for r, text in zip(recs, texts):
                r.explanation = text
        stats["seconds"] = round(time.perf_counter() - t0, 3)
        self.last_stats = stats
        return recs

    def _exact_supported(self) -> bool:
        from recalign.lm.modules import unwrap_peft
        from recalign.lm.seq2seq import is_seq2seq

        attn = getattr(getattr(unwrap_peft(self.model), "config", None), "_attn_implementation", None)
        return not is_seq2seq(self.model) and attn in (None, "eager", "sdpa")

    def _item_tokens(self) -> bool:
        """Whether the model reads soft item tokens (LLaRA-style hybrid prompts) after listed titles."""
        from recalign.lm.hybrid import uses_item_tokens

        return uses_item_tokens(self.model, self.dataset)

    def _open_prompt_ids(self, hist: list[int]) -> list[int]:
        from recalign.lm.prompts import build_open_prompt

        prompt = build_open_prompt(
            self.dataset, hist, seed=self.seed, user=0, position=len(hist), max_history=self.max_history,
            item_tokens=self._item_tokens(),
        )  # fmt: skip
        return self._encoders()[0](prompt)

    def _exact(self, hist, k, stats) -> tuple[list[int], list[float]]:
        import torch

        from recalign.lm.topk import exact_top_k

        with torch.inference_mode():
            res = exact_top_k(self.model, self._open_prompt_ids(hist), self.trie, k, exclude=set(hist))
        stats.update(nodes=res.nodes, passes=res.passes, rescored=res.candidates)
        return res.items, res.scores

    def _exhaustive(self, hist, k, progress) -> tuple[list[int], list[float]]:
        scores = self.score_catalogue(hist, progress=progress)
        scores[list(set(hist))] = -np.inf
        order = np.argsort(-scores, kind="stable")[: min(k, self.n_items - len(set(hist)))]
        return [int(j) for j in order], [float(scores[j]) for j in order]

    def score_catalogue(self, hist: list[int], *, progress: bool = False) -> np.ndarray:
        """Every title's score under the open prompt (the exhaustive path), history included."""
        import torch
        from tqdm.auto import tqdm

        from recalign.lm.scoring import answer_logprobs

        p_ids = self._open_prompt_ids(hist)
        answers = self.answers
        out = np.empty(len(answers))
        starts = range(0, len(answers), EXHAUSTIVE_CHUNK)
        was_training = getattr(self.model, "training", False)
        self.model.eval()
        try:
            with torch.inference_mode():
                for s in tqdm(starts, desc="scoring catalogue", disable=not progress, unit="chunk"):
                    chunk = answers[s : s + EXHAUSTIVE_CHUNK]
                    res = answer_logprobs(
                        self.model, [p_ids], [chunk], impl="kv", chunk_size=EXHAUSTIVE_CHUNK
                    )
                    out[s : s + len(chunk)] = res.sum[0].float().cpu().numpy()
        finally:
            if was_training:
                self.model.train()
        return out

    def _rank_listed(self, hist, pool, k) -> tuple[list[int], list[float]]:
        import torch

        from recalign.lm.prompts import build_candidate_prompt
        from recalign.lm.scoring import answer_logprobs

        prompt = build_candidate_prompt(
            self.dataset, hist, pool, seed=self.seed, user=0, position=len(hist), max_history=self.max_history,
            item_tokens=self._item_tokens(),
        )  # fmt: skip
        p_ids = self._encoders()[0](prompt)
        self.model.eval()
        with torch.inference_mode():
            res = answer_logprobs(self.model, [p_ids], [[self.answers[j] for j in pool]])
        scores = res.sum[0].float().cpu().numpy().astype(np.float64)
        order = np.argsort(-scores, kind="stable")[: min(k, len(pool))]
        return [int(pool[j]) for j in order], [float(scores[j]) for j in order]

    def _retrieve(self, hist: list[int], n: int) -> list[int]:
        import pandas as pd

        frame = pd.DataFrame({"user": [0], "history": [np.asarray(hist, dtype=np.int64)]})
        s = np.asarray(self.retriever.score_all(frame)[0], dtype=np.float64)
        s[list(set(hist))] = -np.inf
        order = np.argsort(-s, kind="stable")[: min(n, self.n_items - len(set(hist)))]
        return [int(j) for j in order]

    def _two_stage(self, hist, k, stats) -> tuple[list[int], list[float]]:
        if self.retriever is None:
            raise RecalignInputError(
                "needs a retriever: start with --retriever pop|sasrec|gru4rec", field="method"
            )
        if k > self.retrieve:
            raise RecalignInputError(
                f"two-stage returns at most the {self.retrieve} retrieved items, asked for {k}", field="k"
            )
        pool = self._retrieve(hist, self.retrieve)
        stats.update(retriever=self.retriever_name, retrieved=len(pool))
        return self._rank_listed(hist, pool, k)

    # ------------------------------------------------------------------ CLLM4Rec
    def _cllm_rank(self, hist, pool, k, user) -> tuple[list[int], list[float]]:
        logp = self.cllm_log_probs(hist, user)
        if pool is not None:
            order = sorted(pool, key=lambda j: (-logp[j], j))[:k]
        else:
            logp = logp.copy()
            logp[list(set(hist))] = -np.inf
            order = [
                int(j) for j in np.argsort(-logp, kind="stable")[: min(k, self.n_items - len(set(hist)))]
            ]
        return order, [float(logp[j]) for j in order]

    def cllm_log_probs(self, hist: list[int], user: str | None = None) -> np.ndarray:
        """CLLM4Rec item-head log-probabilities of every item, one forward pass."""
        import torch
        import torch.nn.functional as F

        from recalign.methods.cllm4rec.documents import rec_prompt
        from recalign.methods.cllm4rec.recommender import recent_unique

        rec = self.cllm.rec
        if user is not None:
            ids = [str(u) for u in self.dataset.user_ids]
            if str(user) not in ids:
                raise RecalignInputError(
                    f"unknown user {user!r} (not in the {self.dataset.name} users)", field="user"
                )
            u = ids.index(str(user))
            return (
                rec.log_probs(np.array([u]), [np.asarray(hist, dtype=np.int64)])[0].numpy().astype(np.float64)
            )
        model, tok = rec.model, rec.tokenizer
        model.eval()
        ids = rec_prompt(tok, 0, recent_unique(np.asarray(hist, dtype=np.int64), self.max_history))
        x = torch.tensor([ids], dtype=torch.long)
        with torch.no_grad():
            emb = model.embed(x, "collab")
            is_user = (x >= model.vocab_size) & (x < model.vocab_size + model.n_users)
            emb[is_user] = model.collab_user.weight.mean(0).to(emb.dtype)  # a user the model never saw
            h = model.transformer(inputs_embeds=emb, attention_mask=torch.ones_like(x), use_cache=False)
            logp = F.log_softmax(model.item_logits(h.last_hidden_state[:, -1]).float(), dim=-1)
        return logp[0].numpy().astype(np.float64)

    # ------------------------------------------------------------------ explaining
    def explain(self, history: list[str], item: str) -> str:
        """A short rationale for why ``item`` (a title) fits ``history`` (titles, oldest first)."""
        if not history:
            raise RecalignInputError("needs at least one title", field="history")
        hist = match_titles(self.dataset, list(history), "history")
        j = self.item(item, "item")
        return self._explain_items(hist, [j])[0]

    def explain_prompt(self, hist: list[int], item: int) -> str:
        """The explanation request for catalogue item ``item`` after ``hist`` (:func:`explain_prompt`)."""
        return explain_prompt(self.dataset, self.titles, hist, item, self.max_history)

    def _explain_items(self, hist: list[int], items: list[int]) -> list[str]:
        model, tok = self.model, self.tokenizer
        if self.cllm is not None:  # the ID model's backbone may be cut down: explain with the full LM
            if self.cllm.explainer is None:
                from recalign.lm.loading import load_model

                self.cllm.explainer = load_model(self.cllm.backbone)
            model, tok = self.cllm.explainer
        return explain_texts(model, tok, [self.explain_prompt(hist, j) for j in items])


__all__ = [
    "EXHAUSTIVE_CHUNK",
    "EXPLAIN_PROMPT",
    "EXPLAIN_TOKENS",
    "METHODS",
    "RETRIEVERS",
    "Recommendation",
    "RecommendSession",
    "explain_prompt",
    "explain_texts",
    "is_cllm4rec_run",
    "load_catalogue",
    "match_titles",
    "tidy_explanation",
]
