"""A language model as a :class:`~recalign.recommender.Recommender`: candidates scored by answer log-prob.

For every example the candidate prompt (:func:`recalign.lm.prompts.examples_to_prompts`, phrasing chosen
by ``(seed, user, position)`` exactly as in training) is tokenised once, and each candidate's title is
scored as the answer: ``score = log p(title + end-of-turn | prompt)``, summed over the answer's tokens
(default; ``length_normalize=True`` divides by the token count). All candidates of an example share one
prompt pass (:func:`recalign.lm.scoring.answer_logprobs`), and several examples go through the model
together (``batch_size``). Scoring by log-prob rather than by generation gives every candidate a score,
so the same ranking metrics as for classical baselines apply; the generation protocol
(:mod:`recalign.lm.generation`) is the complement.

``score_all`` scores every catalogue title against a prompt *without* a candidate list (task
``next_item_open``; a list would leak the target). That is one shared-prefix pass per example with
``n_items`` answers, in chunks of ``all_chunk_size`` answers -- about ``n_items x title length`` tokens
per example (~17k for ML-100K, several seconds per example for SmolLM2 on a CPU). Fine for tiny models
and small catalogues; for anything larger use candidate ranking.

:meth:`LMRecommender.score_and_generate` serves both evaluation protocols from one pass over each prompt
(:mod:`recalign.lm.joint`): the candidate scores of :meth:`score_candidates` and the greedy answers of
:func:`recalign.lm.generation.generate_answers`, for the same prompts, in the same batches.

``fit`` is a no-op: LM training lives in the training recipes (SFT, S-DPO, DMPO, ...), which produce the
model this class wraps.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from recalign.data.dataset import RecDataset
from recalign.data.splits import Split
from recalign.lm.modules import is_seq2seq
from recalign.lm.prompts import (
    PromptExample,
    PromptTemplate,
    build_open_prompt,
    display_titles,
    encode_answer,
    encode_prompt,
    examples_to_prompts,
    stop_token_ids,
)
from recalign.lm.scoring import answer_logprobs


@dataclass
class JointResult:
    """Candidate scores and greedy answers from :meth:`LMRecommender.score_and_generate`.

    ``scores``: ``[n, C]`` as :meth:`LMRecommender.score_candidates` returns them. ``answers``: as
    :func:`~recalign.lm.generation.generate_answers` returns them. ``seconds``: ``prepare`` (prompts and
    tokenisation), ``shared_forward`` (the one packed pass per batch), ``scoring`` (LM head over answer
    tokens), ``decoding`` (greedy loop from the cache) and ``total``.
    """

    scores: np.ndarray
    answers: list[str]
    prompts: list[PromptExample] = field(repr=False)
    seconds: dict[str, float]


class LMRecommender:
    """Rank candidates by the log-probability a causal (or encoder-decoder) LM gives their titles.

    Args:
        model: the LM (``*ForCausalLM``, peft-wrapped or not; encoder-decoder models use
            :mod:`recalign.lm.seq2seq` scoring and tokenisation).
        tokenizer: its tokenizer (prompts and answers go through ``encode_prompt`` / ``encode_answer``).
        dataset: supplies the item titles of prompts and answers.
        seed: chooses the prompt phrasing per example (use the seed the model was trained with).
        name: method name in result records (``zeroshot``, ``sft``, ``sdpo-k3``, ...).
        length_normalize: score by mean instead of summed token log-prob.
        batch_size: examples per forward pass.
        impl: shared-prefix implementation (``"packed"`` or ``"kv"``).
        all_chunk_size: answers per pass in :meth:`score_all`.
        template: force one phrasing (index, name or template) instead of the seeded choice.
        item_fields: catalogue fields listed with each item in prompts (e.g. ``("genres",)``); must match
            what the model was trained with.
        progress: show a progress bar.
    """

    def __init__(
        self,
        model,
        tokenizer,
        dataset: RecDataset,
        *,
        seed: int = 0,
        name: str = "zeroshot",
        max_history: int = 10,
        length_normalize: bool = False,
        batch_size: int = 8,
        impl: str = "packed",
        all_chunk_size: int = 64,
        template: PromptTemplate | int | str | None = None,
        item_fields: tuple[str, ...] = (),
        progress: bool = True,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.dataset = dataset
        self.seed = seed
        self.name = name
        self.max_history = max_history
        self.length_normalize = length_normalize
        self.batch_size = max(1, int(batch_size))
        self.impl = impl
        self.all_chunk_size = all_chunk_size
        self.template = template
        self.item_fields = tuple(item_fields)
        self.progress = progress
        self._title_ids: list[list[int]] | None = None

    # ------------------------------------------------------------------ Recommender protocol
    def fit(self, dataset: RecDataset, split: Split) -> LMRecommender:
        """No training here (see the training recipes); only adopts ``dataset`` for titles."""
        if dataset is not self.dataset:
            self.dataset = dataset
            self._title_ids = None
        return self

    def score_candidates(self, examples: pd.DataFrame) -> np.ndarray:
        """``[n, C]`` log-prob of each candidate title (sum, or mean if ``length_normalize``)."""
        prompts = examples_to_prompts(
            self.dataset,
            examples,
            seed=self.seed,
            max_history=self.max_history,
            template=self.template,
            item_fields=self.item_fields,
            item_tokens=self._item_tokens(),
        )
        cands = [np.asarray(c, dtype=np.int64) for c in examples["candidates"]]
        n_c = max((len(c) for c in cands), default=0)
        out = np.full((len(prompts), n_c), -np.inf)
        titles = self.title_ids()
        encode = self._encoders()[0]
        batches = range(0, len(prompts), self.batch_size)
        for start in tqdm(batches, desc=f"{self.name}: scoring", disable=not self._show(len(batches))):
            chunk = prompts[start : start + self.batch_size]
            p_ids = [encode(self.tokenizer, ex.prompt) for ex in chunk]
            a_ids = [[titles[int(i)] for i in c] for c in cands[start : start + self.batch_size]]
            scores = self._score(p_ids, a_ids, chunk_size=None)
            out[start : start + len(chunk), : scores.shape[1]] = scores
        return out

    def score_and_generate(self, examples: pd.DataFrame, *, max_new_tokens: int = 32) -> JointResult:
        """Candidate scores *and* greedy answers with each prompt run through the model once.

        Same prompts, batches and numbers as :meth:`score_candidates` plus
        :func:`~recalign.lm.generation.generate_answers` (``batch_size`` prompts per pass), for
        decoder-only models that :func:`recalign.lm.joint.joint_unsupported` accepts (raises otherwise).
        """
        from recalign.lm.generation import decode_answer, pad_id
        from recalign.lm.joint import joint_unsupported, score_and_generate

        reason = joint_unsupported(self.model, max_new_tokens=max_new_tokens)
        if reason:
            raise ValueError(f"joint scoring + generation not available: {reason}")
        t0 = time.perf_counter()
        prompts = examples_to_prompts(
            self.dataset,
            examples,
            seed=self.seed,
            max_history=self.max_history,
            template=self.template,
            item_fields=self.item_fields,
            item_tokens=self._item_tokens(),
        )
        cands = [np.asarray(c, dtype=np.int64) for c in examples["candidates"]]
        n_c = max((len(c) for c in cands), default=0)
        out = np.full((len(prompts), n_c), -np.inf)
        titles = self.title_ids()
        stops = stop_token_ids(self.tokenizer)
        pad = pad_id(self.tokenizer)
        seconds = {
            "prepare": time.perf_counter() - t0,
            "shared_forward": 0.0,
            "scoring": 0.0,
            "decoding": 0.0,
        }
        answers: list[str] = []
        batches = range(0, len(prompts), self.batch_size)
        was_training = self.model.training
        self.model.eval()
        try:
            for start in tqdm(
                batches, desc=f"{self.name}: scoring + generating", disable=not self._show(len(batches))
            ):
                t1 = time.perf_counter()
                chunk = prompts[start : start + self.batch_size]
                p_ids = [encode_prompt(self.tokenizer, ex.prompt) for ex in chunk]
                a_ids = [[titles[int(i)] for i in c] for c in cands[start : start + self.batch_size]]
                seconds["prepare"] += time.perf_counter() - t1
                with torch.inference_mode():
                    res = score_and_generate(
                        self.model, p_ids, a_ids, stop_ids=stops, max_new_tokens=max_new_tokens, pad_id=pad
                    )
                    s = res.scores.select(self.length_normalize).float().cpu().numpy().astype(np.float64)
                out[start : start + len(chunk), : s.shape[1]] = s
                t2 = time.perf_counter()
                answers.extend(decode_answer(self.tokenizer, g, stops) for g in res.generated)
                seconds["shared_forward"] += res.forward_seconds
                seconds["scoring"] += res.scoring_seconds
                seconds["decoding"] += res.decode_seconds + (time.perf_counter() - t2)
        finally:
            if was_training:
                self.model.train()
        seconds["total"] = time.perf_counter() - t0
        return JointResult(scores=out, answers=answers, prompts=prompts, seconds=seconds)

    def score_all(self, examples: pd.DataFrame) -> np.ndarray:
        """``[n, n_items]`` log-prob of every catalogue title given a candidate-free prompt (expensive)."""
        titles = self.title_ids()
        encode = self._encoders()[0]
        out = np.empty((len(examples), len(titles)))
        item_tokens = self._item_tokens()
        rows = list(zip(examples["user"], examples["position"], examples["history"]))
        for i, (user, position, history) in enumerate(
            tqdm(rows, desc=f"{self.name}: scoring catalogue", disable=not self._show(len(rows)))
        ):
            prompt = build_open_prompt(
                self.dataset,
                history,
                seed=self.seed,
                user=int(user),
                position=int(position),
                max_history=self.max_history,
                item_fields=self.item_fields,
                item_tokens=item_tokens,
            )
            out[i] = self._score([encode(self.tokenizer, prompt)], [titles], chunk_size=self.all_chunk_size)[
                0
            ]
        return out

    # ------------------------------------------------------------------ helpers
    def title_ids(self) -> list[list[int]]:
        """Answer token ids of every item's display title (computed once)."""
        if self._title_ids is None:
            enc = self._encoders()[1]
            self._title_ids = [enc(self.tokenizer, t) for t in display_titles(self.dataset)]
        return self._title_ids

    def _item_tokens(self) -> bool:
        """Hybrid prompts (a soft item token after each title) when the model carries a projector."""
        from recalign.lm.hybrid import uses_item_tokens

        return uses_item_tokens(self.model, self.dataset)

    def _encoders(self):
        if is_seq2seq(self.model):
            from recalign.lm.seq2seq import encode_source, encode_target

            return encode_source, encode_target
        return encode_prompt, encode_answer

    def _score(self, prompts: list[list[int]], answers: list[list[list[int]]], chunk_size) -> np.ndarray:
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                if is_seq2seq(self.model):
                    from recalign.lm.seq2seq import seq2seq_answer_logprobs

                    s = seq2seq_answer_logprobs(self.model, prompts, answers, chunk_size=chunk_size)
                else:
                    s = answer_logprobs(self.model, prompts, answers, impl=self.impl, chunk_size=chunk_size)
                return s.select(self.length_normalize).float().cpu().numpy().astype(np.float64)
        finally:
            if was_training:
                self.model.train()

    def _show(self, n_batches: int) -> bool:
        return self.progress and n_batches > 1
