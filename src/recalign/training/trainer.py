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
- **complete checkpoints only**: Trainer writes ``checkpoint-N`` file by file, so a run killed while
  saving leaves a directory that may hold ``trainer_state.json`` (or half of it) without the rest.
  After every process has written its part, the main process adds ``recalign_checkpoint.json`` with
  write-then-rename; only checkpoints holding it are resumed from, and old checkpoints are rotated
  away only after the new one is marked complete.
- **hybrid item tokens** (:mod:`recalign.lm.hybrid`): the projector attached to the model trains with
  the adapter (the optimiser sees every parameter with ``requires_grad``); checkpoints hold it as
  ``hybrid_projector.safetensors`` next to the adapter, and resuming restores it.
- **distributed runs** (``accelerate launch``): the objective runs *inside* the wrapper's forward
  (DDP/FSDP/DeepSpeed), on the unwrapped model. Objectives call the scoring layer, not
  ``model.forward``; called on the bare module, DDP would never arm its gradient all-reduce and each
  process would silently train its own copy. An objective whose loss is a mean over a varying number
  of items (answer tokens) can say so with ``loss_items(batch)``; the loss is then normalised by the
  item count of the whole optimiser step over all micro-batches and processes, so 2 processes x
  batch 2 give the same update as 1 process x batch 4 (and as batch 2 x 2 accumulation steps).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from transformers import Trainer, TrainerCallback

from recalign.errors import RecalignInputError
from recalign.io import atomic_write_json
from recalign.training.config import TrainingConfig
from recalign.training.data import PromptAnswerCollator, TokenizedExamples

COMPLETE_MARKER = "recalign_checkpoint.json"


class Objective(Protocol):
    """A training objective: the loss of ``model`` on ``batch`` plus scalar diagnostics to log.

    Optionally it has ``loss_items(batch) -> int``: how many items (e.g. answer tokens) its mean
    loss averages over; see the module docstring.
    """

    def __call__(self, model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict]: ...


@contextmanager
def _forward_replaced(module: torch.nn.Module, fn: Callable[..., Any]) -> Iterator[None]:
    """Temporarily make ``module(...)`` call ``fn`` (an instance attribute shadows the class method)."""
    had = "forward" in module.__dict__
    old = module.__dict__.get("forward")
    module.forward = fn
    try:
        yield
    finally:
        if had:
            module.forward = old
        else:
            del module.forward


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
        inner = getattr(model, "module", None)  # DDP / FSDP / DeepSpeed wrap the model as .module
        if isinstance(inner, torch.nn.Module) and inner is not model:
            # Through the wrapper's forward, so that its backward hooks (gradient sync) are armed.
            with _forward_replaced(inner, lambda *_a, **_k: self.objective(inner, inputs)):
                loss, logs = model()
        else:
            loss, logs = self.objective(model, inputs)
        count = getattr(self.objective, "loss_items", None)
        if count is not None and num_items_in_batch is not None and model.training:
            # This micro-batch's share of the step's item-weighted mean; Trainer then divides by the
            # accumulation steps and DDP averages over processes, which the factors undo.
            share = count(inputs) / float(num_items_in_batch)
            loss = loss * (share * self.current_gradient_accumulation_steps * self.args.world_size)
        if model.training:
            for k, v in (logs or {}).items():
                val = float(v.detach().float().mean()) if isinstance(v, torch.Tensor) else float(v)
                self._diag_sums[k] = self._diag_sums.get(k, 0.0) + val
                self._diag_counts[k] = self._diag_counts.get(k, 0) + 1
        return (loss, {"logs": logs}) if return_outputs else loss

    def _run_epoch(self, *args: Any, **kwargs: Any) -> Any:
        """Trainer's epoch, unless the run has already reached ``max_steps``.

        Resumed from a checkpoint at ``max_steps`` that falls mid-epoch (a run interrupted after its
        last checkpoint, e.g. while evaluating), transformers' loop runs one more optimiser step before
        it checks the step limit. A finished run must come back unchanged: skip the epoch instead.
        (A private hook of transformers 5; where it does not exist this override is simply unused.)
        """
        if self.state.max_steps > 0 and self.state.global_step >= self.state.max_steps:
            self.control.should_training_stop = True
            return None
        return super()._run_epoch(*args, **kwargs)

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> Any:
        """Items the objective's loss averages over, summed over the step's micro-batches and processes."""
        count = getattr(self.objective, "loss_items", None)
        if count is None or not batch_samples:
            return super()._get_num_items_in_batch(batch_samples, device)
        n = torch.tensor(float(sum(count(b) for b in batch_samples)), device=device)
        if self.args.world_size > 1:
            n = self.accelerator.reduce(n, reduction="sum")
        return n

    def _save_checkpoint(self, model: torch.nn.Module, trial: Any) -> None:
        """Trainer's checkpoint, then the completeness marker, then rotation of older checkpoints."""
        from transformers.trainer_utils import rotate_checkpoints

        limit = self.args.save_total_limit
        self.args.save_total_limit = None  # no rotation before the new checkpoint is complete
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        run_dir = Path(self._get_output_dir(trial=trial))
        ckpt = run_dir / f"checkpoint-{self.state.global_step}"
        self.accelerator.wait_for_everyone()  # every process has written its part (RNG state, ...)
        if self.args.should_save:
            files = sorted(p.name for p in ckpt.iterdir() if p.name != COMPLETE_MARKER)
            atomic_write_json(
                ckpt / COMPLETE_MARKER,
                {"global_step": self.state.global_step, "world_size": self.args.world_size, "files": files},
            )
            rotate_checkpoints(output_dir=str(run_dir), save_total_limit=limit, use_mtime=False)
        self.accelerator.wait_for_everyone()

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # Training logs (those with a "loss") get the mean of each diagnostic since the last log.
        if "loss" in logs and self._diag_counts:
            keys = sorted(self._diag_sums)
            means = [self._diag_sums[k] / self._diag_counts[k] for k in keys]
            if self.args.world_size > 1:
                # Every process logs at the same steps (Trainer gathers the loss here too), and the
                # objective logs the same keys each call: average the diagnostics over processes.
                t = torch.tensor(means, dtype=torch.float64, device=self.args.device)
                means = self.accelerator.reduce(t, reduction="mean").tolist()
            for k, m in zip(keys, means):
                logs.setdefault(k, round(m, 6))
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
        if self.args.should_save:
            # A hybrid model's item-token projector trains with the adapter but is not part of peft's
            # adapter state dict: the checkpoint gets it as its own safetensors file.
            from recalign.lm.hybrid import save_item_tokens

            save_item_tokens(self.model, out)

    def _load_from_checkpoint(
        self, resume_from_checkpoint: str, model: torch.nn.Module | None = None
    ) -> None:
        """Trainer's weights restore (the adapter), then the item-token projector's (hybrid models)."""
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        from recalign.lm.hybrid import has_item_tokens, load_item_tokens_state

        target = model if model is not None else self.model
        if has_item_tokens(target) and not load_item_tokens_state(target, resume_from_checkpoint):
            raise RecalignInputError(
                "checkpoint holds no hybrid projector but the model being trained has one",
                source=resume_from_checkpoint,
            )


