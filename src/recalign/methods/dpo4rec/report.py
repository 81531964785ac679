"""What a DPO4Rec run reports: test metrics of SASRec with and without summaries, stage timings that
accumulate over resumed invocations, ``metrics.json`` and the quality-shaped ``records.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from recalign.evaluation.metrics import single_target_metrics
from recalign.evaluation.protocols import candidate_ranks
from recalign.evaluation.records import ResultRecord, current_command
from recalign.io import atomic_write_json
from recalign.methods.dpo4rec.fusion import AugmentedRecommender
from recalign.methods.dpo4rec.stages import log, reward_name
from recalign.methods.dpo4rec.summaries import SummaryRecord

if TYPE_CHECKING:
    from recalign.methods.dpo4rec.recipe import RunState

METRIC_KS = (1, 5, 10, 20)


# ---------------------------------------------------------------------- evaluation
def metrics_from_scores(scores: np.ndarray, examples: pd.DataFrame) -> dict[str, float]:
    ranks = candidate_ranks(scores, examples)
    n_c = scores.shape[1]
    return single_target_metrics(ranks, [k for k in METRIC_KS if k <= n_c], n_candidates=n_c)


def evaluate_augmented(
    model: AugmentedRecommender, records: list[SummaryRecord], test: pd.DataFrame, encoder
) -> dict[str, float]:
    by_user = {r.user: r for r in records}
    missing = [int(u) for u in test["user"] if int(u) not in by_user]
    if missing:
        raise RuntimeError(f"no test summary for user {missing[0]}")
    ordered = [by_user[int(u)] for u in test["user"]]
    emb = encoder.encode([r.text for r in ordered])
    hist = [np.asarray(h, dtype=np.int64) for h in test["history"]]
    cands = np.stack([np.asarray(c, dtype=np.int64) for c in test["candidates"]])
    return metrics_from_scores(model.score_candidates(hist, emb, cands), test)


def previous_seconds(out: Path) -> dict[str, float]:
    """Stage timings of earlier invocations: ``timings.json``, else a finished run's ``metrics.json``."""
    timings, metrics = out / "timings.json", out / "metrics.json"
    if timings.is_file():
        return {k: float(v) for k, v in json.loads(timings.read_text(encoding="utf-8")).items()}
    if metrics.is_file():
        old = json.loads(metrics.read_text(encoding="utf-8")).get("seconds", {})
        return {k: float(v) for k, v in old.items() if k != "total"}
    return {}


def write_report(run: RunState) -> tuple[dict, list[ResultRecord]]:
    """``metrics.json`` (everything measured) and ``records.json`` (the ``sasrec`` and
    ``sasrec+summaries-*`` records in the quality shape) of a finished run; returns both."""
    cfg, out, dataset, split, users, test = run.cfg, run.out, run.dataset, run.split, run.users, run.test
    rewards, seconds, test_metrics, command = run.rewards, run.seconds, run.test_metrics, run.command
    sasrec_test, sasrec_info = run.sasrec_test, run.sasrec_info
    total = sum(seconds.values())
    reward_info = {
        "metric": reward_name(cfg),
        "before": rewards[0],
        "after": rewards[cfg.iterations],
        "per_iteration": {str(k): v for k, v in rewards.items()},
        "without_summary": run.sasrec_valid_reward,
    }
    metrics = {
        "dataset": dataset.name,
        "split": split.name,
        "users": len(users),
        "test_examples": len(test),
        "samples_per_user": cfg.summary.samples,
        "iterations": cfg.iterations,
        "test": {"sasrec": sasrec_test, **{f"sasrec+summaries-{k}": v for k, v in test_metrics.items()}},
        "reward": reward_info,
        "pairs": {str(k): v for k, v in run.pair_stats.items()},
        "dpo": {str(k): v for k, v in run.dpo_info.items()},
        "fusion": run.fusion_info,
        "sasrec": sasrec_info,
        "encoder": {"kind": cfg.encoder.kind, "dim": run.encoder.dim, "cache_hits": run.encoder.hits},
        "seconds": {**seconds, "total": round(total, 3)},
    }
    cmd = command if command is not None else current_command()
    common = dict(
        dataset=dataset.name, split=split.name, protocol="candidates", n_examples=len(test), seed=cfg.seed
    )
    records = [
        ResultRecord(
            method="sasrec",
            metrics=sasrec_test,
            seconds=round(float(sasrec_info.get("seconds", seconds.get("sasrec", 0.0))), 3),
            command=cmd,
            extra={"note": "the SASRec backbone of this run, on the same test users"},
            **common,
        )
    ]
    for name in test_metrics:
        extra = {"reward_metric": reward_info["metric"]}
        if name == "unaligned":
            extra["mean_sampled_reward"] = rewards[0]["mean"]
        else:
            extra["mean_sampled_reward"] = rewards[cfg.iterations]["mean"]
            extra["mean_sampled_reward_before"] = rewards[0]["mean"]
            extra["iterations"] = cfg.iterations
        records.append(
            ResultRecord(
                method=f"sasrec+summaries-{name}",
                metrics=test_metrics[name],
                seconds=round(total, 3),
                command=cmd,
                extra=extra,
                **common,
            )
        )
    atomic_write_json(out / "metrics.json", metrics)
    atomic_write_json(out / "records.json", {"records": [r.to_dict() for r in records]})
    log(f"done in {total:.0f}s; wrote {out / 'metrics.json'} and {out / 'records.json'}", cfg.progress)
    return metrics, records
