"""The quickstart (``make demo``): language models next to classical recommenders on one split, end to end.

One run prepares ML-100K (llara split), draws the test examples once, and evaluates every *stage* on
exactly those examples and candidate sets:

``baselines``  popularity and SASRec (the baselines package), trained on the split's full training data;
``zeroshot``   SmolLM2-135M-Instruct as is (candidate scoring + greedy generation);
``sft``        SmolLM2 after few-shot LoRA SFT on ``n_train`` training examples (:mod:`recalign.methods.sft`);
``sdpo``       the SFT model after S-DPO alignment (:func:`recalign.methods.align.run_align`): the SFT
               adapter (``ctx.artifacts["sft"]``) is merged in and is the reference, a fresh LoRA adapter is
               trained with ``sdpo.negatives`` negatives per positive drawn from the prompt's candidates,
               then evaluated like the other LM stages (records with method ``sdpo``).

It then renders the comparison (Markdown table + PNG plot, :mod:`recalign.evaluation.report`) and writes
every record, in the committed quality-results shape, to ``results.json`` (and to ``results`` if set).

Stages are pluggable: :func:`register_stage` adds one (a stage may use what earlier ones left in
``ctx.artifacts``, as ``sdpo`` starts from the SFT run directory in ``ctx.artifacts["sft"]``), and
``stages`` in the config chooses which run, in order. Each finished stage's records and artifacts are
saved under ``stages/NAME.json``; with ``--resume`` finished stages are read back instead of recomputed
and an interrupted SFT or S-DPO training continues from its last checkpoint. Without ``--resume`` an
output directory holding a previous run is refused.

Budget (2-core CPU): the default sizes (32 SFT steps of 4 examples, LoRA r=16 on every linear layer;
16 S-DPO steps of 4 prompts x 4 answers; 200 test examples) are chosen so the whole run fits in 20
minutes: measured 21 min with ``threads=1`` while a second SmolLM2 job held the other core (16.3
CPU-minutes; stages: baselines 1.9, zero-shot 4.6, SFT 9.7, S-DPO 5.1 min). Shared-prefix scoring keeps
the evaluation of 20 candidates per example to one prompt pass, which also seeds greedy generation
(:mod:`recalign.lm.joint`), and S-DPO training to one pass per prompt for all 1 + K answers.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import pandas as pd

from recalign.config import Ge, cfg_field, check_constraints, config_subset, save_config
from recalign.data.prepare import DataPrepareConfig
from recalign.errors import RecalignInputError
from recalign.evaluation.records import ResultRecord, write_records
from recalign.io import atomic_write_json
from recalign.lm.lora import LoRAConfig, resolve_dtype
from recalign.methods import PreparedData, load_data, sample_examples, set_threads
from recalign.methods.align import AlignConfig
from recalign.methods.lm_recipe import llara_data
from recalign.methods.sft import check_format
from recalign.methods.zeroshot import EvalConfig, protocol_record
from recalign.rundir import open_output_dir, releasing
from recalign.training.config import TrainingConfig


def _training() -> TrainingConfig:
    return TrainingConfig(
        learning_rate=1e-3, max_steps=60, batch_size=4, warmup_steps=4, save_steps=20, logging_steps=5
    )


#: Every linear layer of a Llama block: at a 128-example SFT budget, adapting q/v only left candidate scoring
#: at chance (HR@1 0.030 vs zero-shot 0.035); all seven with r=16 moves it (0.045 at 96-128 examples, 0.095-0.105 at 640).
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _lora() -> LoRAConfig:
    return LoRAConfig(r=16, alpha=32, dropout=0.05, target_modules=list(ALL_LINEAR))


def _sdpo_lora() -> LoRAConfig:
    return LoRAConfig(r=8, alpha=16, dropout=0.05, target_modules=["q_proj", "v_proj"])


def _sdpo_training() -> TrainingConfig:
    return TrainingConfig(
        learning_rate=5e-4, max_steps=12, batch_size=4, warmup_steps=2, save_steps=4, logging_steps=2
    )


#: Fields of the stage configs (SFTConfig, AlignConfig) that the quickstart sets for every stage from its own
#: top-level keys of the same names: one model, dataset, seed, prompt length, dtype, thread count and test set.
RUN_WIDE = ("model", "data", "max_history", "seed", "dtype", "threads", "eval")

#: AlignConfig fields the sdpo stage fixes: it is S-DPO on the candidate prompt, recorded as method ``sdpo``.
SDPO_FIXED = {"loss": "sdpo", "method": "sdpo", "prompt": "candidates"}

#: AlignConfig fields without effect under S-DPO, left out of the section (AlignConfig's defaults apply)
SDPO_UNUSED = ("nll_weight",)

#: SFTConfig fields the sft stage takes from the top level besides RUN_WIDE (its budget, adapter and optimiser)
SFT_FROM_TOP = ("n_train", "lora", "training", "format", "window", "min_context")

#: SFTConfig fields the sft stage leaves at SFTConfig's defaults (recorded as ``sft``);
#: tests check that every SFTConfig field is in RUN_WIDE, SFT_FROM_TOP or here, so none is silently dropped
SFT_DEFAULTS = ("method", "scoring_impl", "hybrid")

#: protocols a sequence-format model is evaluated with (it has no candidate-listing prompt to generate from)
SEQUENCE_PROTOCOLS = ("candidates", "full")


def _validate_sdpo(self) -> None:
    check_constraints(self, "sdpo.", nested=False)  # named as the section ``sdpo``
    if not self.lora.enabled:
        raise RecalignInputError("S-DPO trains an adapter; must be true", field="sdpo.lora.enabled")
    self.lora.validate()
    self.training.validate()


#: The ``sdpo`` stage: every :class:`~recalign.methods.align.AlignConfig` field but RUN_WIDE, SDPO_FIXED and
#: SDPO_UNUSED (negatives, beta, strategy, n_train, reference, lora, training, ... -- a new AlignConfig field
#: appears here by itself), with the quickstart's defaults.
QuickstartSDPOConfig = config_subset(
    AlignConfig,
    "QuickstartSDPOConfig",
    exclude=(*RUN_WIDE, *SDPO_FIXED, *SDPO_UNUSED),
    defaults={"negatives": 3, "n_train": 64, "lora": _sdpo_lora, "training": _sdpo_training},
    doc="The ``sdpo`` stage: S-DPO on the SFT stage's model (AlignConfig without the run-wide fields).",
    module=__name__,
    namespace={"validate": _validate_sdpo},
)


def run_wide(cfg: QuickstartConfig) -> dict[str, Any]:
    """The quickstart's values of the :data:`RUN_WIDE` fields, shared by every stage."""
    return {k: getattr(cfg, k) for k in RUN_WIDE}


