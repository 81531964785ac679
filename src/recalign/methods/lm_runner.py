"""The one run of every LM training recipe (SFT, preference alignment, knowledge alignment).

:func:`run_lm_recipe` validates the config, opens the run directory (:func:`~recalign.methods.lm_recipe.open_run_dir`),
loads the data, sets the threads, trains (:func:`recalign.training.train`), saves the adapter, evaluates and
writes ``metrics.json``. What is a recipe's own comes from its :class:`LMRecipe` subclass:

- :meth:`LMRecipe.prepare`: the model carrying its new adapter (:func:`new_adapter`), the tokenised
  training examples and the objective, as a :class:`TrainingPlan`;
- :meth:`LMRecipe.describe`: the progress line printed before training;
- :meth:`LMRecipe.adapter_extra`, :meth:`LMRecipe.record_extra`, :meth:`LMRecipe.run_info`: its own fields of
  ``adapter/recalign_adapter.json``, of the records' ``extra`` and of ``metrics.json``'s ``run``;
- :meth:`LMRecipe.evaluate`: the shared next-item evaluation by default (knowledge: its per-task one);
- :attr:`LMRecipe.resume_keys`, :attr:`LMRecipe.result_type` (an :class:`~recalign.methods.lm_recipe.LMRunResult`).

A recipe's ``run_*`` function is ``run_lm_recipe(TheRecipe(cfg), output_dir, ...)``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from recalign.evaluation.records import ResultRecord, current_command
from recalign.io import atomic_write_json
from recalign.lm.lora import LoRAConfig
from recalign.methods import PreparedData, load_data, set_threads
from recalign.methods.lm_recipe import LMRecipeConfig, LMRunResult, evaluate_trained, open_run_dir
from recalign.methods.zeroshot import metric_keys_flat


@dataclass
class RecipeRun:
    """What a recipe's steps see of the run: its directory, data, command line and progress setting."""

    out: Path
    ckpt_dir: Path
    data: PreparedData
    command: str
    progress: bool
    #: CPU seconds of this process in training (set by the runner after training)
    train_cpu_seconds: float = 0.0


@dataclass
class TrainingPlan:
    """What :meth:`LMRecipe.prepare` hands the runner: the model carrying its new, trainable adapter,
    its tokenizer, the tokenised training examples and the objective."""

    model: Any
    tokenizer: Any
    examples: list[dict]
    objective: Any
    #: the adapter's base, recorded in ``adapter/recalign_adapter.json`` (what ``load_lm`` rebuilds first)
    base_model: str
    #: the base weights' dtype (a ``torch.dtype``), kept as results write it (``float32``, ``bfloat16``)
    dtype: Any
    callbacks: list = field(default_factory=list)

    def __post_init__(self) -> None:
        self.dtype = str(self.dtype).replace("torch.", "")


def new_adapter(model, lora: LoRAConfig, seed: int):
    """``model`` with a fresh trainable LoRA adapter initialised from ``seed`` (the run's training seed,
    equal in every process of a distributed run)."""
    import torch

    from recalign.lm.lora import attach_lora

    torch.manual_seed(seed)
    return attach_lora(model, lora)


