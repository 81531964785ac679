"""Recommendation-knowledge alignment on ML-100K: recommendation tasks only vs + auxiliary tasks.

Every variant fine-tunes SmolLM2 (LoRA) for the *same number of optimiser steps on the same number of
examples* (``training.max_steps x training.batch_size``); only the task mixture differs:

- ``knowledge-rec``      retrieval, ranking, rating (1:1:1)
- ``knowledge-rec+aux``  MIM, MLM, BPR, retrieval, ranking, rating (1:1:1:1:1:1)
- ``knowledge-rec+mim`` / ``+mlm`` / ``+bpr``  one auxiliary task added (1:1:1:1) -- the ablation
- ``zeroshot`` (only when listed in ``--variants``): the untrained model, same users and task prompts
- ``rec-ids``  the recommendation tasks in the P5-style form (``rec_form=ids``: ``user_<id>``, ``item_<id>``)
  instead of Cao et al.'s "more informative" one (titles, no user id) -- the ablation of that form
- ``pop`` / ``sasrec`` (only when listed): classical references on the same sampled users -- the full
  protocol on retrieval's users, the candidate protocol (the ranking task's shared 20 candidates) on
  ranking's users -- so the LM's retrieval and ranking numbers have a yardstick (SASRec: 30 epochs,
  patience 5, as ``benchmarks/baselines.py``)
- ``rating-refs`` (only when listed): non-LM rating references on exactly the rating task's users, the
  training ratings' global mean and a damped user/item-bias baseline (RMSE/MAE)

``--seeds 0,1`` runs the two main variants once per training seed (``training.seed``: adapter
initialisation and data order; the task data and evaluation users stay those of ``seed``), run
directories ``<variant>-seed<s>``, records with ``extra.training_seed``.

The ranking task trains with the candidate count and history length it is evaluated with
(``train_candidates: 0`` = the split's 20, ``history_len`` for both); every LM record says so
(``train_candidates``, ``eval_candidates``, ``history_len``, ``rec_form``).

Each variant is evaluated on the same seeded test users (retrieval by exact full ranking of the
catalogue, ranking on the shared 20 candidates, rating RMSE/MAE; the main two also on the shared
next-item protocol). Results are written after every variant (so an interrupted run keeps what finished;
a re-run skips variants whose run directory already has records.json), in the quality shape, to
``--output``. Run in the background on a shared CPU, e.g.::

    nohup .venv/bin/python benchmarks/knowledge.py --seeds 0,1 \\
        --variants rec,rec+aux,rec-ids,zeroshot,rating-refs,pop,sasrec \\
        --ablation-eval '[ranking,rating]' --output results/knowledge_ml100k.json > runs/knowledge_bench.log 2>&1 &
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

VARIANTS = {
    "rec": (["retrieval", "ranking", "rating"], [1, 1, 1]),
    "rec+aux": (["mim", "mlm", "bpr", "retrieval", "ranking", "rating"], [1, 1, 1, 1, 1, 1]),
    "rec+mim": (["mim", "retrieval", "ranking", "rating"], [1, 1, 1, 1]),
    "rec+bpr": (["bpr", "retrieval", "ranking", "rating"], [1, 1, 1, 1]),
    "rec+mlm": (["mlm", "retrieval", "ranking", "rating"], [1, 1, 1, 1]),
    "rec-ids": (["retrieval", "ranking", "rating"], [1, 1, 1]),  # + rec_form=ids
}
#: Overrides a variant adds to the config.
VARIANT_OVERRIDES = {"rec-ids": ["rec_form=ids", "method=knowledge-rec-ids"]}
MAIN = ("rec", "rec+aux")
BASELINE_OVERRIDES = {"pop": {}, "sasrec": {"epochs": 30, "patience": 5}}


def baseline(name: str, cfg, data, run: Path, command: str) -> list:
    """A classical recommender fitted on the split's training sequences, evaluated on exactly the users
    the LM variants are evaluated on: full ranking (retrieval's sample) and the shared candidates (ranking's)."""
    from recalign.baselines import make_baseline
    from recalign.evaluation.protocols import evaluate_candidates, evaluate_full
    from recalign.evaluation.records import ResultRecord, write_records
    from recalign.methods import sample_examples, set_threads

    set_threads(cfg.threads)
    t0 = time.perf_counter()
    model = make_baseline(name, **BASELINE_OVERRIDES[name]).fit(data.dataset, data.split)
    fit_seconds = time.perf_counter() - t0
    stage = data.split.stage(cfg.eval.stage)
    records = []
    for task, protocol, n, evaluate in (
        ("retrieval", "full", cfg.eval.n_users_full, evaluate_full),
        ("ranking", "candidates", cfg.eval.n_users, evaluate_candidates),
    ):
        rows = sample_examples(stage, n, cfg.seed, stage=cfg.eval.stage)
        t1 = time.perf_counter()
        metrics = evaluate(model, rows, ks=cfg.eval.ks)
        records.append(
            ResultRecord(
                dataset=data.dataset.name,
                split=data.split.name,
                protocol=protocol,
                method=name,
                metrics=metrics,
                n_examples=len(rows),
                seed=cfg.seed,
                seconds=round(fit_seconds + time.perf_counter() - t1, 2),
                command=command,
                extra={"task": task, **BASELINE_OVERRIDES[name]},
            )
        )
        print(f"{name} [{task}] {metrics}", flush=True)
    write_records(run / "records.json", records)
    return records


def rating_refs(cfg, data, run: Path, command: str) -> list:
    """Global mean and user/item-bias rating references on the rating task's evaluation rows."""
    from recalign.evaluation.records import ResultRecord, write_records
    from recalign.methods import sample_examples
    from recalign.methods.knowledge.evaluation import evaluate_rating_references
    from recalign.methods.knowledge.tasks import KnowledgeTasks, TaskOptions

    t0 = time.perf_counter()
    tasks = KnowledgeTasks(data.dataset, data.split, TaskOptions(history_len=cfg.history_len, seed=cfg.seed))
    stage = data.split.stage(cfg.eval.stage)
    rows = sample_examples(stage, cfg.eval.n_users_rating, cfg.seed, stage=cfg.eval.stage)
    records = []
    for name, r in evaluate_rating_references(tasks, rows, cfg.eval.stage).items():
        records.append(
            ResultRecord(
                dataset=data.dataset.name,
                split=data.split.name,
                protocol="rating",
                method=name,
                metrics=r.metrics,
                n_examples=r.n_examples,
                seed=cfg.seed,
                seconds=round(time.perf_counter() - t0, 2),
                command=command,
                extra={"task": "rating", **r.details[0]},
            )  # fmt: skip
        )
        print(f"{name} [rating] {r.metrics}", flush=True)
    write_records(run / "records.json", records)
    return records