def stage_fields(section: Any) -> dict[str, Any]:
    """A stage section's values by field name (what it passes on to its recipe's config)."""
    return {f.name: getattr(section, f.name) for f in dataclasses.fields(section)}


@dataclass
class QuickstartConfig:
    """``recalign quickstart``: zero-shot, SFT and S-DPO SmolLM2 next to popularity and SASRec on one split."""

    model: str = cfg_field("smollm2", "base language model (embedded SmolLM2-135M-Instruct by default)")
    dtype: str = cfg_field(
        "auto", "LM weights: auto (bfloat16 where native, else float32), float32, bfloat16"
    )
    threads: Annotated[int, Ge(0)] = cfg_field(
        0,
        "torch CPU threads (0: torch's default, one per core; 1 is faster on a CPU shared with busy processes)",
    )
    data: DataPrepareConfig = cfg_field(help="dataset and split", default_factory=llara_data)
    stages: list[str] = cfg_field(
        ["baselines", "zeroshot", "sft", "sdpo"],
        "stages to run, in order (built in: baselines, zeroshot, sft, sdpo; sdpo needs sft before it)",
    )
    baselines: list[str] = cfg_field(["pop", "sasrec"], "classical baselines of the 'baselines' stage")
    baseline_overrides: dict[str, dict[str, Any]] = cfg_field(
        {"sasrec": {"epochs": 10, "patience": 3}},
        "per-baseline config overrides (SASRec capped to fit the time budget)",
    )
    n_train: Annotated[int, Ge(1)] = cfg_field(
        240, "SFT training examples (format=sequence: windows), sampled with seed"
    )
    format: str = cfg_field(
        "sequence",
        "SFT data: candidates (one candidate-listing prompt per example) or sequence (windows of a user's "
        "history as plain lists, a next-item loss on every item; S-DPO then trains on its history-only "
        "prompt; the sft and sdpo stages skip the generation protocol, which needs the candidate prompt)",
    )
    window: int = cfg_field(24, "format=sequence: items per training window (> min_context)")
    min_context: int = cfg_field(4, "format=sequence: items of each window that are context only (>= 1)")
    max_history: int = cfg_field(10, "history items in prompts")
    seed: int = cfg_field(0, "seed of example sampling and prompt phrasing")
    lora: LoRAConfig = cfg_field(help="LoRA adapter of the SFT stage", default_factory=_lora)
    training: TrainingConfig = cfg_field(help="SFT optimisation", default_factory=_training)
    sdpo: QuickstartSDPOConfig = cfg_field(
        help="the sdpo stage: S-DPO alignment starting from the SFT stage's model",
        default_factory=QuickstartSDPOConfig,
    )
    eval: EvalConfig = cfg_field(
        help="test examples and protocols shared by every stage", default_factory=EvalConfig
    )
    results: str | None = cfg_field(
        None, "also write the records to this file (e.g. results/sft_ml100k.json)"
    )

    def validate(self) -> None:
        check_constraints(self, nested=False)  # the nested configs validate themselves below
        _register_builtin()
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown:
            raise RecalignInputError(
                f"unknown stage '{unknown[0]}' (registered: {', '.join(STAGES)})", field="stages"
            )
        check_format(self.format, self.window, self.min_context)  # SFT's rule, for the sft stage
        if "sdpo" in self.stages and "sft" not in self.stages[: self.stages.index("sdpo")]:
            raise RecalignInputError(
                "the sdpo stage starts from the SFT model: list sft before sdpo", field="stages"
            )
        if "sdpo" in self.stages and self.data.candidates - 1 < self.sdpo.negatives:
            raise RecalignInputError(
                f"{self.sdpo.negatives} negatives need at least {self.sdpo.negatives + 1} candidates",
                field="sdpo.negatives",
            )
        resolve_dtype(self.dtype)
        self.data.validate()
        self.lora.validate()
        self.training.validate()
        self.sdpo.validate()
        self.eval.validate()


