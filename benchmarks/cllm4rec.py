"""CLLM4Rec on the embedded ML-100K against pop / BPR-MF / SASRec -> ``results/cllm4rec_ml100k.json``.

Protocols (every method sees the same splits, histories and candidates):

- ``holdout``: the last 20% of every user's interactions by time (at least one) is a held-out *set*;
  full ranking over all items with seen items excluded; Recall@20, Recall@40, NDCG@100 (CLLM4Rec's
  metrics; Recall truncated by min(K, |targets|)). A time-ordered rather than random hold-out so that
  the sequential baseline is not trained on the future.
- ``loo``: the shared leave-one-out split: full-ranking HR@10 / NDCG@10 of the test item and HR@1 among
  the shared 20 candidates.

CLLM4Rec variants (same budget each): ``cllm4rec`` (full), ``cllm4rec-no-content`` (no content LM),
``cllm4rec-no-mutual`` (content LM trained, mutual regulariser λ = 0). Each runs the same pipeline as
``recalign cllm4rec run`` (the equivalent CLI command is stored in each record's ``extra.cli``), in its
own resumable run directory, so an interrupted benchmark picks up where it stopped.

SASRec on ``holdout`` (which has no validation stage) trains for the number of epochs that early
stopping chose on ``loo``'s validation stage of the same dataset.

Usage::

    python benchmarks/cllm4rec.py [--runs runs/cllm4rec] [--only cllm4rec,bprmf] [--splits holdout,loo]
        [key=value ...]   # overrides applied to every CLLM4Rec variant

Results are merged into the JSON after every method, replacing records with the same
(split, protocol, method), so methods can be (re)run one at a time.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from recalign.config import load_config
from recalign.evaluation.records import ResultRecord, read_records, write_records
from recalign.io import atomic_write_json
from recalign.methods.cllm4rec import pipeline
from recalign.methods.cllm4rec.config import CLLM4RecConfig
from recalign.methods.cllm4rec.protocol import holdout_split

CONFIG = "configs/cllm4rec_ml100k.yaml"
VARIANTS = {
    "cllm4rec": [],
    "cllm4rec-no-content": ["pretrain.content_ratio=0", "finetune.content_ratio=0"],
    "cllm4rec-no-mutual": ["pretrain.mutual_lambda=0", "finetune.mutual_lambda=0"],
}
BASELINES = ("pop", "bprmf", "sasrec")


def merge(path: Path, new: list[ResultRecord]) -> None:
    """Read-modify-write of the results file under an exclusive lock (several benchmark processes,
    e.g. ``--only cllm4rec`` and ``--only pop,bprmf,sasrec``, may run side by side)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(Path(tempfile.gettempdir()) / f"recalign-{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        old = read_records(path) if path.is_file() else []
        keys = {(r.split, r.protocol, r.method) for r in new}
        kept = [r for r in old if (r.split, r.protocol, r.method) not in keys]
        order = {m: i for i, m in enumerate([*VARIANTS, *BASELINES])}
        rows = sorted(
            [*kept, *new], key=lambda r: (r.split != "holdout", order.get(r.method, 99), r.protocol)
        )
        write_records(path, rows)


def run_variant(
    name: str, split: str, runs: Path, overrides: list[str], command: str, suffix: str = ""
) -> list[ResultRecord]:
    over = [*VARIANTS[name], f"method={name}{suffix}", f"data.split={split}", *overrides]
    cfg = load_config(CLLM4RecConfig, CONFIG, over)
    out = runs / f"{name}{suffix}-{split}"
    cli = f"recalign cllm4rec run --config {CONFIG} --output {out} " + " ".join(shlex.quote(o) for o in over)
    print(f"== {name} on {split}: {cli}", flush=True)
    pipeline.pretrain(cfg, out)
    pipeline.finetune(cfg, out)
    records = pipeline.evaluate(cfg, out)
    for r in records:
        r.command = command
        r.extra["cli"] = cli
        r.extra["run_dir"] = str(out)
    return records


def run_curve(spec: str, runs: Path, overrides: list[str], command: str, results: Path) -> None:
    """Longer fine-tuning of a finished holdout variant, as evidence of where more compute leads.

    ``spec`` is ``variant:200,300``: for each length, the longest *finished* shorter run of that variant
    (its base run, or an earlier point of the curve) is copied — pretrained tables and the fine-tuning
    checkpoint at its last step — and fine-tuning *continues* to the new length, which equals an
    uninterrupted run of that length because resumption is exact. A point interrupted midway resumes
    from its own checkpoint. Each point is evaluated, merged into the results as ``<variant>-ft<steps>``.
    """
    name, _, steps = spec.partition(":")
    for n in [int(x) for x in steps.split(",") if x]:
        # continue from the longest finished run shorter than n (the base run is 'ft<finetune.steps>')
        done = sorted(
            (int(d.name.rsplit("-ft", 1)[1]), d)
            for d in runs.glob(f"{name}-holdout-ft*")
            if (d / "model.safetensors").is_file() and int(d.name.rsplit("-ft", 1)[1]) < n
        )
        src = done[-1][1] if done else runs / f"{name}-holdout"
        over = [
            *VARIANTS[name],
            f"method={name}-ft{n}",
            "data.split=holdout",
            *overrides,
            f"finetune.steps={n}",
        ]
        cfg = load_config(CLLM4RecConfig, CONFIG, over)
        out = runs / f"{name}-holdout-ft{n}"
        if (
            not (out / "model.safetensors").is_file()
            and not (out / "checkpoints" / "finetune" / "state.json").is_file()
        ):
            out.mkdir(parents=True, exist_ok=True)
            for f in ("pretrain.safetensors", "pretrain_log.json"):
                shutil.copy2(src / f, out / f)
            shutil.copytree(
                src / "checkpoints" / "finetune", out / "checkpoints" / "finetune", dirs_exist_ok=True
            )
            state = out / "checkpoints" / "finetune" / "state.json"
            meta = json.loads(state.read_text())
            if "seconds" not in meta:  # written before stage time was checkpointed: take it from the log
                meta["seconds"] = json.loads((src / "finetune_log.json").read_text())["seconds"]
                atomic_write_json(state, meta)
        print(f"== {name}: fine-tuning continued to {n} steps in {out}", flush=True)
        pipeline.finetune(cfg, out)
        recs = pipeline.evaluate(cfg, out)
        for r in recs:
            r.command = command
            r.extra["cli"] = (
                f"(continued from {src}) recalign cllm4rec finetune/evaluate --config {CONFIG} --output {out} "
                + " ".join(shlex.quote(o) for o in over)
            )
            r.extra["run_dir"] = str(out)
        merge(results, recs)


def run_baseline(
    name: str, dataset, split, command: str, sasrec_epochs: dict, results: Path
) -> list[ResultRecord]:
    from recalign.baselines import make_baseline

    if name == "sasrec" and split.name == "holdout" and "loo" not in sasrec_epochs and results.is_file():
        # loo's SASRec already ran in an earlier invocation: reuse the epoch its early stopping chose
        for r in read_records(results):
            if (r.method, r.split) == ("sasrec", "loo") and "best_epoch" in r.extra:
                sasrec_epochs["loo"] = int(r.extra["best_epoch"])

    over: dict = {} if name == "pop" else {"threads": 1}
    if name == "sasrec" and split.name == "holdout":
        over.update(epochs=sasrec_epochs.get("loo", 200), early_stopping=False)
    rec = make_baseline(name, progress=True, **over)
    t = time.time()
    rec.fit(dataset, split)
    fit = time.time() - t
    info = getattr(rec, "fit_info", {}) or {}
    if name == "sasrec" and split.name == "loo":
        sasrec_epochs["loo"] = int(info.get("best_epoch", 200))
    extra = {
        "config": over,
        **{k: v for k, v in info.items() if k in ("best_epoch", "epochs_run", "final_loss")},
    }
    return pipeline.evaluate_recommender(rec, split, command=command, fit_seconds=fit, extra=extra)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", default="runs/cllm4rec", help="directory of the CLLM4Rec run directories")
    ap.add_argument("--results", default="results/cllm4rec_ml100k.json")
    ap.add_argument("--only", default="", help="comma-separated methods to run (default: all)")
    ap.add_argument("--splits", default="holdout,loo", help="comma-separated splits")
    ap.add_argument(
        "--variant-splits", default="cllm4rec:holdout,loo;*:holdout", help="which splits each variant runs on"
    )
    ap.add_argument(
        "--suffix",
        default="",
        help="appended to variant method names and run dirs (e.g. -L30 with model.num_layers=null)",
    )
    ap.add_argument(
        "--curve",
        default="",
        help="variant:steps,... continue a finished holdout run's fine-tuning (evidence)",
    )
    ap.add_argument("overrides", nargs="*", help="key=value overrides for every CLLM4Rec variant")
    args = ap.parse_args(argv)
    command = " ".join(shlex.quote(a) for a in ["python", *sys.argv])
    torch.set_num_threads(1)
    only = [m for m in args.only.split(",") if m]
    splits = [s for s in args.splits.split(",") if s]
    plan: dict[str, list[str]] = {}
    for part in args.variant_splits.split(";"):
        k, _, v = part.partition(":")
        plan[k] = v.split(",")
    results, runs = Path(args.results), Path(args.runs)
    if args.curve:
        run_curve(args.curve, runs, args.overrides, command, results)
        return 0
    return _run(only, splits, plan, results, runs, args.overrides, command, args.suffix)


def _run(only, splits, plan, results, runs, overrides, command, suffix="") -> int:
    from recalign.data.loaders import load_dataset
    from recalign.data.splits import build_split

    dataset = load_dataset("ml-100k")
    split_objs = {"holdout": holdout_split(dataset, 0.2, seed=0), "loo": build_split(dataset, "loo", seed=0)}
    sasrec_epochs: dict = {}
    # baselines first on loo (SASRec's epoch count for holdout comes from loo's early stopping)
    for split in sorted(splits, key=lambda s: s != "loo"):
        for name in BASELINES:
            if only and name not in only:
                continue
            print(f"== {name} on {split}", flush=True)
            merge(results, run_baseline(name, dataset, split_objs[split], command, sasrec_epochs, results))
    for name in VARIANTS:
        if only and name not in only:
            continue
        for split in plan.get(name, plan.get("*", [])):
            if split in splits:
                merge(results, run_variant(name, split, runs, overrides, command, suffix))
    return 0


if __name__ == "__main__":
    sys.exit(main())