class LMRecipe:
    """One LM training recipe as :func:`run_lm_recipe` drives it; a recipe's ``run_*`` function is
    ``run_lm_recipe(TheRecipe(cfg), output_dir, ...)``.

    A subclass implements :meth:`prepare` and :meth:`describe` and, where it has them, its own
    :meth:`adapter_extra`, :meth:`record_extra` and :meth:`run_info` fields. The shared next-item
    evaluation (:func:`evaluate_trained`) is :meth:`evaluate`'s default; a recipe with its own
    evaluation (knowledge) overrides it, and :meth:`result` where its :class:`LMRunResult` subclass has
    fields of its own. One instance serves one run, so :meth:`prepare` may keep on ``self``
    what later steps report (counts, the start model, ...).
    """

    #: settings a resumed run must share with the run it continues (:func:`open_run_dir`)
    resume_keys: tuple[str, ...] = ()
    #: shared ``metrics.json`` run keys this recipe has never written (left out, so its file is unchanged)
    absent_run_keys: tuple[str, ...] = ()
    #: what :meth:`result` builds
    result_type: type[LMRunResult] = LMRunResult
    #: the prompt the trained model answers (``candidates`` or ``sequence``), for the evaluation
    prompt_format: str = "candidates"

    def __init__(self, cfg: LMRecipeConfig) -> None:
        self.cfg = cfg
        namer = getattr(cfg, "method_name", None)  # align and knowledge derive a default name
        self.method: str = namer() if namer is not None else cfg.method  # type: ignore[attr-defined]

    def prepare(self, run: RecipeRun) -> TrainingPlan:
        """Load the model, attach its new adapter (:func:`new_adapter`), build the examples and objective."""
        raise NotImplementedError

    def describe(self, plan: TrainingPlan, trainable: int, total: int) -> str:
        """The progress line printed before training."""
        raise NotImplementedError

    def adapter_extra(self) -> dict:
        """``recalign_adapter.json`` fields besides ``method`` and ``seed``."""
        return {}

    def record_extra(self, plan: TrainingPlan, run: RecipeRun, outcome) -> dict:
        """The records' ``extra`` besides ``model``, ``n_train`` and ``train_steps``."""
        return {}

    def run_info(self, run: RecipeRun, outcome) -> dict:
        """The recipe's own ``metrics.json`` run fields (after ``method``, before the shared ones)."""
        return {}

    def eval_config(self):
        """The config the evaluation after training reads (its ``eval`` section); ``self.cfg`` unless a
        recipe resolves an evaluation setting from its training settings (it returns a copy: the saved
        ``config.yaml`` stays what the user asked for)."""
        return self.cfg

    def evaluate(self, plan: TrainingPlan, run: RecipeRun, outcome, test_examples: pd.DataFrame | None):
        """``(records, flat metrics, run fields)`` after training: the shared next-item evaluation
        (:func:`evaluate_trained`, written to ``records.json``), with ``n_test`` as its run field."""
        extra = {"model": str(run.out), "n_train": len(plan.examples), "train_steps": outcome.global_step,
                 **self.record_extra(plan, run, outcome)}  # fmt: skip
        records, test_examples = evaluate_trained(
            plan.model, plan.tokenizer, self.eval_config(), run.data, run.out, method=self.method,
            test_examples=test_examples, command=run.command, progress=run.progress, extra=extra,
            prompt_format=self.prompt_format,
        )  # fmt: skip
        n_test = len(test_examples) if test_examples is not None else 0
        return records, metric_keys_flat(records), {"n_test": n_test}

    def result(self, out: Path, outcome, adapter_dir: Path, records: list[ResultRecord], metrics: dict):
        return self.result_type.of(out, outcome, adapter_dir, records, metrics)

    def other_process(self, out: Path, outcome):
        """What a non-main process of a distributed run returns (it trained; the main one writes)."""
        return self.result_type.other_process(out, outcome)


def run_lm_recipe(
    recipe: LMRecipe,
    output_dir: str | Path,
    *,
    data: PreparedData | None = None,
    test_examples: pd.DataFrame | None = None,
    command: str | None = None,
    progress: bool = True,
):
    """Run one LM recipe: validate → open the run directory → load the data → threads → the recipe's
    model, adapter, examples and objective → train → save the adapter → evaluate → ``metrics.json``.

    ``data``: an already prepared dataset/split (loaded from ``cfg.data`` when omitted);
    ``test_examples``: the evaluation rows of the shared evaluation (default: ``eval.n_test`` seeded rows);
    ``command``: the command line recorded in results (default: this process's argv).
    """
    import torch

    from recalign.lm.lora import count_trainable, save_adapter
    from recalign.training import distributed, train

    cfg = recipe.cfg
    cfg.validate()
    out = Path(output_dir)
    command = command if command is not None else current_command()
    # Fail fast (before loading anything) if the directory holds another run's checkpoints.
    ckpt_dir = open_run_dir(cfg, out, same_on_resume=recipe.resume_keys)
    distributed.init()  # joins the process group under accelerate launch (a no-op for one process)
    run = RecipeRun(out, ckpt_dir, data or load_data(cfg.data), command, progress)
    set_threads(cfg.threads)
    plan = recipe.prepare(run)
    trainable, total = count_trainable(plan.model)
    if progress and distributed.is_main():
        print(recipe.describe(plan, trainable, total), flush=True)
    cpu0 = time.process_time()
    outcome = train(
        plan.model, plan.examples, plan.objective, cfg.training, ckpt_dir, callbacks=plan.callbacks
    )
    run.train_cpu_seconds = time.process_time() - cpu0
    if not outcome.trainer.args.should_save:
        # Another process of a distributed run (accelerate launch): the main process alone saves the
        # adapter, evaluates and writes the results.
        return recipe.other_process(out, outcome)
    adapter_dir = save_adapter(plan.model, out / "adapter", base_model=plan.base_model,
                               extra={"method": recipe.method, "seed": cfg.seed, **recipe.adapter_extra()})  # fmt: skip
    records, flat, eval_info = recipe.evaluate(plan, run, outcome, test_examples)
    info = {
        "method": recipe.method,
        **recipe.run_info(run, outcome),
        "dataset": run.data.dataset.name,
        "split": run.data.split.name,
        "n_train": len(plan.examples),
        **eval_info,
        "train_steps": outcome.global_step,
        "train_loss": outcome.train_loss,
        "train_seconds": round(outcome.seconds, 2),
        "trainable_parameters": trainable,
        "dtype": plan.dtype,
        "threads": torch.get_num_threads(),
        "resumed_from": str(outcome.resumed_from) if outcome.resumed_from else None,
        "seed": cfg.seed,
        "command": command,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    for key in recipe.absent_run_keys:
        del info[key]
    metrics = {"metrics": flat, "run": info}
    atomic_write_json(out / "metrics.json", metrics)
    return recipe.result(out, outcome, adapter_dir, records, metrics)
