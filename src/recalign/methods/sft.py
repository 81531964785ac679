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

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
import pandas as pd
import torch

from recalign.config import Ge, cfg_field, check_constraints
from recalign.errors import RecalignInputError
from recalign.evaluation.records import current_command
from recalign.io import atomic_write_json
from recalign.lm.lora import resolve_dtype
from recalign.methods import PreparedData, load_data, sample_examples, set_threads
from recalign.methods.hybrid import HybridConfig
from recalign.methods.lm_recipe import (
    LMRecipeConfig,
    LMRunResult,
    evaluate_trained,
    open_run_dir,
    training_field,
    validate_lm_recipe,
)
from recalign.methods.zeroshot import metric_keys_flat
from recalign.rundir import releasing
from recalign.training.config import TrainingConfig

FORMATS = ("candidates", "sequence")


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
        help="LLaRA hybrid item tokens (format=candidates): 'Title [emb]' with a projected recommender embedding",
        default_factory=HybridConfig,
    )

    def validate(self) -> None:
        check_constraints(self, nested=False)  # the nested configs: validate_lm_recipe below
        self.hybrid.validate()
        if self.hybrid.enabled and self.format != "candidates":
            raise RecalignInputError("hybrid item tokens need format=candidates", field="hybrid.enabled")
        if self.format not in FORMATS:
            raise RecalignInputError(
                f"must be one of {', '.join(FORMATS)}, got {self.format!r}", field="format"
            )
        if self.format == "sequence":
            if self.min_context < 1:
                raise RecalignInputError("must be >= 1", field="min_context")
            if self.window <= self.min_context:
                raise RecalignInputError(f"must be > min_context ({self.min_context})", field="window")
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
        examples = sequence_examples(tokenizer, data.dataset, windows)
        counts = {
            "n_documents": len(examples),
            "n_targets": n_targets(examples),
            "n_tokens": sum(len(e["tokens"]) for e in examples),
            "window": cfg.window,
            "min_context": cfg.min_context,
        }
        return examples, SequenceObjective(), counts
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
    from recalign.lm.lora import attach_lora, count_trainable, load_lm, save_adapter
    from recalign.training import train

    cfg.validate()
    out = Path(output_dir)
    command = command if command is not None else current_command()
    # Fail fast (before loading anything) if the directory holds another run's checkpoints.
    ckpt_dir = open_run_dir(cfg, out, same_on_resume=RESUME_KEYS)

    data = data or load_data(cfg.data)
    split_name = data.split.name

    set_threads(cfg.threads)
    dtype = resolve_dtype(cfg.dtype)
    model, tok, src = load_lm(cfg.model, merge=False, trainable=True, dtype=dtype)
    if src.adapter is None:
        torch.manual_seed(cfg.training.seed)  # adapter init from the run's seed (equal in every process)
        model = attach_lora(model, cfg.lora)
    callbacks = []
    if cfg.hybrid.enabled:  # the trainable projector next to the adapter (recalign.methods.hybrid)
        from recalign.methods.hybrid import attach_for_sft, describe
        from recalign.training import find_resume_checkpoint

        resume_from = find_resume_checkpoint(ckpt_dir, cfg.training.resume)
        hybrid = attach_for_sft(
            cfg.hybrid, model, data, resume_from, seed=cfg.training.seed, progress=progress
        )
        if progress:
            print(describe(hybrid), flush=True)
    trainable, total = count_trainable(model)
    examples, objective, counts = training_data(cfg, tok, data)
    if cfg.hybrid.enabled:
        from recalign.methods.hybrid import training_setup

        objective, callbacks = training_setup(cfg.hybrid, objective, examples, seed=cfg.seed)
    if progress:
        what = (
            f"{counts['n_documents']} documents ({counts['n_targets']} next-item targets)"
            if cfg.format == "sequence"
            else f"{counts['n_documents']} training examples"
        )
        print(f"sft: {what}, model {src.label} ({trainable:,} trainable of {total:,} parameters)", flush=True)
    cpu0 = time.process_time()
    outcome = train(model, examples, objective, cfg.training, ckpt_dir, processing_class=None,
                    callbacks=callbacks)  # fmt: skip
    cpu_seconds = time.process_time() - cpu0
    seen = _examples_seen(outcome.global_step, cfg.training, len(examples))
    if not outcome.trainer.args.should_save:
        # Another process of a distributed run (accelerate launch): the main process alone saves the
        # adapter, evaluates and writes the results.
        return SFTResult.other_process(out, outcome)
    adapter_dir = save_adapter(
        model,
        out / "adapter",
        base_model=src.base,
        extra={"method": cfg.method, "seed": cfg.seed, "max_history": cfg.max_history,
               "prompt_format": "sequence" if cfg.format == "sequence" else "candidates"},
    )  # fmt: skip

    records, test_examples = evaluate_trained(
        model, tok, cfg, data, out, method=cfg.method, test_examples=test_examples, command=command,
        progress=progress,
        extra={"model": str(out), "n_train": counts["n_documents"], "train_steps": outcome.global_step,
               "dtype": str(dtype).replace("torch.", ""), "format": cfg.format, "train_counts": counts,
               "examples_seen": seen},
        prompt_format="sequence" if cfg.format == "sequence" else "candidates",
    )  # fmt: skip
    metrics = {
        "metrics": metric_keys_flat(records),
        "run": {
            "method": cfg.method,
            "model": cfg.model,
            "dataset": data.dataset.name,
            "split": split_name,
            "format": cfg.format,
            "n_train": counts["n_documents"],
            "train_counts": counts,
            "examples_seen": seen,
            "targets_seen": round(seen * counts["n_targets"] / max(counts["n_documents"], 1)),
            "train_cpu_seconds": round(cpu_seconds, 2),
            "n_test": len(test_examples) if test_examples is not None else 0,
            "train_steps": outcome.global_step,
            "train_loss": outcome.train_loss,
            "train_seconds": round(outcome.seconds, 2),
            "trainable_parameters": trainable,
            "dtype": str(dtype).replace("torch.", ""),
            "threads": torch.get_num_threads(),
            "resumed_from": str(outcome.resumed_from) if outcome.resumed_from else None,
            "seed": cfg.seed,
            "command": command,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        },
    }
    atomic_write_json(out / "metrics.json", metrics)
    return SFTResult.of(out, outcome, adapter_dir, records, metrics)