@dataclass
class QuickstartContext:
    """What a stage gets: the config, the shared data and test rows, and what earlier stages left."""

    cfg: QuickstartConfig
    output_dir: Path
    data: PreparedData
    test_examples: pd.DataFrame
    command: str
    resume: bool = False
    progress: bool = True
    records: list[ResultRecord] = field(default_factory=list)
    #: stage name -> paths or values later stages may use (e.g. "sft" -> the SFT run directory)
    artifacts: dict[str, Any] = field(default_factory=dict)

    def stage_dir(self, name: str) -> Path:
        return self.output_dir / name


#: A stage returns its records; it may put values in ``ctx.artifacts[name]``.
Stage = Callable[[QuickstartContext], list[ResultRecord]]
STAGES: dict[str, Stage] = {}


def register_stage(name: str) -> Callable[[Stage], Stage]:
    """Decorator: make ``name`` usable in ``QuickstartConfig.stages``."""

    def deco(fn: Stage) -> Stage:
        STAGES[name] = fn
        return fn

    return deco


# ---------------------------------------------------------------------- built-in stages
#: Metrics a fitted baseline's progress line shows (exact names).
BASELINE_SHOWN = frozenset({"HR@1", "NDCG@10"})


def stage_baselines(ctx: QuickstartContext) -> list[ResultRecord]:
    """Classical baselines fitted on the split's training data, scored on the shared test rows."""
    from recalign.baselines import load_baseline_config, make_baseline
    from recalign.config import config_to_dict
    from recalign.evaluation.protocols import evaluate_candidates

    records = []
    for method in ctx.cfg.baselines:
        t0 = time.perf_counter()
        config = load_baseline_config(method, None, ctx.cfg.baseline_overrides.get(method) or None)
        model = make_baseline(method, config, progress=ctx.progress)
        if ctx.progress:
            print(f"baselines: fitting {method}", flush=True)
        model.fit(ctx.data.dataset, ctx.data.split)
        metrics = evaluate_candidates(model, ctx.test_examples)
        fit_info = {k: v for k, v in getattr(model, "fit_info", {}).items() if k != "history"}
        base = dict(
            dataset=ctx.data.dataset.name, split=ctx.data.split.name, method=method,
            n_examples=len(ctx.test_examples), seed=ctx.cfg.seed,
        )  # fmt: skip
        extra = {"config": config_to_dict(config), "fit": fit_info}
        seconds = time.perf_counter() - t0
        records.append(
            protocol_record(
                "candidates", metrics, seconds, base, ctx.command, extra, ctx.progress, shown=BASELINE_SHOWN
            )
        )
    return records


