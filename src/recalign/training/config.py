"""Typed training hyper-parameters, mapped onto transformers ``TrainingArguments``.

Why a config of our own rather than ``TrainingArguments`` directly: ``TrainingArguments`` has ~150
fields, most irrelevant on a CPU recommender run, and typos in a YAML file would pass silently. This
dataclass exposes the dozen that matter, each with a help string (``recalign sft --help-config``),
validates them, and fixes the rest to what our trainer needs (``remove_unused_columns=False`` so the
collator's custom keys reach the objective, no external loggers, step-based checkpoints).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from recalign.config import Ge, Gt, cfg_field, check_constraints
from recalign.errors import RecalignInputError

Scheduler = Literal["linear", "cosine", "constant", "constant_with_warmup"]


@dataclass
class TrainingConfig:
    """Optimisation, checkpointing and logging settings shared by SFT and preference training."""

    learning_rate: Annotated[float, Gt(0, show_value=True)] = cfg_field(
        2e-4, "peak learning rate (AdamW); LoRA tolerates ~1e-4..1e-3"
    )
    epochs: float = cfg_field(1.0, "passes over the training examples (ignored when max_steps > 0)")
    max_steps: int = cfg_field(
        -1,
        "optimiser steps to run: -1 trains for 'epochs', a value > 0 overrides epochs (nothing else is valid)",
    )
    batch_size: Annotated[int, Ge(1, show_value=True)] = cfg_field(
        8, "examples per device per forward/backward pass"
    )
    grad_accum: Annotated[int, Ge(1, show_value=True)] = cfg_field(
        1, "passes accumulated per optimiser step (effective batch = batch_size x this)"
    )
    warmup_steps: Annotated[int, Ge(0)] = cfg_field(0, "linear learning-rate warm-up, in optimiser steps")
    lr_scheduler: Scheduler = cfg_field("linear", "learning-rate schedule after warm-up")
    weight_decay: Annotated[float, Ge(0)] = cfg_field(0.0, "AdamW decoupled weight decay")
    max_grad_norm: Annotated[float, Ge(0)] = cfg_field(1.0, "gradient clipping norm (0 disables clipping)")
    seed: int = cfg_field(0, "seed for weight init of the adapter, data order and dropout")
    save_steps: Annotated[int, Ge(1, show_value=True)] = cfg_field(
        50, "write a checkpoint every N optimiser steps (and at the end)"
    )
    save_total_limit: Annotated[int, Ge(1, show_value=True)] = cfg_field(
        2, "checkpoints kept on disk; older ones are deleted"
    )
    logging_steps: Annotated[int, Ge(1, show_value=True)] = cfg_field(
        5, "log loss and objective diagnostics every N optimiser steps"
    )
    resume: bool = cfg_field(
        False,
        "continue from the last checkpoint-N in the output directory; without it a directory that "
        "already holds checkpoints is refused rather than silently mixed with a new run",
    )
    progress: bool = cfg_field(True, "show a progress bar")
    gradient_checkpointing: bool = cfg_field(False, "recompute activations in backward to save memory")
    num_workers: Annotated[int, Ge(0)] = cfg_field(
        0, "data-loader worker processes (tokenised data is in memory: 0 is fine)"
    )

    def validate(self) -> None:
        # The Ge / Gt annotations; a config built in Python names its fields as the section ``training``.
        check_constraints(self, "training.")
        if self.max_steps != -1 and self.max_steps <= 0:
            raise RecalignInputError(
                f"must be -1 (train for 'epochs') or > 0, got {self.max_steps}", field="training.max_steps"
            )
        if self.max_steps <= 0 and self.epochs <= 0:
            raise RecalignInputError("set epochs > 0 or max_steps > 0", field="training.epochs")

    def to_arguments(self, output_dir: str | Path, **overrides):
        """The ``TrainingArguments`` for this config, writing checkpoints to ``output_dir``."""
        from transformers import TrainingArguments

        self.validate()
        kwargs = dict(
            output_dir=str(output_dir),
            learning_rate=self.learning_rate,
            num_train_epochs=self.epochs,
            max_steps=self.max_steps,
            per_device_train_batch_size=self.batch_size,
            gradient_accumulation_steps=self.grad_accum,
            warmup_steps=self.warmup_steps,
            lr_scheduler_type=self.lr_scheduler,
            weight_decay=self.weight_decay,
            max_grad_norm=self.max_grad_norm,
            seed=self.seed,
            data_seed=self.seed,
            save_strategy="steps",
            save_steps=self.save_steps,
            save_total_limit=self.save_total_limit,
            logging_strategy="steps",
            logging_steps=self.logging_steps,
            logging_first_step=True,
            disable_tqdm=not self.progress,
            report_to="none",
            remove_unused_columns=False,  # the collator's keys (prompts, answers, ...) go to the objective
            activation_checkpointing=self.gradient_checkpointing,  # transformers 5 name
            dataloader_num_workers=self.num_workers,
            eval_strategy="no",
            # Explicit CPU when there is no accelerator: under `accelerate launch` / torchrun this is
            # what makes the processes join one gloo process group instead of training alone.
            use_cpu=not accelerator_available(),
        )
        kwargs.update(overrides)
        return TrainingArguments(**kwargs)


def accelerator_available() -> bool:
    """Whether torch sees a CUDA, MPS or XPU device (else training runs, and joins processes, on CPU)."""
    import torch

    mps = getattr(torch.backends, "mps", None)
    xpu = getattr(torch, "xpu", None)
    return bool(
        torch.cuda.is_available()
        or (mps is not None and mps.is_available())
        or (xpu is not None and xpu.is_available())
    )
