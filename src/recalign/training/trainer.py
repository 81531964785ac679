"""A thin layer over the transformers ``Trainer``: pluggable objectives, diagnostics, resumable runs.

Why the stock ``Trainer`` and not a loop of our own: it already does step-based checkpointing with
rotation, exact resumption (optimizer, scheduler, RNG states, data position), progress bars, gradient
accumulation, and runs unchanged under ``accelerate launch`` (DDP/FSDP/DeepSpeed). What recalign adds:

- **objectives**: ``compute_loss`` delegates to an *objective*, any callable
  ``objective(model, batch) -> (loss, logs)`` where ``batch`` is whatever the collator produced and
  ``logs`` a dict of scalar diagnostics (e.g. ``nll``, ``reward_margin``, ``reward_acc``). SFT, S-DPO,
  DMPO and DPO are all objectives on this one trainer.
- **diagnostics**: the objective's logs are averaged over the steps since the last log and logged next
  to the loss, learning rate and gradient norm (they appear in the progress output and in
  ``trainer_state.json``'s ``log_history``).
- **resume policy**: :func:`find_resume_checkpoint` picks the last ``checkpoint-N`` of the output
  directory when asked to resume, and refuses to start a fresh run over existing checkpoints (two runs
  interleaving checkpoints in one directory is a silent, hard-to-spot mistake).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from transformers import Trainer, TrainerCallback

from recalign.errors import RecalignInputError
from recalign.training.config import TrainingConfig
from recalign.training.data import PromptAnswerCollator, TokenizedExamples


class Objective(Protocol):
    """A training objective: the loss of ``model`` on ``batch`` plus scalar diagnostics to log."""

    def __call__(self, model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict]: ...


class ObjectiveTrainer(Trainer):
    """``Trainer`` whose loss comes from a pluggable :class:`Objective`."""

    def __init__(self, *args: Any, objective: Objective, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.objective = objective
        # Our objectives return a per-batch mean; tell Trainer to divide by the accumulation steps
        # itself (it would otherwise guess from the model's forward signature and may skip it).
        self.loss_is_scaled_for_ga = False
        self._diag_sums: dict[str, float] = {}
        self._diag_counts: dict[str, int] = {}

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ):
        loss, logs = self.objective(model, inputs)
        if model.training:
            for k, v in (logs or {}).items():
                val = float(v.detach().float().mean()) if isinstance(v, torch.Tensor) else float(v)
                self._diag_sums[k] = self._diag_sums.get(k, 0.0) + val
                self._diag_counts[k] = self._diag_counts.get(k, 0) + 1
        return (loss, {"logs": logs}) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # Training logs (those with a "loss") get the mean of each diagnostic since the last log.
        if "loss" in logs and self._diag_counts:
            for k, s in self._diag_sums.items():
                logs.setdefault(k, round(s / self._diag_counts[k], 6))
            self._diag_sums.clear()
            self._diag_counts.clear()
        super().log(logs, start_time)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Save as usual, but keep the training arguments as JSON instead of a pickle.

        The weights (adapter or full model) are safetensors. Trainer also pickles its
        ``TrainingArguments`` to ``training_args.bin``, a file that can only be read with
        ``weights_only=False`` (arbitrary code on load); it is never needed to resume, so it is
        replaced by a readable ``training_args.json``. Optimizer, scheduler and RNG states stay as
        Trainer writes them and are loaded with ``torch.load(weights_only=True)``.
        """
        super()._save(output_dir, state_dict)
        out = Path(output_dir if output_dir is not None else self.args.output_dir)
        if self.args.should_save and (out / "training_args.bin").is_file():
            (out / "training_args.bin").unlink()
            (out / "training_args.json").write_text(self.args.to_json_string(), encoding="utf-8")


_CKPT = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(directory: str | Path) -> list[Path]:
    """``checkpoint-N`` subdirectories, oldest (smallest N) first."""
    d = Path(directory)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if p.is_dir() and (m := _CKPT.match(p.name))]
    return [p for _, p in sorted(found)]


def find_resume_checkpoint(directory: str | Path, resume: bool) -> Path | None:
    """The checkpoint to resume from, or None for a fresh run.

    - ``resume=True``: the last complete checkpoint (one with ``trainer_state.json``), or None when
      there is none yet (so ``--resume`` is safe on a first run: it simply starts).
    - ``resume=False`` and checkpoints exist: a one-line input error telling the user to pass
      ``--resume`` or pick another output directory.
    """
    ckpts = [p for p in list_checkpoints(directory) if (p / "trainer_state.json").is_file()]
    if not ckpts:
        return None
    if not resume:
        raise RecalignInputError(
            f"already holds checkpoints (last: {ckpts[-1].name}); pass --resume (training.resume=true) "
            "to continue from it, or choose another output directory",
            source=directory,
        )
    return ckpts[-1]


@dataclass
class TrainOutcome:
    """What a training run produced."""

    global_step: int
    train_loss: float
    resumed_from: Path | None
    log_history: list[dict]
    seconds: float
    trainer: ObjectiveTrainer


def train(
    model: torch.nn.Module,
    examples: TokenizedExamples | list[dict],
    objective: Objective,
    cfg: TrainingConfig,
    checkpoint_dir: str | Path,
    *,
    collator: Callable[[list[dict]], dict] | None = None,
    callbacks: list[TrainerCallback] | None = None,
    processing_class: Any = None,
    **argument_overrides: Any,
) -> TrainOutcome:
    """Train ``model`` on ``examples`` with ``objective``; checkpoints go to ``checkpoint_dir``.

    The model should already carry its adapter (:func:`recalign.lm.lora.attach_lora`); only parameters
    with ``requires_grad`` are optimised and, for a peft model, checkpoints hold only the adapter
    (``adapter_model.safetensors``) plus optimizer/scheduler/RNG state for exact resumption.
    """
    import time

    resume_from = find_resume_checkpoint(checkpoint_dir, cfg.resume)
    data = examples if isinstance(examples, TokenizedExamples) else TokenizedExamples(examples)
    args = cfg.to_arguments(checkpoint_dir, **argument_overrides)
    trainer = ObjectiveTrainer(
        model=model,
        args=args,
        train_dataset=data,
        data_collator=collator or PromptAnswerCollator(),
        objective=objective,
        callbacks=callbacks,
        processing_class=processing_class,
    )
    t0 = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    seconds = time.perf_counter() - t0
    if trainer.args.should_save:
        trainer.save_state()
    return TrainOutcome(
        global_step=int(result.global_step),
        train_loss=float(result.training_loss),
        resumed_from=resume_from,
        log_history=list(trainer.state.log_history),
        seconds=seconds,
        trainer=trainer,
    )