def stage_zeroshot(ctx: QuickstartContext) -> list[ResultRecord]:
    from recalign.methods.zeroshot import run_zeroshot

    return run_zeroshot(
        ctx.cfg.model,
        ctx.data.dataset,
        ctx.data.split.name,
        ctx.test_examples,
        cfg=ctx.cfg.eval,
        seed=ctx.cfg.seed,
        max_history=ctx.cfg.max_history,
        command=ctx.command,
        progress=ctx.progress,
        dtype=ctx.cfg.dtype,
    )


def _stage_training(ctx: QuickstartContext, training: TrainingConfig) -> TrainingConfig:
    """A copy of a training stage's optimisation settings, resuming and showing progress as the run does."""
    import copy

    training = copy.deepcopy(training)
    training.resume = ctx.resume
    training.progress = ctx.progress
    return training


def _stage_eval(cfg: QuickstartConfig) -> EvalConfig:
    """The run's evaluation settings for a model trained in ``cfg.format``: a sequence model keeps only
    the protocols it supports (:data:`SEQUENCE_PROTOCOLS`); the report shows the others as missing."""
    if cfg.format != "sequence":
        return cfg.eval
    import copy

    ev = copy.deepcopy(cfg.eval)
    ev.protocols = [p for p in ev.protocols if p in SEQUENCE_PROTOCOLS] or ["candidates"]
    return ev


def _run_training_stage(ctx: QuickstartContext, name: str, run: Callable, cfg: Any) -> list[ResultRecord]:
    """``run`` (``run_sft`` / ``run_align``) on the shared data and test rows into ``stages``' directory
    ``name``; the run directory is left in ``ctx.artifacts[name]``."""
    res = run(cfg, ctx.stage_dir(name), data=ctx.data, test_examples=ctx.test_examples, command=ctx.command,
              progress=ctx.progress)  # fmt: skip
    ctx.artifacts[name] = str(res.output_dir)
    return res.records


def stage_sft(ctx: QuickstartContext) -> list[ResultRecord]:
    from recalign.methods.sft import SFTConfig, run_sft

    c = ctx.cfg
    values = {**run_wide(c), **{k: getattr(c, k) for k in SFT_FROM_TOP}}
    sft_cfg = SFTConfig(**{**values, "training": _stage_training(ctx, c.training), "eval": _stage_eval(c)})
    return _run_training_stage(ctx, "sft", run_sft, sft_cfg)


def stage_sdpo(ctx: QuickstartContext) -> list[ResultRecord]:
    """S-DPO from the SFT stage's run directory (merged in: the reference), through ``run_align``."""
    from recalign.methods.align import run_align

    c, s = ctx.cfg, ctx.cfg.sdpo
    start = ctx.artifacts.get("sft")
    if not start:
        raise RecalignInputError(
            "the sdpo stage starts from the SFT model: run the sft stage before it", field="stages"
        )
    values = {**run_wide(c), **SDPO_FIXED, **stage_fields(s)}
    align_cfg = AlignConfig(
        **{
            **values,
            "model": str(start),
            "training": _stage_training(ctx, s.training),
            "eval": _stage_eval(c),
        }
    )
    return _run_training_stage(ctx, "sdpo", run_align, align_cfg)


