"""What the LM training recipes (SFT, preference alignment, knowledge alignment) share around training.

- :class:`LMRecipeConfig`: the fields every LM recipe config has (``model``, ``data``, ``seed``,
  ``dtype``, ``threads``, ``lora``, ``training``, ``eval``), the base of
  :class:`~recalign.methods.sft.SFTConfig`, :class:`~recalign.methods.align.AlignConfig` and
  :class:`~recalign.methods.knowledge.recipe.KnowledgeConfig`. A recipe redeclares a field whose
  default is its own (each recipe's ``training`` defaults, through :func:`training_field`);
- :func:`validate_lm_recipe`: the checks of the fields every LM training config has (``dtype``, an
  enabled ``lora`` adapter; ``threads >= 0`` is each recipe's field constraint) and of its nested
  ``data`` / ``lora`` / ``training`` / ``eval`` configs, run after the recipe's own checks;
- :func:`open_run_dir`: refuse a run directory holding another run's checkpoints (unless resuming, and
  then only with the same training-relevant settings), create it and save the resolved ``config.yaml``;
- :func:`evaluate_trained`: after training, the shared next-item evaluation on the seeded test rows,
  written as ``records.json``;
- :class:`LMRunResult`: what :func:`~recalign.methods.sft.run_sft`,
  :func:`~recalign.methods.align.run_align` and (a subclass) ``run_knowledge`` return.

The run itself (validate, open the directory, train, save, evaluate, ``metrics.json``) is
:func:`recalign.methods.lm_runner.run_lm_recipe`, driving a recipe's :class:`~recalign.methods.lm_runner.LMRecipe`.

Base fields come first in a recipe's fields (``--help-config``, ``config.yaml``); a redeclared one keeps
its place. The recipe's own fields follow.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import pandas as pd

from recalign.config import Ge, cfg_field, config_to_dict, read_yaml, save_config
from recalign.data.prepare import DataPrepareConfig
from recalign.errors import RecalignInputError
from recalign.evaluation.records import ResultRecord, write_records
from recalign.lm.lora import LoRAConfig
from recalign.methods import PreparedData, sample_examples
from recalign.methods.zeroshot import EvalConfig
from recalign.training.config import TrainingConfig


def llara_data() -> DataPrepareConfig:
    """Default data of the candidate-prompt recipes: the configured dataset with the LLaRA split."""
    return DataPrepareConfig(split="llara")


def training_field(**defaults: Any) -> Any:
    """A recipe's ``training`` field: :class:`TrainingConfig` with the recipe's ``defaults``."""
    return cfg_field(
        help="optimisation and checkpoints", default_factory=functools.partial(TrainingConfig, **defaults)
    )


@dataclass
class LMRecipeConfig:
    """The fields every LM recipe config has, with help that serves every recipe (``training``: plain
    :class:`TrainingConfig`, as every recipe sets its own optimiser defaults). A recipe redeclares a field
    only where its default differs, with the same name and type (knowledge: its own ``data`` default and
    ``eval`` section)."""

    model: str = cfg_field(
        "smollm2",
        "the model trained: 'smollm2' (embedded), a local HF model directory, or a run/adapter dir (align: "
        "the start model, merged in as the reference, usually an SFT run; knowledge: a base model, causal "
        "or T5-family, or tiny-llama / tiny-t5)",
    )
    data: DataPrepareConfig = cfg_field(help="dataset, split and candidates", default_factory=llara_data)
    seed: int = cfg_field(
        0,
        "seed of the training data (example sampling, prompt phrasing; align: negatives; knowledge: task "
        "data, templates, mixing) and of evaluation sampling (training.seed seeds the optimiser and adapter)",
    )
    dtype: str = cfg_field(
        "auto",
        "base-model weights: auto (bfloat16 where the CPU/GPU runs it natively, else float32), float32 or "
        "bfloat16; the LoRA adapter always trains in float32 (knowledge's tiny models: always float32)",
    )
    threads: Annotated[int, Ge(0)] = cfg_field(
        0,
        "torch CPU threads (0: torch's default, one per core; 1 is often faster on a CPU shared with busy "
        "processes)",
    )
    lora: LoRAConfig = cfg_field(
        help="the LoRA adapter trained (align: a new one on top of the start model)",
        default_factory=LoRAConfig,
    )
    training: TrainingConfig = training_field()
    eval: EvalConfig = cfg_field(help="evaluation after training", default_factory=EvalConfig)


def validate_lm_recipe(cfg: LMRecipeConfig, adapter_problem: str) -> None:
    """Check a known ``dtype`` and ``lora.enabled`` (else ``adapter_problem``, the one-line error), then
    validate the nested ``data``, ``lora``, ``training`` and ``eval`` configs. ``threads >= 0`` is each
    recipe's ``Annotated[int, Ge(0)]`` field constraint (checked by its ``validate`` before this)."""
    from recalign.lm.lora import resolve_dtype

    resolve_dtype(cfg.dtype)
    if not cfg.lora.enabled:
        raise RecalignInputError(adapter_problem, field="lora.enabled")
    cfg.data.validate()
    cfg.lora.validate()
    cfg.training.validate()
    cfg.eval.validate()


