"""Paired comparison of CLLM4Rec runs and baselines on the same hold-out test users -> JSON.

Two means over 943 users each carry a standard error of ~0.006 (Recall@20), so two rows of
``results/cllm4rec_ml100k.json`` have to differ by ~0.017 before a difference is told from noise. Both
rows rank the *same* users, though, and most of that spread is between users (some are easy, some hard
for every model). Scoring every method on every test user and taking the mean and standard error of the
per-user differences removes it: the comparison the ablation needs (``cllm4rec`` against
``cllm4rec-no-content`` at the same budget, each against BPR-MF).

Each CLLM4Rec method is a finished run directory (``config.yaml`` + ``model.safetensors``, as
``benchmarks/cllm4rec.py`` leaves them); its tables are loaded and the test users ranked once more. The
baselines (``pop``, ``bprmf``: seeded, minutes at most) are retrained on the config's split. Each
method's means are checked against its record in the results file, where it has one: a rerun that does
not reproduce its record is reported (``matches_record``), not hidden.

Seeds: ``--arm NAME=MEMBER,MEMBER`` groups the runs of one setting trained with different seeds (members
are run directories or baseline names). An arm's per-user value is the mean over its members, and
``paired_arms`` holds the paired difference of every two arms: the seed-averaged comparison. Its standard
error is over users only; with two seeds the seed-to-seed spread cannot be estimated, so read it next to
the per-seed differences in ``paired`` (do both seeds agree?).

Usage::

    python benchmarks/cllm4rec_paired.py --runs runs/cllm4rec/cllm4rec-p10-s0-holdout,...
        [--baselines pop,bprmf] [--arm full=DIR_S0,DIR_S1 --arm bpr=bprmf]
        [--results results/cllm4rec_ml100k.json] [--out results/cllm4rec_paired.json]
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import numpy as np

from recalign.baselines.common import torch_threads
from recalign.config import load_config
from recalign.evaluation.metrics import multi_target_per_user, paired_difference
from recalign.evaluation.records import read_records, script_command
from recalign.io import atomic_write_json
from recalign.logs import parse_args
from recalign.methods.cllm4rec import pipeline
from recalign.methods.cllm4rec.config import CLLM4RecConfig
from recalign.methods.cllm4rec.protocol import rank_all, with_targets

METRICS = ("Recall@20", "Recall@40", "NDCG@100")
BASELINES = ("pop", "bprmf")  # the baselines retrained here


def per_user(rec, examples) -> dict[str, np.ndarray]:
    ranked = rank_all(rec, examples, k=100)
    return multi_target_per_user(ranked, list(examples["targets"]), ks=(20, 40, 100))


def score_run(run: Path) -> tuple[str, int, np.ndarray, dict[str, np.ndarray]]:
    """(method, seed, test user ids, per-user metrics) of a finished CLLM4Rec run directory."""
    cfg = load_config(CLLM4RecConfig, run / "config.yaml")
    with torch_threads(cfg.threads):
        dataset, split = pipeline.load_data(cfg)
        rec = pipeline.load_recommender(cfg, run, dataset)
        examples = with_targets(split.stage("test"))
        return cfg.method, cfg.seed, examples["user"].to_numpy(), per_user(rec, examples)


def score_baseline(name: str, dataset, split):
    """(method, seed, test user ids, per-user metrics) of a baseline retrained on ``split``, with the
    settings ``benchmarks/cllm4rec.py`` gives it (seed 0, one thread)."""
    from recalign.baselines import make_baseline

    rec = make_baseline(name, progress=False, **({} if name == "pop" else {"threads": 1}))
    rec.fit(dataset, split)
    examples = with_targets(split.stage("test"))
    return name, 0, examples["user"].to_numpy(), per_user(rec, examples)


def compare(scored: list, results: Path, command: str, arms: dict[str, list[int]] | None = None) -> dict:
    """The JSON document: every method's means (with its record's, where there is one) and the paired
    difference of every pair of methods on every metric; methods are labelled ``"<method> s<seed>"``.
    ``arms`` (name -> indices into ``scored``) adds each arm's seed-averaged means and the paired
    differences of every two arms."""
    users = scored[0][2]
    for name, _, u, _ in scored[1:]:
        if not np.array_equal(u, users):
            raise SystemExit(f"{name}: ranks other test users than {scored[0][0]} (a different split?)")
    labels = [f"{name} s{seed}" for name, seed, _, _ in scored]
    if len(set(labels)) < len(labels):
        raise SystemExit(f"the same method and seed twice: {labels}")
    old = read_records(results) if results.is_file() else []
    recs = {(r.method, r.seed): r for r in old if r.split == "holdout" and r.protocol == "full"}
    methods = {}
    for label, (name, seed, _, values) in zip(labels, scored):
        means = {m: float(values[m].mean()) for m in METRICS}
        entry: dict = {"seed": seed, "metrics": means}
        r = recs.get((name, seed))
        if r is not None:
            entry["record_metrics"] = {m: r.metrics[m] for m in METRICS}
            entry["matches_record"] = all(abs(means[m] - r.metrics[m]) < 1e-9 for m in METRICS)
        methods[label] = entry
    paired = {}
    for (a, (_, _, _, va)), (b, (_, _, _, vb)) in itertools.combinations(zip(labels, scored), 2):
        paired[f"{a} - {b}"] = {m: paired_difference(va[m], vb[m]) for m in METRICS}
    doc = {"command": command, "split": "holdout", "users": len(users), "methods": methods, "paired": paired}
    if arms:
        doc["arms"], doc["paired_arms"] = _compare_arms(scored, labels, arms)
    return doc


def _compare_arms(scored: list, labels: list[str], arms: dict[str, list[int]]) -> tuple[dict, dict]:
    values, entries = {}, {}
    for name, idx in arms.items():
        values[name] = {m: np.mean([scored[i][3][m] for i in idx], axis=0) for m in METRICS}
        entries[name] = {
            "members": [labels[i] for i in idx],
            "metrics": {m: float(values[name][m].mean()) for m in METRICS},
        }
    paired = {
        f"{a} - {b}": {m: paired_difference(values[a][m], values[b][m]) for m in METRICS}
        for a, b in itertools.combinations(arms, 2)
    }
    return entries, paired


def parse_arms(specs: list[str], baselines: list[str]) -> dict[str, list[str]]:
    """``NAME=MEMBER,MEMBER`` -> {name: members}; a member is a baseline name or a run directory."""
    arms: dict[str, list[str]] = {}
    for spec in specs:
        name, sep, members = spec.partition("=")
        items = [m for m in members.split(",") if m]
        if not sep or not name or not items:
            raise SystemExit(f"--arm {spec!r}: expected NAME=MEMBER[,MEMBER...]")
        if name in arms:
            raise SystemExit(f"--arm {name}: named twice")
        if len(set(items)) < len(items):
            raise SystemExit(f"--arm {name}: a member named twice")
        for m in items:
            if m in BASELINES and m not in baselines:
                raise SystemExit(f"--arm {name}: baseline {m} is not in --baselines")
        arms[name] = items
    return arms


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", default="", help="comma-separated finished CLLM4Rec run directories")
    ap.add_argument(
        "--baselines", default="pop,bprmf", help="comma-separated baselines retrained here (pop, bprmf)"
    )
    ap.add_argument("--config", default="configs/cllm4rec_ml100k.yaml", help="config of the baselines' split")
    ap.add_argument("--results", default="results/cllm4rec_ml100k.json", help="records to check against")
    ap.add_argument("--out", default="results/cllm4rec_paired.json")
    ap.add_argument(
        "--arm",
        action="append",
        default=[],
        help="NAME=MEMBER,MEMBER: the seeds of one setting (run directories or baseline names), averaged "
        "per user; repeatable",
    )
    args = parse_args(ap, argv)
    baselines = [b for b in args.baselines.split(",") if b]
    arm_specs = parse_arms(args.arm, baselines)
    runs = [Path(p) for p in args.runs.split(",") if p]
    for members in arm_specs.values():
        runs += [Path(m) for m in members if m not in baselines and Path(m) not in runs]
    for run in runs:
        if not (run / "config.yaml").is_file() or not (run / "model.safetensors").is_file():
            raise SystemExit(f"{run}: not a finished CLLM4Rec run (config.yaml and model.safetensors needed)")
    unknown = sorted(set(baselines) - set(BASELINES))
    if unknown:
        raise SystemExit(f"--baselines: only pop and bprmf are retrained here, not {unknown}")
    scored = []
    if baselines:
        dataset, split = pipeline.load_data(load_config(CLLM4RecConfig, args.config))
        scored = [score_baseline(b, dataset, split) for b in baselines]
    results = Path(args.results)
    scored += [score_run(run) for run in runs]
    if len(scored) < 2:
        raise SystemExit("nothing to compare: name at least two methods (--runs, --baselines)")
    keys = baselines + [str(r) for r in runs]  # the order of ``scored``
    arms = {n: [keys.index(m if m in baselines else str(Path(m))) for m in ms] for n, ms in arm_specs.items()}
    doc = compare(scored, results, script_command("benchmarks/cllm4rec_paired.py", argv), arms)
    atomic_write_json(Path(args.out), doc)
    for prefix, section in (("", "paired"), ("arms ", "paired_arms")):
        for pair, diffs in doc.get(section, {}).items():
            d = diffs["Recall@20"]
            print(f"{prefix}{pair}: Recall@20 {d['diff']:+.4f} ± {d['se']:.4f} (SE over {d['n']} users)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
