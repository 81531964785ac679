"""DPO of the summary-writing LM on (best, worst) summary pairs.

This is the preference-alignment path every recalign method shares, specialised to one chosen and one
rejected answer per prompt:

- prompts and answers become token ids through the one rule of :mod:`recalign.lm.prompts`
  (``encode_prompt`` / ``encode_answer``; for a chat model the summary is the assistant turn and ends
  with its end-of-turn token);
- the policy's log-probs of both summaries come from shared-prefix scoring
  (:func:`recalign.lm.scoring.answer_logprobs`: the prompt runs once for the two answers, the LM head
  only at answer positions, differentiable);
- the reference is the base model: the LoRA adapter switched off for a no-grad pass on every step
  (``reference="adapter-disabled"``), or the same numbers precomputed once and cached as safetensors
  (``reference="cache"``); never a second copy of the model;
- the loss is :func:`recalign.objectives.preference.dpo_loss`, trained by the shared transformers
  ``Trainer`` layer (checkpoints, exact resume, logged reward margins / accuracies).

Iterating: iteration ``t + 1`` continues training iteration ``t``'s adapter on fresh pairs sampled from
the policy, and the reference stays the *base* model, so every iteration is anchored to the same
starting point (the DPO KL term never drifts with the policy).

A summary cut at ``max_new_tokens`` has no end-of-turn token of its own; ``encode_answer`` appends one,
as it does for every answer. Both summaries of a pair are treated the same way, so the comparison stays
fair, and the policy learns to finish summaries rather than to ramble.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch

from recalign.lm.prompts import encode_answer, encode_prompt
from recalign.lm.reference import adapter_disabled, precompute_reference_logprobs, reference_answer_logprobs
from recalign.lm.scoring import answer_logprobs
from recalign.methods.dpo4rec.config import DPOStageConfig
from recalign.methods.dpo4rec.pairs import SummaryPair
from recalign.objectives.preference import dpo_loss


class SummaryDPOObjective:
    """Trainer objective: DPO loss of a batch of ``{"prompt", "answers": [chosen, rejected]}`` examples.

    If the batch carries ``ref_logps`` (``[B, 2]``, from the cache) those are the reference log-probs;
    otherwise the reference is the model with its adapter disabled.
    """

    def __init__(self, beta: float = 0.1, impl: str = "packed") -> None:
        self.beta = beta
        self.impl = impl

    def __call__(self, model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        prompts, answers = batch["prompt"], batch["answers"]
        policy = answer_logprobs(model, prompts, answers, impl=self.impl).sum
        if "ref_logps" in batch:
            reference = torch.as_tensor(batch["ref_logps"]).to(policy)
        else:
            reference = reference_answer_logprobs(model, prompts, answers, impl=self.impl).sum.to(policy)
        out = dpo_loss(policy, reference, beta=self.beta)
        logs = {k: v for k, v in out.metrics().items() if k != "loss"}
        logs["logps/chosen"] = float(policy[:, 0].detach().mean())
        logs["logps/rejected"] = float(policy[:, 1].detach().mean())
        return out.loss, logs


class _PairData:
    """The two-answer view of the pairs that the reference cache expects (``prompts``, ``answers(i)``)."""

    def __init__(self, pairs: Sequence[SummaryPair]) -> None:
        self.pairs = list(pairs)
        self.prompts = [p.prompt for p in self.pairs]

    def __len__(self) -> int:
        return len(self.pairs)

    def answers(self, i: int) -> list[str]:
        return [self.pairs[i].chosen, self.pairs[i].rejected]


def pair_examples(tokenizer, pairs: Sequence[SummaryPair]) -> list[dict]:
    """Tokenised training examples (chosen first), with the one tokenisation rule."""
    return [
        {
            "prompt": encode_prompt(tokenizer, p.prompt),
            "answers": [encode_answer(tokenizer, p.chosen), encode_answer(tokenizer, p.rejected)],
        }
        for p in pairs
    ]


def dpo_on_pairs(
    model,
    tokenizer,
    pairs: Sequence[SummaryPair],
    cfg: DPOStageConfig,
    checkpoint_dir: str | Path,
    *,
    reference_cache_dir: str | Path | None = None,
    resume: bool = True,
    progress: bool = True,
):
    """Train ``model`` (a peft model with a trainable LoRA adapter) on ``pairs``; returns the outcome.

    ``resume`` continues from the last checkpoint in ``checkpoint_dir`` when there is one (the recipe
    only reruns a DPO stage whose inputs are unchanged, so continuing is always right there).

    Under ``accelerate launch`` every process calls it with the same pairs; the Trainer gives each its
    slice of every global batch (``cfg.training.batch_size`` per process).
    """
    from recalign.training import distributed, train

    examples = pair_examples(tokenizer, pairs)
    if cfg.reference == "cache":
        # several processes: the main one computes and writes the cache, the others then read it
        with adapter_disabled(model), distributed.main_first():
            ref = precompute_reference_logprobs(
                model, tokenizer, _PairData(pairs), reference_cache_dir, impl=cfg.impl, progress=progress
            )
        for i, ex in enumerate(examples):
            ex["ref_logps"] = ref.logprobs[i].clone()
    training = dataclasses.replace(cfg.training, resume=resume, progress=progress)
    objective = SummaryDPOObjective(beta=cfg.beta, impl=cfg.impl)
    return train(model, examples, objective, training, checkpoint_dir)


def save_adapter_atomically(model, directory: str | Path, base_model: str, extra: dict | None = None) -> Path:
    """Write the adapter to a temporary sibling directory and rename it into place.

    The recipe treats an existing adapter directory as a finished stage, so it must never see a
    half-written one.
    """
    from recalign.lm.lora import save_adapter

    directory = Path(directory)
    tmp = directory.with_name(f".{directory.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    save_adapter(model, tmp, base_model=base_model, extra=extra)
    if directory.exists():
        shutil.rmtree(directory)
    tmp.rename(directory)
    return directory