def check_resume_config(cfg: Any, path: Path, keys: Sequence[str]) -> None:
    """On resume, refuse a saved config (``path``) whose ``keys`` differ from the current config's."""
    if not path.is_file():
        return
    old, new = read_yaml(path), config_to_dict(cfg)
    for key in keys:
        if old.get(key) != new.get(key):
            raise RecalignInputError(
                f"'{key}' differs from the run being resumed ({old.get(key)!r} vs {new.get(key)!r}); "
                "resume with the same settings or use another --output",
                source=path,
            )


def open_run_dir(cfg: Any, out: Path, same_on_resume: Sequence[str] = ()) -> Path:
    """Prepare a recipe's run directory before anything is loaded; returns its checkpoint directory.

    A directory that already holds checkpoints is refused unless ``cfg.training.resume`` (one-line
    error); on resume, the ``same_on_resume`` keys of the saved ``config.yaml`` must equal the current
    ones. The resolved config is then written as ``config.yaml`` (by the main process alone under
    ``accelerate launch``). The directory is opened with :func:`recalign.rundir.open_output_dir`
    first (not a file, writable, locked against a second live run), so those checks see no other run.
    """
    from recalign.rundir import open_output_dir
    from recalign.training import distributed, find_resume_checkpoint

    open_output_dir(out)
    ckpt_dir = out / "checkpoints"
    find_resume_checkpoint(ckpt_dir, cfg.training.resume)  # fail fast on another run's checkpoints
    if cfg.training.resume and same_on_resume:
        check_resume_config(cfg, out / "config.yaml", same_on_resume)
    if distributed.is_main():
        save_config(cfg, out / "config.yaml")
    return ckpt_dir


def evaluate_trained(
    model,
    tok,
    cfg: Any,
    data: PreparedData,
    out: Path,
    *,
    method: str,
    test_examples: pd.DataFrame | None,
    command: str,
    progress: bool,
    extra: dict,
    prompt_format: str = "candidates",
) -> tuple[list[ResultRecord], pd.DataFrame | None]:
    """The shared next-item evaluation of a trained adapter (already saved), written to ``records.json``.

    Skipped when ``cfg.eval.n_test == 0``. The test rows default to ``eval.n_test`` rows of
    ``eval.stage`` drawn with ``cfg.seed``; the adapter is merged first (merged weights score faster).
    Returns the records and the test rows.
    """
    from recalign.methods.zeroshot import evaluate_lm

    if cfg.eval.n_test == 0:
        return [], test_examples
    if test_examples is None:
        test_examples = sample_examples(
            data.split.stage(cfg.eval.stage), cfg.eval.n_test, cfg.seed, stage=cfg.eval.stage
        )
    model = model.merge_and_unload()
    records = evaluate_lm(
        model, tok, data.dataset, test_examples, method=method, split_name=data.split.name, cfg=cfg.eval,
        seed=cfg.seed, max_history=cfg.max_history, command=command, progress=progress, extra=extra,
        prompt_format=prompt_format,
    )  # fmt: skip
    write_records(out / "records.json", records)
    return records, test_examples


@dataclass
class LMRunResult:
    """A finished LM training run: its directory, adapter, records and ``metrics.json`` content."""

    output_dir: Path
    adapter_dir: Path
    records: list[ResultRecord]
    metrics: dict
    train_steps: int
    train_loss: float
    train_seconds: float
    resumed_from: str | None = None
    log_history: list[dict] = field(default_factory=list, repr=False)

    @classmethod
    def of(cls, out: Path, outcome, adapter_dir: Path, records: list[ResultRecord], metrics: dict, **fields):
        """From the training outcome (:func:`recalign.training.train`) and what the run wrote (``fields``:
        a subclass's own)."""
        return cls(
            output_dir=out,
            adapter_dir=adapter_dir,
            records=records,
            metrics=metrics,
            train_steps=outcome.global_step,
            train_loss=outcome.train_loss,
            train_seconds=outcome.seconds,
            resumed_from=str(outcome.resumed_from) if outcome.resumed_from else None,
            log_history=outcome.log_history,
            **fields,
        )

    @classmethod
    def other_process(cls, out: Path, outcome):
        """What a non-main process of a distributed run returns: it trained, but the main process alone
        saves the adapter, evaluates and writes the results."""
        return cls(out, out / "adapter", [], {"metrics": {}, "run": {}}, outcome.global_step,
                   outcome.train_loss, outcome.seconds)  # fmt: skip