def _register_builtin() -> None:
    STAGES.setdefault("baselines", stage_baselines)
    STAGES.setdefault("zeroshot", stage_zeroshot)
    STAGES.setdefault("sft", stage_sft)
    STAGES.setdefault("sdpo", stage_sdpo)


_register_builtin()


# ---------------------------------------------------------------------- driver
@dataclass
class QuickstartResult:
    records: list[ResultRecord]
    output_dir: Path
    table: str
    plot: Path | None
    seconds: float
    stage_seconds: dict[str, float]


def _stage_file(out: Path, name: str) -> Path:
    return out / "stages" / f"{name}.json"


#: columns of the quickstart report: ranking quality, plus the generation protocol's conventions
REPORT_METRICS = ("HR@1", "NDCG@5", "NDCG@10", "HR@1 (valid)", "ValidRatio")


def render_report(records: list[ResultRecord], out: Path) -> tuple[str, Path]:
    """Markdown table + PNG plot through the report module (``report.md`` / ``report.png`` in ``out``)."""
    from recalign.evaluation.report import write_report

    _, png, table = write_report(records, out, metrics=REPORT_METRICS)
    return table, png


@releasing  # the output directory's lock (recalign.rundir) is released on return
def run_quickstart(
    cfg: QuickstartConfig,
    output_dir: str | Path,
    *,
    resume: bool = False,
    command: str = "",
    progress: bool = True,
) -> QuickstartResult:
    """Run the configured stages on shared test rows, then write results and the report."""
    cfg.validate()
    t_start = time.perf_counter()
    out = open_output_dir(output_dir)  # not a file, writable, locked against a second live run
    done = {s: _stage_file(out, s).is_file() for s in cfg.stages}
    if any(done.values()) and not resume:
        raise RecalignInputError(
            "already holds a quickstart run; pass --resume to continue it, or choose another --output",
            source=out,
        )
    save_config(cfg, out / "config.yaml")
    set_threads(cfg.threads)
    data = load_data(cfg.data)
    if progress:
        print(f"data: {data.dataset.name} {data.split.name} split ready in {data.seconds:.0f} s", flush=True)
    test = sample_examples(data.split.stage(cfg.eval.stage), cfg.eval.n_test, cfg.seed, stage=cfg.eval.stage)
    ctx = QuickstartContext(
        cfg=cfg,
        output_dir=out,
        data=data,
        test_examples=test,
        command=command,
        resume=resume,
        progress=progress,
    )
    stage_seconds: dict[str, float] = {}
    for name in cfg.stages:
        path = _stage_file(out, name)
        if resume and path.is_file():
            saved = json.loads(path.read_text(encoding="utf-8"))
            recs = [ResultRecord.from_dict(r, source=str(path)) for r in saved["records"]]
            ctx.artifacts.update(saved.get("artifacts", {}))
            if progress:
                print(f"stage {name}: finished earlier, {len(recs)} records read back", flush=True)
        else:
            if progress:
                print(f"stage {name}: running", flush=True)
            t0 = time.perf_counter()
            recs = STAGES[name](ctx)
            stage_seconds[name] = round(time.perf_counter() - t0, 1)
            atomic_write_json(
                path,
                {
                    "records": [r.to_dict() for r in recs],
                    "artifacts": {k: v for k, v in ctx.artifacts.items() if k == name},
                    "seconds": stage_seconds[name],
                },
            )
        ctx.records.extend(recs)

    records = ctx.records
    write_records(out / "results.json", records)
    if cfg.results:
        write_records(cfg.results, records)
    table, plot = render_report(records, out)
    seconds = time.perf_counter() - t_start
    atomic_write_json(
        out / "timing.json", {"total_seconds": round(seconds, 1), "stages": stage_seconds, "command": command}
    )
    return QuickstartResult(
        records=records, output_dir=out, table=table, plot=plot, seconds=seconds, stage_seconds=stage_seconds
    )