_CKPT = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(directory: str | Path) -> list[Path]:
    """``checkpoint-N`` subdirectories, oldest (smallest N) first."""
    d = Path(directory)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if p.is_dir() and (m := _CKPT.match(p.name))]
    return [p for _, p in sorted(found)]


def is_complete_checkpoint(path: str | Path) -> bool:
    """A checkpoint every process finished writing (marker written last, atomically)."""
    return (Path(path) / COMPLETE_MARKER).is_file() and (Path(path) / "trainer_state.json").is_file()


def find_resume_checkpoint(directory: str | Path, resume: bool) -> Path | None:
    """The checkpoint to resume from, or None for a fresh run.

    - ``resume=True``: the last complete checkpoint (:func:`is_complete_checkpoint`; a directory left
      half-written by a killed run is skipped), or None when there is none yet (so ``--resume`` is
      safe on a first run: it simply starts).
    - ``resume=False`` and any checkpoint directory exists: a one-line input error telling the user
      to pass ``--resume`` or pick another output directory.
    """
    found = list_checkpoints(directory)
    if found and not resume:
        raise RecalignInputError(
            f"already holds checkpoints (last: {found[-1].name}); pass --resume (training.resume=true) "
            "to continue from it, or choose another output directory",
            source=directory,
        )
    ckpts = [p for p in found if is_complete_checkpoint(p)]
    return ckpts[-1] if ckpts else None


def _mean_logged_loss(history: list[dict], fallback: float) -> float:
    """Mean per-step training loss over every logged step (each entry averages the steps since the
    previous one)."""
    prev, total, covered = 0, 0.0, 0
    for h in history:
        if "loss" in h and "step" in h and h["step"] > prev:
            total += float(h["loss"]) * (h["step"] - prev)
            covered += h["step"] - prev
            prev = h["step"]
    return total / covered if covered else fallback


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
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != args.world_size:
        # e.g. an accelerate config whose launcher started N processes that each train alone
        raise RuntimeError(
            f"launched as {launched} processes but training is set up for {args.world_size}: "
            "every process would train its own copy of the model"
        )
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
    train_loss = float(result.training_loss)
    if resume_from is not None:
        # Trainer's figure only averages the steps run since resuming; the restored log history
        # covers the whole run, so a resumed run reports what the uninterrupted one would.
        train_loss = _mean_logged_loss(trainer.state.log_history, train_loss)
    return TrainOutcome(
        global_step=int(result.global_step),
        train_loss=train_loss,
        resumed_from=resume_from,
        log_history=list(trainer.state.log_history),
        seconds=seconds,
        trainer=trainer,
    )
