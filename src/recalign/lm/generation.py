"""Greedy generation of answers for prompt examples, and the generation evaluation protocol.

:func:`generate_answers` tokenises prompts with the one rule of :mod:`recalign.lm.prompts`
(``encode_prompt``: the same ids SFT and preference training used), left-pads them into batches (so that
every prompt ends where generation starts; position ids follow the attention mask), decodes greedily for
at most ``max_new_tokens`` and stops at the end-of-turn token or EOS. The returned text is the decoded
new tokens without special tokens, stripped.

:func:`evaluate_generation` runs it over a split's examples and scores the answers with
:mod:`recalign.evaluation.generation` (exactly-one-candidate matching; HR@1 over all examples and over
valid ones, and ValidRatio).

When candidate scoring runs on the same prompts too, :mod:`recalign.lm.joint` produces the same answers
from the scoring pass's KV cache instead of a second prefill (``evaluate_lm`` does this by default);
:func:`decode_answer` and :func:`generation_result` are shared by both paths.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import pandas as pd
import torch
from tqdm.auto import tqdm

from recalign.data.dataset import RecDataset
from recalign.evaluation.generation import generation_metrics, match_answer
from recalign.lm.hybrid import decoder_inputs, uses_item_tokens
from recalign.lm.modules import is_seq2seq, unwrap_peft
from recalign.lm.prompts import PromptExample, encode_prompt, examples_to_prompts, stop_token_ids


def pad_id(tokenizer) -> int:
    """The id that pads a batch: the tokenizer's pad token, else its EOS token, else 0."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if tid is not None:
            return int(tid)
    return 0  # pragma: no cover


def decode_answer(tokenizer, ids: Sequence[int], stops: Sequence[int]) -> str:
    """The answer text of generated ``ids``: up to (excluding) the first stop id, special tokens dropped,
    stripped. Shared with the joint scoring + generation path (:mod:`recalign.lm.joint`)."""
    ids = list(ids)
    cut = next((k for k, t in enumerate(ids) if t in stops), len(ids))
    return tokenizer.decode(ids[:cut], skip_special_tokens=True).strip()


def generate_answers(
    model,
    tokenizer,
    prompts: Sequence[str | PromptExample],
    *,
    batch_size: int = 8,
    max_new_tokens: int = 32,
    progress: bool = True,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int | None = None,
) -> list[str]:
    """Answers to ``prompts`` (texts or :class:`PromptExample`), one string per prompt.

    Greedy by default. ``do_sample=True`` samples with ``temperature`` and nucleus ``top_p`` instead
    (DPO4Rec draws several different summaries per user this way); ``seed`` then seeds torch's CPU
    generator for the call (inside ``fork_rng``, so the caller's random state is left untouched), which
    makes a sampled batch reproducible.
    """
    texts = [p.prompt if isinstance(p, PromptExample) else str(p) for p in prompts]
    seq2seq = is_seq2seq(model)
    if seq2seq:
        from recalign.lm.seq2seq import encode_source

        encoded = [encode_source(tokenizer, t) for t in texts]
        stops = [int(tokenizer.eos_token_id)]
    else:
        encoded = [encode_prompt(tokenizer, t) for t in texts]
        stops = stop_token_ids(tokenizer)
    pad = pad_id(tokenizer)
    device = next(unwrap_peft(model).parameters()).device
    was_training = model.training
    model.eval()
    out: list[str] = []
    batches = range(0, len(encoded), max(1, batch_size))
    try:
        for start in tqdm(batches, desc="generating", disable=not (progress and len(batches) > 1)):
            chunk = encoded[start : start + batch_size]
            width = max(len(ids) for ids in chunk)
            input_ids = torch.full((len(chunk), width), pad, dtype=torch.long, device=device)
            attention = torch.zeros((len(chunk), width), dtype=torch.long, device=device)
            for r, ids in enumerate(chunk):
                # left padding for decoder-only models (generation continues at the right edge);
                # encoder inputs are padded on the right as usual
                sl = slice(width - len(ids), width) if not seq2seq else slice(0, len(ids))
                input_ids[r, sl] = torch.tensor(ids, device=device)
                attention[r, sl] = 1
            sampling = (
                {"do_sample": True, "temperature": float(temperature), "top_p": float(top_p), "top_k": 0}
                if do_sample
                else {"do_sample": False}
            )
            with torch.inference_mode(), torch.random.fork_rng(devices=[], enabled=seed is not None):
                if seed is not None:
                    torch.manual_seed(int(seed) + start)
                # hybrid prompts (soft item tokens) go in as embeddings; generate then returns
                # only the new tokens
                inputs = {"input_ids": input_ids} if seq2seq else decoder_inputs(model, input_ids)
                generated = model.generate(
                    **inputs,
                    attention_mask=attention,
                    num_beams=1,
                    max_new_tokens=max_new_tokens,
                    eos_token_id=stops,
                    pad_token_id=pad,
                    **sampling,
                )
            new = generated if seq2seq or "input_ids" not in inputs else generated[:, width:]
            out.extend(decode_answer(tokenizer, row, stops) for row in new.tolist())
    finally:
        if was_training:
            model.train()
    return out


@dataclass
class GenerationResult:
    """Answers, their matches and the metrics of one generation evaluation."""

    metrics: dict[str, float]
    answers: list[str]
    matches: list[int | None]
    target_cols: list[int]
    seconds: float
    examples: list[PromptExample] = field(repr=False, default_factory=list)


def evaluate_generation(
    model,
    tokenizer,
    dataset: RecDataset,
    examples: pd.DataFrame,
    *,
    seed: int = 0,
    max_history: int = 10,
    batch_size: int = 8,
    max_new_tokens: int = 32,
    progress: bool = True,
) -> GenerationResult:
    """Generate an answer per example, match it to the candidates, and compute generation metrics
    (:func:`generation_result`)."""
    t0 = time.perf_counter()
    prompt_examples = examples_to_prompts(
        dataset, examples, seed=seed, max_history=max_history, item_tokens=uses_item_tokens(model, dataset)
    )
    answers = generate_answers(
        model,
        tokenizer,
        prompt_examples,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        progress=progress,
    )
    return generation_result(answers, prompt_examples, t0)


def generation_result(
    answers: list[str], prompt_examples: list[PromptExample], t0: float
) -> GenerationResult:
    """Match ``answers`` to their examples' candidates and compute the generation metrics; ``seconds``
    runs from ``t0`` (a ``time.perf_counter()`` value) to now. The target column is the first candidate
    with the target's title (consistent with :func:`~recalign.evaluation.generation.match_answer` for
    duplicate titles)."""
    matches = [match_answer(a, ex.candidates) for a, ex in zip(answers, prompt_examples)]
    target_cols = [ex.candidates.index(ex.target) for ex in prompt_examples]
    metrics = generation_metrics(matches, target_cols)
    return GenerationResult(
        metrics=metrics,
        answers=answers,
        matches=matches,
        target_cols=target_cols,
        seconds=time.perf_counter() - t0,
        examples=prompt_examples,
    )