def zeroshot(cfg, data, run: Path, eval_tasks: str, command: str) -> list:
    """The untrained base model on the same test users and task prompts: what the steps bought."""
    import time

    from recalign.evaluation.records import ResultRecord, write_records
    from recalign.lm.lora import load_lm, resolve_dtype
    from recalign.methods import set_threads
    from recalign.methods.knowledge import evaluation as ev
    from recalign.methods.knowledge.recipe import SCORED_TASKS, evaluate_scored_task
    from recalign.methods.knowledge.tasks import KnowledgeTasks, TaskOptions

    set_threads(cfg.threads)
    model, tok, _ = load_lm(cfg.model, dtype=resolve_dtype(cfg.dtype))
    tasks = KnowledgeTasks(
        data.dataset,
        data.split,
        TaskOptions(history_len=cfg.history_len, seed=cfg.seed, rec_form=cfg.rec_form),
    )
    scorer = ev.TaskScorer(model, tok, chunk_size=cfg.eval.chunk_size)
    stage = data.split.stage(cfg.eval.stage)
    records = []
    for task in eval_tasks.strip("[]").split(","):
        t0 = time.perf_counter()
        if task in SCORED_TASKS:
            r = evaluate_scored_task(scorer, tasks, task, stage, cfg.eval, cfg.seed)
        else:
            continue
        records.append(
            ResultRecord(
                dataset=data.dataset.name,
                split=data.split.name,
                protocol=r.protocol,
                method="zeroshot",
                metrics=r.metrics,
                n_examples=r.n_examples,
                seed=cfg.seed,
                seconds=round(time.perf_counter() - t0, 2),
                command=command,
                extra={"task": task, "model": cfg.model, "train_steps": 0},
            )
        )
        print(f"zeroshot [{task}] {r.metrics}", flush=True)
    write_records(run / "records.json", records)
    return records


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(REPO / "configs" / "knowledge_ml100k.yaml"))
    p.add_argument("--output", default=str(REPO / "results" / "knowledge_ml100k.json"))
    p.add_argument("--run-dir", default=str(REPO / "runs" / "knowledge_bench"))
    p.add_argument("--variants", default=",".join(VARIANTS), help="in order of priority")
    p.add_argument(
        "--ablation-eval",
        default="[ranking,rating]",
        help="eval.tasks of the ablation variants (the main two use the config's)",
    )
    p.add_argument(
        "--seeds",
        default="",
        help="training seeds for the main variants (rec, rec+aux), e.g. 0,1; empty: the config's only",
    )
    p.add_argument(
        "overrides", nargs="*", help="config overrides for every variant, e.g. training.max_steps=4"
    )
    from recalign.evaluation.records import script_command
    from recalign.logs import parse_args as quiet_parse_args

    args = quiet_parse_args(p, argv)
    command = script_command("benchmarks/knowledge.py", argv)

    from recalign.config import load_config
    from recalign.evaluation.records import read_records, write_records
    from recalign.methods import load_data
    from recalign.methods.knowledge.recipe import KnowledgeConfig, run_knowledge

    base = load_config(KnowledgeConfig, args.config, args.overrides)
    data = load_data(base.data)
    records = []
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    jobs = []  # (variant, run-dir name, extra overrides)
    for name in [v.strip() for v in args.variants.split(",") if v.strip()]:
        if name in MAIN and seeds:
            jobs.extend((name, f"{name}-seed{s}", [f"training.seed={s}"]) for s in seeds)
        else:
            jobs.append((name, name, []))
    for name, dirname, seed_over in jobs:
        tasks, ratios = VARIANTS.get(name, ([], []))
        run = Path(args.run_dir) / dirname
        if name == "rating-refs" and not (run / "records.json").is_file():
            records.extend(rating_refs(base, data, run, command))
        elif name == "zeroshot" and not (run / "records.json").is_file():
            records.extend(zeroshot(base, data, run, args.ablation_eval, command))
        elif name in BASELINE_OVERRIDES and not (run / "records.json").is_file():
            records.extend(baseline(name, base, data, run, command))
        elif (run / "records.json").is_file():
            print(f"[{name}] already done, reusing {run}/records.json", flush=True)
            records.extend(read_records(run / "records.json"))
        else:
            if not tasks:
                raise SystemExit(f"unknown variant {name!r}")
            over = (
                list(args.overrides)
                + seed_over
                + VARIANT_OVERRIDES.get(name, [])
                + [
                    f"tasks=[{','.join(tasks)}]",
                    f"ratios=[{','.join(map(str, ratios))}]",
                ]
            )
            if name not in MAIN:
                over.append(f"eval.tasks={args.ablation_eval}")
            cfg = load_config(KnowledgeConfig, args.config, over)
            t0 = time.perf_counter()
            res = run_knowledge(cfg, run, data=data, command=command)
            print(f"[{name}] {time.perf_counter() - t0:.0f}s, train loss {res.train_loss:.3f}", flush=True)
            records.extend(res.records)
        write_records(args.output, records, command=command)
        done = sorted({r.method for r in records})
        print(f"wrote {args.output} ({len(records)} records; variants done: {done})", flush=True)

    print("\nmethod | task | metrics")
    for r in records:
        keys = ("HR@10", "NDCG@10", "HR@1", "RMSE", "MAE", "AUC")
        shown = ", ".join(f"{k}={r.metrics[k]:.4f}" for k in keys if k in r.metrics)
        print(f"{r.method} | {r.extra.get('task')} (n={r.n_examples}) | {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
