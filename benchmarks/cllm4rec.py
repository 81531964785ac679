"""CLLM4Rec on the embedded ML-100K against pop / BPR-MF / SASRec -> ``results/cllm4rec_ml100k.json``.

Protocols (every method sees the same splits, histories and candidates):

- ``holdout``: the last 20% of every user's interactions by time (at least one) is a held-out *set*;
  full ranking over all items with seen items excluded; Recall@20, Recall@40, NDCG@100 (CLLM4Rec's
  metrics; Recall truncated by min(K, |targets|)). A time-ordered rather than random hold-out so that
  the sequential baseline is not trained on the future.
- ``loo``: the shared leave-one-out split: full-ranking HR@10 / NDCG@10 of the test item and HR@1 among
  the shared 20 candidates.

CLLM4Rec variants, each trained to convergence (early stopping on the split's validation Recall@20) with
every seed of ``--seeds`` (2 by default, so that a difference can be told from noise): ``cllm4rec``
(the paper's setting), ``cllm4rec-no-content`` (no content LM in either stage, and so no regulariser:
it would only pull the tables towards their random initialisation), ``cllm4rec-no-mutual`` (content LM
trained, mutual regulariser λ = 0). Items are scored by the collaborative tables alone and λ = 0 cuts the
content side's only path to them, so ``no-mutual`` must reproduce ``no-content``'s scores for the same seed
(tested): it checks that, and ``cllm4rec`` minus ``no-content`` is what the content LM contributes. Each runs the same pipeline as ``recalign cllm4rec
run`` (the equivalent CLI command is stored in each record's ``extra.cli``), in its own resumable run
directory (``<runs>/<variant>-s<seed>-<split>``), so an interrupted benchmark picks up where it stopped.
Records carry the backbone, its depth, every setting that differs from the default and the curves.

The holdout split is built from the config's ``data`` section (with its validation stage: the
baselines train on the same interactions as CLLM4Rec). SASRec on ``holdout`` trains for the number of
epochs that early stopping chose on ``loo``'s validation stage of the same dataset.

Usage::

    python benchmarks/cllm4rec.py [--runs runs/cllm4rec] [--only cllm4rec,bprmf] [--splits holdout,loo]
        [--seeds 0,1] [--suffix p10] [key=value ...]   # overrides applied to every CLLM4Rec variant

Results are merged into the JSON after every run, replacing records with the same
(split, protocol, method, seed), so methods can be (re)run one at a time.
"""

from __future__ import annotations

import argparse
import fcntl
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

from recalign.config import load_config
from recalign.evaluation.records import ResultRecord, read_records, script_command, write_records
from recalign.logs import parse_args
from recalign.methods.cllm4rec import pipeline
from recalign.methods.cllm4rec.config import CLLM4RecConfig

