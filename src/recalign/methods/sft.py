"""Supervised fine-tuning (SFT): teach the LM to answer the candidate prompt with the target's title.

Objective: the negative log-likelihood of the target title (plus the end-of-turn token) given the
candidate prompt, on answer tokens only, averaged over the answer tokens of the batch. It is computed
through :func:`recalign.lm.scoring.answer_logprobs` with one answer per prompt, so

- prompt and answer are tokenised by the one rule every stage uses (``encode_prompt`` /
  ``encode_answer``): the preference stage later starts from exactly the inputs SFT trained on;
- only answer positions go through the LM head. With SmolLM2's 49k-word vocabulary the head is the
  dominant CPU cost if applied to all ~450 prompt positions, and prompt positions carry no loss anyway.

Few-shot by default (as DMPO's and LLaRA's low-resource settings): ``n_train`` training examples are
sampled with the seed from the split's training stage; ``eval.n_test`` test examples, sampled the same
way, are evaluated after training.

Outputs in the run directory::

    config.yaml          resolved config (reproduces the run)
    adapter/             adapter_model.safetensors, adapter_config.json, recalign_adapter.json
    checkpoints/         checkpoint-N (adapter + optimizer/scheduler/RNG state), trainer_state.json
    metrics.json         {"metrics": {"candidates/HR@1": ...}, "run": {method, model, steps, ...}}
    records.json         {"records": [...]} in the quality-results shape

Resuming is explicit: ``--resume`` (``training.resume=true``) continues from the last checkpoint;
without it, a run directory that already holds checkpoints is refused (one-line error, exit 2).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
import pandas as pd
import torch

from recalign.config import Ge, cfg_field, check_constraints
from recalign.errors import RecalignInputError
from recalign.lm.lora import resolve_dtype
from recalign.methods import PreparedData, sample_examples
from recalign.methods.hybrid import HybridConfig
from recalign.methods.lm_recipe import LMRecipeConfig, LMRunResult, training_field, validate_lm_recipe
from recalign.methods.lm_runner import LMRecipe, RecipeRun, TrainingPlan, new_adapter, run_lm_recipe
from recalign.rundir import releasing
from recalign.training.config import TrainingConfig

FORMATS = ("candidates", "sequence")


def check_format(format: str, window: int, min_context: int) -> None:
    """SFT's training-data rule (also the quickstart's, whose fields have the same names): a known
    ``format`` and, for ``sequence``, ``1 <= min_context < window``."""
    if format not in FORMATS:
        raise RecalignInputError(f"must be {' or '.join(FORMATS)}, got {format!r}", field="format")
    if format == "sequence":
        if min_context < 1:
            raise RecalignInputError("must be >= 1", field="min_context")
        if window <= min_context:
            raise RecalignInputError(f"must be > min_context={min_context}, got {window}", field="window")


@dataclass
class SFTConfig(LMRecipeConfig):
    """``recalign sft``: few-shot LoRA SFT of a causal LM on next-item prompts, then evaluation.

    ``model``, ``data``, ``seed``, ``dtype``, ``threads``, ``lora`` and ``eval``: :class:`LMRecipeConfig`'s.
    """

    method: str = cfg_field("sft", "method name written into result records")
    format: str = cfg_field(
        "candidates",
        "training data: 'candidates' (one LLaRA candidate prompt per target, answer = the target's title) or "
        "'sequence' (one plain-list document per window of a user's training history, a next-item loss on "
        "every item after min_context: ~20 targets per forward; evaluated with the history-only prompt)",
    )
    window: int = cfg_field(24, "format=sequence: items per training document (window of a user's history)")
    min_context: int = cfg_field(
        4, "format=sequence: items at the start of a user's sequence / of each window that are context only"
    )
    n_train: int = cfg_field(
        256,
        "training examples sampled from the train stage (format=sequence: documents/windows) (<= 0: all)",
    )
    max_history: Annotated[int, Ge(1)] = cfg_field(10, "history items shown in the prompt (most recent)")
    scoring_impl: str = cfg_field("packed", "shared-prefix implementation for the loss: packed or kv")
    training: TrainingConfig = training_field(
        learning_rate=5e-4, max_steps=40, batch_size=8, warmup_steps=4, save_steps=10
    )
    hybrid: HybridConfig = cfg_field(
        help="LLaRA hybrid item tokens: 'Title [emb]' with a projected recommender embedding (candidates: in the "
        "prompt's history and candidates; sequence: after every item's line)",
        default_factory=HybridConfig,
    )

    def validate(self) -> None:
        check_constraints(self, nested=False)  # the nested configs: validate_lm_recipe below
        self.hybrid.validate()
        check_format(self.format, self.window, self.min_context)
        if self.hybrid.item_head and self.format != "sequence":
            raise RecalignInputError(
                f"needs format=sequence (the head predicts every document's next items), got {self.format!r}",
                field="hybrid.item_head",
            )
        if self.format == "sequence":
            from recalign.methods.zeroshot import check_sequence_protocols

            check_sequence_protocols(self.eval.protocols)
        if self.scoring_impl not in ("packed", "kv"):
            raise RecalignInputError(f"must be packed or kv, got {self.scoring_impl!r}", field="scoring_impl")
        validate_lm_recipe(self, "SFT trains an adapter; use `recalign evaluate` for zero-shot")


class SFTObjective:
    """Mean answer-token NLL of each prompt's answer(s) -- usually one: the target title.

    ``batch`` is :class:`~recalign.training.data.PromptAnswerCollator`'s output with ``prompt``
    (token ids per example) and ``answers`` (a list of answers per example).
    """

    def __init__(self, impl: str = "packed") -> None:
        self.impl = impl

    def __call__(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        from recalign.lm.scoring import answer_logprobs

        scores = answer_logprobs(model, batch["prompt"], batch["answers"], impl=self.impl)
        logp = torch.where(scores.mask, scores.sum, torch.zeros_like(scores.sum))
        n_tokens = scores.n_tokens.sum().clamp(min=1)
        loss = -logp.sum() / n_tokens
        return loss, {"nll": loss.detach(), "answer_tokens": n_tokens.float() / len(batch["prompt"])}

    @staticmethod
    def loss_items(batch: dict) -> int:
        """Answer tokens the loss averages over: lets the trainer weight micro-batches and processes
        by their token counts, so accumulation or data parallelism gives the same update as one batch."""
        return sum(len(a) for answers in batch["answers"] for a in answers)


def sft_examples(tokenizer, dataset, frame: pd.DataFrame, seed: int, max_history: int) -> list[dict]:
    """Tokenised ``{"prompt": ids, "answers": [target ids]}`` per row of a split stage."""
    from recalign.lm.prompts import encode_answer, encode_prompt, examples_to_prompts

    prompts = examples_to_prompts(dataset, frame, seed=seed, max_history=max_history)
    return [
        {"prompt": encode_prompt(tokenizer, p.prompt), "answers": [encode_answer(tokenizer, p.target)]}
        for p in prompts
    ]


def _examples_seen(steps: int, training: TrainingConfig, n_examples: int) -> int:
    """Training examples (documents) fed to the optimiser by this process: steps x batch x accumulation
    (the last batch of an epoch can be smaller, so this is an upper bound by less than one batch/epoch)."""
    return int(steps * training.batch_size * max(1, training.grad_accum))


@dataclass
class SFTResult(LMRunResult):
    """What :func:`run_sft` returns."""


#: Settings a resumed SFT run must share with the run it continues.
RESUME_KEYS = (
    "model", "data", "format", "window", "min_context", "n_train", "seed", "lora", "max_history", "hybrid"
)  # fmt: skip


def training_data(cfg: SFTConfig, tokenizer, data: PreparedData) -> tuple[list[dict], object, dict]:
    """The tokenised training examples of ``cfg.format``, their objective and the true counts.

    ``candidates``: ``n_train`` seeded rows of the train stage, one prompt each. ``sequence``: the
    windows of every user's training sequence (:mod:`recalign.lm.sequence`), ``n_train`` of them drawn
    with the seed (in their original order).
    """
    if cfg.format == "sequence":
        from recalign.lm.sequence import SequenceObjective, n_targets, sequence_examples, split_windows

        windows = split_windows(data.split, data.dataset, cfg.window, cfg.min_context)
        if not windows:
            raise RecalignInputError(
                f"no user has more than min_context={cfg.min_context} training items", field="min_context"
            )
        if 0 < cfg.n_train < len(windows):
            rng = np.random.default_rng([cfg.seed, 0x5E0])
            keep = np.sort(rng.choice(len(windows), size=cfg.n_train, replace=False))
            windows = [windows[i] for i in keep]
        if cfg.hybrid.enabled:  # a soft item token after every item's line (recalign.methods.hybrid)
            from recalign.methods.hybrid import hybrid_sequence_examples

            examples = hybrid_sequence_examples(cfg.hybrid, tokenizer, data.dataset, windows)
        else:
            examples = sequence_examples(tokenizer, data.dataset, windows)
        counts = {
            "n_documents": len(examples),
            "n_targets": n_targets(examples),
            "n_tokens": sum(len(e["tokens"]) for e in examples),
            "window": cfg.window,
            "min_context": cfg.min_context,
        }
        return examples, SequenceObjective(cfg.hybrid.item_head_weight), counts
    train_frame = sample_examples(data.split.stage("train"), cfg.n_train, cfg.seed, stage="train")
    examples = sft_examples(tokenizer, data.dataset, train_frame, cfg.seed, cfg.max_history)
    if cfg.hybrid.enabled:  # the same rows as hybrid prompts (text ones kept for the curriculum)
        from recalign.methods.hybrid import hybrid_examples

        examples = hybrid_examples(cfg.hybrid, tokenizer, data.dataset, train_frame, examples,
                                   seed=cfg.seed, max_history=cfg.max_history)  # fmt: skip
    counts = {
        "n_documents": len(examples),
        "n_targets": len(examples),
        "n_tokens": sum(len(e["prompt"]) + len(e["answers"][0]) for e in examples),
    }
    return examples, SFTObjective(cfg.scoring_impl), counts


class SFTRecipe(LMRecipe):
    """:func:`run_sft`'s own steps (:func:`~recalign.methods.lm_recipe.run_lm_recipe` runs the rest)."""

    resume_keys = RESUME_KEYS
    result_type = SFTResult

    def __init__(self, cfg: SFTConfig) -> None:
        super().__init__(cfg)
        self.prompt_format = "sequence" if cfg.format == "sequence" else "candidates"

    def prepare(self, run: RecipeRun) -> TrainingPlan:
        from recalign.lm.lora import load_lm

        cfg = self.cfg
        dtype = resolve_dtype(cfg.dtype)
        model, tok, self.src = load_lm(cfg.model, merge=False, trainable=True, dtype=dtype)
        if self.src.adapter is None:
            model = new_adapter(model, cfg.lora, cfg.training.seed)
        callbacks = []
        if cfg.hybrid.enabled:  # the trainable projector next to the adapter (recalign.methods.hybrid)
            from recalign.methods.hybrid import attach_for_sft, describe
            from recalign.training import find_resume_checkpoint

            resume_from = find_resume_checkpoint(run.ckpt_dir, cfg.training.resume)
            hybrid = attach_for_sft(
                cfg.hybrid, model, run.data, resume_from, seed=cfg.training.seed, progress=run.progress
            )
            if run.progress:
                print(describe(hybrid), flush=True)
        examples, objective, self.counts = training_data(cfg, tok, run.data)
        if cfg.hybrid.enabled:
            from recalign.methods.hybrid import training_setup

            objective, callbacks = training_setup(cfg.hybrid, objective, examples, seed=cfg.seed)
        return TrainingPlan(model, tok, examples, objective, base_model=self.src.base, dtype=dtype,
                            callbacks=callbacks)  # fmt: skip

    def describe(self, plan: TrainingPlan, trainable: int, total: int) -> str:
        c = self.counts
        what = (
            f"{c['n_documents']} documents ({c['n_targets']} next-item targets)"
            if self.cfg.format == "sequence"
            else f"{c['n_documents']} training examples"
        )
        return f"sft: {what}, model {self.src.label} ({trainable:,} trainable of {total:,} parameters)"

    def adapter_extra(self) -> dict:
        return {"max_history": self.cfg.max_history, "prompt_format": self.prompt_format}

    def record_extra(self, plan: TrainingPlan, run: RecipeRun, outcome) -> dict:
        return {"dtype": plan.dtype, "format": self.cfg.format, "train_counts": self.counts,
                "examples_seen": _examples_seen(outcome.global_step, self.cfg.training, len(plan.examples))}  # fmt: skip

    def run_info(self, run: RecipeRun, outcome) -> dict:
        c = self.counts
        seen = _examples_seen(outcome.global_step, self.cfg.training, c["n_documents"])
        return {
            "model": self.cfg.model,
            "format": self.cfg.format,
            "train_counts": c,
            "examples_seen": seen,
            "targets_seen": round(seen * c["n_targets"] / max(c["n_documents"], 1)),
            "train_cpu_seconds": round(run.train_cpu_seconds, 2),
        }


@releasing  # the output directory's lock (recalign.rundir) is released on return
def run_sft(
    cfg: SFTConfig,
    output_dir: str | Path,
    *,
    data: PreparedData | None = None,
    test_examples: pd.DataFrame | None = None,
    command: str | None = None,
    progress: bool = True,
) -> SFTResult:
    """Train a LoRA adapter by SFT and evaluate it; see the module docstring for the outputs.

    Args:
        data: an already prepared dataset/split (the quickstart shares one across stages); loaded from
            ``cfg.data`` when omitted.
        test_examples: the evaluation rows (default: ``eval.n_test`` rows of the test stage, seeded).
        command: the command line recorded in results (default: this process's argv).
    """
    return run_lm_recipe(SFTRecipe(cfg), output_dir, data=data, test_examples=test_examples, command=command,
                         progress=progress)  # fmt: skip
