"""What a DPO4Rec run reports: test metrics of SASRec with and without summaries, stage timings that
accumulate over resumed invocations, ``metrics.json`` and the quality-shaped ``records.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from recalign.evaluation.metrics import hit_values, ndcg_values, paired_difference, single_target_metrics
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
    return metrics_and_ranks(scores, examples)[0]


def metrics_and_ranks(scores: np.ndarray, examples: pd.DataFrame) -> tuple[dict[str, float], np.ndarray]:
    """Candidate metrics of ``scores`` and the per-example ranks they come from (for paired comparisons)."""
    ranks = candidate_ranks(scores, examples)
    n_c = scores.shape[1]
    return single_target_metrics(ranks, [k for k in METRIC_KS if k <= n_c], n_candidates=n_c), ranks


#: the per-example metrics paired comparisons report (DPO4Rec's reward metric and the headline one)
PAIRED_METRICS = ("NDCG@5", "HR@1")


def per_example(ranks: np.ndarray, metric: str) -> np.ndarray:
    """One example's value of ``metric`` (``NDCG@K`` or ``HR@K``, one target) from its rank."""
    name, k = metric.split("@")
    values = {"HR": hit_values, "NDCG": ndcg_values}.get(name)
    if values is None:
        raise ValueError(f"no per-example form for {metric!r}")
    return values(np.asarray(ranks), int(k))


def paired_metrics(ranks: np.ndarray, base_ranks: np.ndarray) -> dict[str, dict[str, float]]:
    """:func:`paired_difference` of every :data:`PAIRED_METRICS` between two rankings of the same examples."""
    return {m: paired_difference(per_example(ranks, m), per_example(base_ranks, m)) for m in PAIRED_METRICS}


def sampled_metrics(scored, n_candidates: int) -> dict[str, float]:
    """Candidate metrics of the augmented recommender over every sampled summary of an iteration (the
    ranks its cross-fitted fold models gave the true valid item), plus the mean reward."""
    if not scored:
        return {}
    ranks = np.asarray([s.rank for s in scored], dtype=np.int64)
    out = single_target_metrics(ranks, [k for k in METRIC_KS if k <= n_candidates], n_candidates=n_candidates)
    out["mean_reward"] = float(np.mean([s.reward for s in scored]))
    return out


def evaluate_augmented(
    model: AugmentedRecommender, records: list[SummaryRecord], test: pd.DataFrame, encoder
) -> tuple[dict[str, float], np.ndarray]:
    """Metrics (and per-example ranks) of the augmented recommender given each test user's summary."""
    by_user = {r.user: r for r in records}
    missing = [int(u) for u in test["user"] if int(u) not in by_user]
    if missing:
        raise RuntimeError(f"no test summary for user {missing[0]}")
    ordered = [by_user[int(u)] for u in test["user"]]
    emb = encoder.encode([r.text for r in ordered])
    hist = [np.asarray(h, dtype=np.int64) for h in test["history"]]
    cands = np.stack([np.asarray(c, dtype=np.int64) for c in test["candidates"]])
    return metrics_and_ranks(model.score_candidates(hist, emb, cands), test)


def previous_seconds(out: Path) -> dict[str, float]:
    """Stage timings of earlier invocations: ``timings.json``, else a finished run's ``metrics.json``."""
    timings, metrics = out / "timings.json", out / "metrics.json"
    if timings.is_file():
        return {k: float(v) for k, v in json.loads(timings.read_text(encoding="utf-8")).items()}
    if metrics.is_file():
        old = json.loads(metrics.read_text(encoding="utf-8")).get("seconds", {})
        return {k: float(v) for k, v in old.items() if k != "total"}
    return {}


def _reward_change(run: RunState, t: int) -> dict[str, float] | None:
    """Paired change of each user's mean sampled reward from iteration 0 to ``t`` (None for t = 0)."""
    if t == 0 or 0 not in run.user_rewards or t not in run.user_rewards:
        return None
    before, after = run.user_rewards[0], run.user_rewards[t]
    users = sorted(set(before) & set(after))
    if len(users) < 2:
        return None
    return paired_difference([after[u] for u in users], [before[u] for u in users])


def _test_name(t: int, iterations: int) -> str:
    """The test variant of the LM after ``t`` DPO rounds."""
    return "unaligned" if t == 0 else "aligned" if t == iterations else f"iter{t}"


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
        # the augmented recommender before (t) and after (t + 1) each DPO round: its valid metrics over
        # the N sampled summaries, the usable pairs of those samples, and (tested LMs) its test metrics
        "per_iteration": {
            str(t): {
                "valid_sampled": run.valid_metrics.get(t, {}),
                "usable_pairs": run.pair_stats.get(t, {}).get("pairs"),
                "tied_users": run.pair_stats.get(t, {}).get("ties"),
                "test": test_metrics.get(_test_name(t, cfg.iterations)),
            }
            for t in sorted(run.valid_metrics)
        },
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
    fusion_rows = {k: v.get("examples") for k, v in run.fusion_info.items()}
    for name in test_metrics:
        t = 0 if name == "unaligned" else cfg.iterations if name == "aligned" else int(name[4:])
        extra = {"reward_metric": reward_info["metric"], "samples_per_user": cfg.summary.samples,
                 "fusion_rows": fusion_rows, "dpo_rounds": t,
                 "usable_pairs": [run.pair_stats.get(i, {}).get("pairs") for i in range(t)]}  # fmt: skip
        extra["mean_sampled_reward"] = rewards[t]["mean"]
        if t > 0:
            extra["mean_sampled_reward_before"] = rewards[0]["mean"]
            extra["iterations"] = cfg.iterations
        ranks = run.test_ranks.get(name)
        if ranks is not None:  # the same test users: paired differences with their standard errors
            paired = {}
            if run.sasrec_test_ranks is not None:
                paired["vs_sasrec"] = paired_metrics(ranks, run.sasrec_test_ranks)
            if t > 0 and run.test_ranks.get("unaligned") is not None:
                paired["vs_unaligned"] = paired_metrics(ranks, run.test_ranks["unaligned"])
            extra["paired"] = paired
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
    n_valid = len(run.valid) if run.valid is not None else 0
    for t, vm in sorted(run.valid_metrics.items()):
        records.append(
            ResultRecord(
                method=f"sasrec+summaries-iter{t}",
                metrics={k: v for k, v in vm.items() if k != "mean_reward"},
                seconds=round(total, 3),
                command=cmd,
                extra={
                    "note": f"valid examples, every one of the N sampled summaries of the LM after {t} DPO "
                    "rounds, each scored by the fold model that never trained on its user",
                    "dpo_rounds": t,
                    "samples_per_user": cfg.summary.samples,
                    "mean_sampled_reward": vm.get("mean_reward"),
                    "mean_sampled_reward_vs_iter0": _reward_change(run, t),
                    "reward_metric": reward_info["metric"],
                    "usable_pairs": run.pair_stats.get(t, {}).get("pairs"),
                    "tied_users": run.pair_stats.get(t, {}).get("ties"),
                    "fusion_rows": fusion_rows,
                },
                **{**common, "protocol": "candidates/valid-samples", "n_examples": n_valid},
            )  # fmt: skip
        )
    atomic_write_json(out / "metrics.json", metrics)
    atomic_write_json(out / "records.json", {"records": [r.to_dict() for r in records]})
    log(f"done in {total:.0f}s; wrote {out / 'metrics.json'} and {out / 'records.json'}", cfg.progress)
    return metrics, records
