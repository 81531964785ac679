"""Fit a recommender and evaluate it on a split: the Python API behind ``recalign baseline``.

:func:`evaluate_split` works for any :class:`~recalign.recommender.Recommender` (baseline or LM) and
returns one :class:`~recalign.evaluation.records.ResultRecord` per protocol, so every method's results
come out in the same shape. :func:`run_baseline` adds "build the named baseline and fit it".

``seconds`` in a record is the fit time plus the evaluation time of *that* protocol, i.e. what it costs
to obtain that number from scratch.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from recalign.config import config_to_dict
from recalign.data.dataset import RecDataset
from recalign.data.splits import Split
from recalign.errors import RecalignInputError
from recalign.evaluation.protocols import evaluate_candidates, evaluate_full
from recalign.evaluation.records import ResultRecord

DEFAULT_KS = (1, 5, 10, 20)
EVALUATORS = {"candidates": evaluate_candidates, "full": evaluate_full}


def evaluate_split(
    model: Any,
    split: Split,
    *,
    stage: str = "test",
    protocols: Sequence[str] = ("candidates", "full"),
    ks: Sequence[int] = DEFAULT_KS,
    method: str | None = None,
    seed: int = 0,
    command: str = "",
    fit_seconds: float = 0.0,
    extra: dict | None = None,
) -> list[ResultRecord]:
    """Evaluate a fitted ``model`` on ``split``'s ``stage`` under each protocol (one record each)."""
    examples = split.stage(stage)
    if not len(examples):
        raise RecalignInputError(f"the {split.name} split has no {stage} examples", field="stage")
    records = []
    for protocol in protocols:
        if protocol not in EVALUATORS:
            raise RecalignInputError(
                f"unknown protocol '{protocol}' (choose from {', '.join(EVALUATORS)})", field="protocol"
            )
        if protocol == "candidates" and not len(examples["candidates"].iloc[0]):
            raise RecalignInputError(f"the {stage} examples have no candidate sets", field="protocol")
        t0 = time.perf_counter()
        metrics = EVALUATORS[protocol](model, examples, ks=ks)
        records.append(
            ResultRecord(
                dataset=split.dataset,
                split=split.name,
                protocol=protocol,
                method=method or getattr(model, "name", type(model).__name__.lower()),
                metrics=metrics,
                n_examples=len(examples),
                seed=seed,
                seconds=round(fit_seconds + time.perf_counter() - t0, 3),
                command=command,
                extra=dict(extra or {}),
            )
        )
    return records


def flat_metrics(records: Sequence[ResultRecord]) -> dict[str, float]:
    """``{"candidates/HR@1": ..., "full/NDCG@10": ...}`` from per-protocol records."""
    return {f"{r.protocol}/{k}": v for r in records for k, v in r.metrics.items()}


@dataclass
class BaselineRun:
    model: Any
    records: list[ResultRecord]
    fit_seconds: float
    seconds: float
    fit_info: dict = field(default_factory=dict)
    fit_cpu_seconds: float = 0.0

    @property
    def metrics(self) -> dict[str, float]:
        return flat_metrics(self.records)


def run_baseline(
    method: str,
    dataset: RecDataset,
    split: Split,
    config: Any = None,
    *,
    protocols: Sequence[str] = ("candidates", "full"),
    ks: Sequence[int] = DEFAULT_KS,
    stage: str = "test",
    command: str = "",
    progress: bool = False,
) -> BaselineRun:
    """Build baseline ``method`` (from ``config`` or its defaults), fit it on ``split``, evaluate it."""
    from recalign.baselines import make_baseline

    if split.n_items != dataset.n_items:
        raise RecalignInputError(
            f"split has {split.n_items} items but dataset '{dataset.name}' has {dataset.n_items}; "
            "was it prepared from another dataset?",
            field="split",
        )
    t0, c0 = time.perf_counter(), time.process_time()
    model = make_baseline(method, config, progress=progress)
    model.fit(dataset, split)
    fit_seconds = time.perf_counter() - t0
    fit_cpu_seconds = time.process_time() - c0
    fit_info = {k: v for k, v in getattr(model, "fit_info", {}).items() if k != "history"}
    fit_info["cpu_seconds"] = round(fit_cpu_seconds, 1)  # wall time alone misleads on a shared CPU
    extra = {"config": config_to_dict(model.config), "stage": stage, "fit": fit_info}
    records = evaluate_split(
        model,
        split,
        stage=stage,
        protocols=protocols,
        ks=ks,
        method=method,
        seed=int(getattr(model.config, "seed", 0)),
        command=command,
        fit_seconds=fit_seconds,
        extra=extra,
    )
    return BaselineRun(
        model=model,
        records=records,
        fit_seconds=fit_seconds,
        seconds=time.perf_counter() - t0,
        fit_info=getattr(model, "fit_info", {}),
        fit_cpu_seconds=fit_cpu_seconds,
    )