CONFIG = "configs/cllm4rec_ml100k.yaml"
VARIANTS = {
    "cllm4rec": [],
    # without a content LM the regulariser would only pull the tables towards their random init: off too
    "cllm4rec-no-content": [
        "pretrain.content_ratio=0",
        "finetune.content_ratio=0",
        "pretrain.mutual_lambda=0",
        "finetune.mutual_lambda=0",
    ],
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
        keys = {(r.split, r.protocol, r.method, r.seed) for r in new}
        kept = [r for r in old if (r.split, r.protocol, r.method, r.seed) not in keys]
        order = {m: i for i, m in enumerate([*VARIANTS, *BASELINES])}
        rows = sorted(
            [*kept, *new],
            key=lambda r: (r.split != "holdout", order.get(r.method, 99), r.method, r.seed, r.protocol),
        )
        write_records(path, rows)


def run_variant(
    name: str,
    split: str,
    runs: Path,
    overrides: list[str],
    command: str,
    seed: int = 0,
    suffix: str = "",
    config: str = CONFIG,
    pretrain_from: str = "",
) -> list[ResultRecord]:
    over = [*VARIANTS[name], f"method={name}{suffix}", f"data.split={split}", f"seed={seed}", *overrides]
    cfg = load_config(CLLM4RecConfig, config, over)
    out = runs / f"{name}{suffix}-s{seed}-{split}"
    cli = f"recalign cllm4rec run --config {config} --output {out} " + " ".join(shlex.quote(o) for o in over)
    print(f"== {name} seed {seed} on {split}: {cli}", flush=True)
    if pretrain_from:  # same seed/data/model/pretrain settings: start from that run's pretrained tables
        source = Path(pretrain_from.format(name=name, seed=seed, split=split))
        print(f"   pretraining reused from {source}", flush=True)
        pipeline.reuse_pretrain(cfg, source, out)
    pipeline.pretrain(cfg, out)
    pipeline.finetune(cfg, out)
    records = pipeline.evaluate(cfg, out)
    for r in records:
        r.command = command
        r.extra["cli"] = cli
        r.extra["run_dir"] = str(out)
        r.extra["variant_overrides"] = list(VARIANTS[name])
    return records


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


def variant_suffix(text: str) -> str:
    """The suffix as it is appended: ``p10`` and ``-p10`` both give ``-p10`` (empty stays empty).

    Taking it without the dash matters because argparse reads ``--suffix -p10`` as a new option; the
    dashed form still works when written ``--suffix=-p10``, so earlier commands give the same names.
    """
    return "" if not text else text if text.startswith("-") else f"-{text}"


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
        type=variant_suffix,
        help="appended after a dash to variant method names and run dirs (--suffix p10 -> "
        "cllm4rec-p10; with pretrain.epochs=10 it is the ablation budget)",
    )
    ap.add_argument(
        "--pretrain-from",
        default="",
        help="reuse the finished pretraining of another run directory (a pattern with {name}, {seed}, "
        "{split}), e.g. runs/cllm4rec/{name}-p10-s{seed}-{split}: a fine-tuning ablation without "
        "pretraining again; its pretraining settings must be the same",
    )
    ap.add_argument("--seeds", default="0,1", help="comma-separated seeds of every CLLM4Rec variant")
    ap.add_argument(
        "--config", default=CONFIG, help="CLLM4Rec config (its data section: every method's split)"
    )
    ap.add_argument("overrides", nargs="*", help="key=value overrides for every CLLM4Rec variant")
    args = parse_args(ap, argv)  # -v: library output, quiet otherwise
    command = script_command("benchmarks/cllm4rec.py", argv)
    torch.set_num_threads(1)
    only = [m for m in args.only.split(",") if m]
    splits = [s for s in args.splits.split(",") if s]
    plan: dict[str, list[str]] = {}
    for part in args.variant_splits.split(";"):
        k, _, v = part.partition(":")
        plan[k] = v.split(",")
    results, runs = Path(args.results), Path(args.runs)
    seeds = [int(x) for x in args.seeds.split(",") if x]
    return _run(
        only,
        splits,
        plan,
        results,
        runs,
        args.overrides,
        command,
        args.suffix,
        seeds,
        args.config,
        args.pretrain_from,
    )


def _run(
    only,
    splits,
    plan,
    results,
    runs,
    overrides,
    command,
    suffix="",
    seeds=(0,),
    config=CONFIG,
    pretrain_from="",
) -> int:
    from recalign.data.splits import build_split

    # the baselines' hold-out split is the one the CLLM4Rec runs build (their data section, same code)
    cfg = load_config(CLLM4RecConfig, config, [*overrides, "data.split=holdout"])
    dataset, holdout = pipeline.load_data(cfg)
    split_objs = {"holdout": holdout, "loo": build_split(dataset, "loo", seed=cfg.data.split_seed)}
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
            if split not in splits:
                continue
            for seed in seeds if split == "holdout" else seeds[:1]:  # loo: the main variant, one seed
                merge(
                    results,
                    run_variant(name, split, runs, overrides, command, seed, suffix, config, pretrain_from),
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
