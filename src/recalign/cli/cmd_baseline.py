"""``recalign baseline``: train and evaluate a classical baseline on a split.

    recalign baseline --method sasrec --dataset ml-100k --split loo --output runs/sasrec [epochs=50 ...]

The split is either built here (``--split``, candidate sets seeded by ``--seed``) or read from a directory
written by ``recalign data prepare`` / :meth:`Split.save` (``--prepared DIR``), so that the baseline sees
the same examples and candidates as every other method. With ``--prepared`` and no ``--dataset``, the
dataset is rebuilt from the ``config.yaml`` that ``recalign data prepare`` saved there (same loader and
filters); either way the split is checked against the dataset. Writes to ``--output``:

- ``metrics.json``: flat test metrics of both protocols (``"candidates/HR@1"``, ``"full/NDCG@10"``, ...)
  plus run metadata (method, dataset, split, seed, seconds, command);
- ``records.json``: the same results as result records (``recalign report`` reads them);
- ``config.yaml``: the resolved model config, to reproduce the run;
- ``fit.json``: what training did (epochs run, best epoch, per-epoch loss and validation metric).

``--seed`` seeds the candidate sets of a split built here and is the model's seed unless the YAML file
or a ``seed=`` override sets one.

The baselines train in one process (small models with loops of their own; a 2-core laptop trains SASRec
on ML-100K in minutes). Launched with several processes (``accelerate launch``), only the main process
runs; the others say so on stderr and exit with code 0, so nothing is computed or written twice.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from recalign.config import describe_config, parse_overrides, read_yaml, save_config
from recalign.data.splits import SPLITS, Split, build_split
from recalign.errors import RecalignInputError
from recalign.evaluation.records import current_command, write_records
from recalign.io import atomic_write_json

METHODS = ("pop", "bprmf", "sasrec", "gru4rec")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "baseline",
        help="train and evaluate a classical baseline (pop, bprmf, sasrec, gru4rec)",
        description="Train a classical baseline on a split and evaluate it on the test stage "
        "(20-candidate ranking and full ranking with seen items excluded).",
    )
    p.add_argument("--method", choices=METHODS, required=True, help="which baseline")
    p.add_argument(
        "--dataset",
        default=None,
        help="dataset name (default: the embedded ml-100k, or what --prepared was prepared from)",
    )
    p.add_argument("--data-path", default=None, help="file or directory of the dataset, if not embedded")
    p.add_argument("--split", choices=SPLITS, default=None, help="split protocol to build (default loo)")
    p.add_argument(
        "--prepared", default=None, help="directory of a prepared split (split.json + examples.parquet)"
    )
    p.add_argument("--seed", type=int, default=0, help="candidate-set seed, and the model seed by default")
    p.add_argument("--config", default=None, help="YAML file with model config fields")
    p.add_argument(
        "--protocols", default="candidates,full", help="comma-separated: candidates, full (default both)"
    )
    p.add_argument("--output", default=None, help="directory for metrics.json, records.json, config.yaml")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--help-config", action="store_true", help="list the method's config fields and exit")
    p.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides, e.g. epochs=50 lr=0.002"
    )
    p.set_defaults(func=run)


def _load_dataset(args: argparse.Namespace):
    """The dataset named on the command line, or the one a prepared split was built from.

    ``recalign data prepare`` saves its resolved config (loader, path, options, preprocessing) next to
    the split; reusing it reproduces the exact filtered dataset, which training needs.
    """
    prep_cfg = Path(args.prepared) / "config.yaml" if args.prepared else None
    if prep_cfg is not None and prep_cfg.is_file() and args.dataset is None and args.data_path is None:
        from recalign.config import load_config
        from recalign.data.prepare import DataPrepareConfig, load_from_config
        from recalign.data.preprocess import preprocess

        cfg = load_config(DataPrepareConfig, prep_cfg)
        return preprocess(load_from_config(cfg), cfg.preprocess)[0]
    from recalign.data.loaders import load_dataset

    return load_dataset(args.dataset or "ml-100k", args.data_path)


def _load_split(args: argparse.Namespace, dataset) -> Split:
    if args.prepared:
        split = Split.load(args.prepared)
        if args.split and args.split != split.name:
            raise RecalignInputError(
                f"--split {args.split} but the prepared split is '{split.name}'", source=args.prepared
            )
        check_prepared_matches(split, dataset, args.prepared)
        return split
    return build_split(dataset, args.split or "loo", seed=args.seed)


def check_prepared_matches(split: Split, dataset, source: str | Path) -> None:
    """A prepared split must come from the same (identically preprocessed) dataset.

    Models train on ``split.train_sequences(dataset)``, which indexes the dataset's sequences by the
    split's user and item indices; a split prepared with other filtering would silently train on the
    wrong items. Checked: item count, user count, and that every test history is the dataset's sequence
    prefix.
    """
    if split.n_items != dataset.n_items:
        raise RecalignInputError(
            f"prepared split has {split.n_items} items, dataset '{dataset.name}' has {dataset.n_items} "
            "(prepared with different preprocessing? pass the same dataset and filters)",
            source=source,
        )
    seqs = dataset.sequences()
    test = split.stage("test")
    if len(test) and int(test["user"].max()) >= len(seqs):
        raise RecalignInputError(
            f"prepared split has users beyond the dataset's {len(seqs)} users", source=source
        )
    for u, p, h in zip(test["user"], test["position"], test["history"]):
        s = seqs[int(u)]
        if len(s) < int(p) or not np.array_equal(s[: int(p)], h):
            raise RecalignInputError(
                f"prepared split does not match dataset '{dataset.name}' (user {int(u)}'s history differs); "
                "was it prepared with different preprocessing?",
                source=source,
            )


def run(args: argparse.Namespace) -> int:
    from recalign.baselines import baseline_config_class, load_baseline_config
    from recalign.baselines.runner import flat_metrics, run_baseline

    cls = baseline_config_class(args.method)
    if args.help_config:
        print("\n".join(describe_config(cls)))
        return 0
    if not args.output:
        raise RecalignInputError("--output DIR is required", source="command line")
    from recalign.rundir import open_output_dir
    from recalign.training import distributed

    open_output_dir(args.output)  # before training: not a file, writable, not held by another run

    if not distributed.is_main():
        print(
            f"recalign baseline: process {distributed.rank()} of {distributed.world_size()} exits; "
            "baselines train in the main process only",
            file=sys.stderr,
        )
        return 0
    protocols = [p.strip() for p in args.protocols.split(",") if p.strip()]
    overrides = list(args.overrides)
    yaml_seed = args.config is not None and "seed" in read_yaml(args.config)
    if "seed" not in parse_overrides(overrides) and not yaml_seed:
        overrides = [f"seed={args.seed}", *overrides]
    config = load_baseline_config(args.method, args.config, overrides)

    t0 = time.perf_counter()
    dataset = _load_dataset(args)
    split = _load_split(args, dataset)
    command = current_command()
    run_ = run_baseline(
        args.method,
        dataset,
        split,
        config,
        protocols=protocols,
        command=command,
        progress=not args.no_progress,
    )
    seconds = time.perf_counter() - t0

    out = Path(args.output)
    metrics = {
        "method": args.method,
        "dataset": split.dataset,
        "split": split.name,
        "seed": config.seed,
        "split_seed": split.seed,
        "n_examples": run_.records[0].n_examples,
        "seconds": round(seconds, 3),
        "fit_seconds": round(run_.fit_seconds, 3),
        "command": command,
        **flat_metrics(run_.records),
    }
    atomic_write_json(out / "metrics.json", metrics)
    write_records(out / "records.json", run_.records, command=command)
    save_config(config, out / "config.yaml")
    atomic_write_json(out / "fit.json", run_.fit_info)

    for r in run_.records:
        shown = ", ".join(
            f"{k} {r.metrics[k]:.4f}" for k in ("HR@1", "HR@10", "NDCG@5", "NDCG@10") if k in r.metrics
        )
        print(f"{args.method} {split.dataset}/{split.name}/{r.protocol} (n={r.n_examples}): {shown}")
    print(f"wrote {out / 'metrics.json'}, records.json, config.yaml ({seconds:.1f}s)", file=sys.stderr)
    return 0
