"""``recalign data``: dataset statistics, split preparation and format conversion.

- ``recalign data stats --dataset ml-100k [--path P] [--opt key=value ...] [--json]``
- ``recalign data prepare --dataset ml-100k --split loo|llara --output DIR [--seed 0] [--candidates 20]
  [--kcore N] [--min-rating R] [--no-dedup] [--config prepare.yaml] [key.sub=value ...]``
- ``recalign data convert --dataset ... --to recbole --output DIR [--name NAME]``

``prepare`` materialises the split once (``examples.parquet`` + ``split.json`` via
:meth:`~recalign.data.splits.Split.save`) so every method, classical or LM, sees identical examples and
candidates. Next to it go ``config.yaml`` (the resolved config, to reproduce the run), ``items.parquet``
and ``users.parquet`` (internal index → original id and item text, so the split can be read without
re-running the loader). Everything here is argparse over the Python API in
:mod:`recalign.data.prepare` (:class:`DataPrepareConfig`, :func:`prepare`, :func:`load_with_options`), which
this module re-exports for older imports.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from recalign.config import deep_merge, describe_config, load_config, parse_overrides
from recalign.data.prepare import DataPrepareConfig, load_from_config, load_with_options, prepare
from recalign.data.splits import STAGES
from recalign.errors import RecalignInputError


# ---------------------------------------------------------------------- argparse
def opt_value(raw: str) -> Any:
    """Loader option values stay strings (so ``sep=|`` is a pipe, not YAML syntax) except for
    obvious scalars (``true``, ``none``, numbers) and ``[a, b]`` lists."""
    low = raw.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    if raw.strip().startswith("["):
        return parse_overrides([f"v={raw}"])["v"]
    for conv in (int, float):
        try:
            return conv(raw)
        except ValueError:
            pass
    return raw


def parse_opts(items: list[str] | None) -> dict[str, Any]:
    opts: dict[str, Any] = {}
    for item in items or []:
        key, eq, raw = item.partition("=")
        if not eq or not key.strip():
            raise RecalignInputError(f"--opt '{item}' must look like key=value", source="command line")
        opts[key.strip()] = opt_value(raw)
    return opts


def add_source_args(p: argparse.ArgumentParser, default: str | None = "ml-100k") -> None:
    p.add_argument(
        "--dataset",
        default=default,
        help="dataset format: ml-100k (embedded default, or raw files with --path), ml-100k-raw, ml-1m, "
        "amazon-2014, amazon-2023, lastfm, recbole, csv, parquet",
    )
    p.add_argument("--path", default=None, help="file or directory holding the dataset")
    p.add_argument(
        "--opt",
        action="append",
        metavar="KEY=VALUE",
        help="loader option, repeatable (e.g. --opt user_col=uid --opt 'sep=\\t'; --opt dataset_name=NAME "
        "sets the dataset's name in results)",
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser("data", help="dataset statistics, split preparation, format conversion")
    sub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    data.set_defaults(func=lambda _args: (data.print_help(), 2)[1])

    st = sub.add_parser("stats", help="print dataset statistics")
    add_source_args(st)
    st.add_argument("--json", action="store_true", help="print one JSON object")
    st.set_defaults(func=cmd_stats)

    pr = sub.add_parser("prepare", help="filter, split and materialise candidates")
    add_source_args(pr, default=None)
    pr.add_argument("--config", default=None, help="YAML file with DataPrepareConfig fields")
    pr.add_argument("--split", default=None, choices=["loo", "llara"], help="split protocol (default loo)")
    pr.add_argument("--seed", type=int, default=None, help="candidate seed (default 0)")
    pr.add_argument("--candidates", type=int, default=None, help="candidates per example (default 20)")
    pr.add_argument(
        "--kcore", type=int, default=None, help="k-core threshold for users and items (default 0: off)"
    )
    pr.add_argument("--min-rating", type=float, default=None, help="keep events rated at least this")
    pr.add_argument("--no-dedup", action="store_true", help="keep repeated (user, item) events")
    pr.add_argument("--output", default=None, help="output directory")
    pr.add_argument("--help-config", action="store_true", help="list every config field and exit")
    pr.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. preprocess.kcore=5"
    )
    pr.set_defaults(func=cmd_prepare)

    cv = sub.add_parser("convert", help="write a dataset in another format")
    add_source_args(cv)
    cv.add_argument("--to", required=True, choices=["recbole"], help="target format")
    cv.add_argument("--output", required=True, help="output directory")
    cv.add_argument("--name", default=None, help="base name of the written files (default: dataset name)")
    cv.set_defaults(func=cmd_convert)


# ---------------------------------------------------------------------- commands
def cmd_stats(args: argparse.Namespace) -> int:
    ds = load_with_options(args.dataset, args.path, parse_opts(args.opt))
    stats = ds.stats()
    stats["notes"] = list(ds.notes)
    if args.json:
        print(json.dumps(stats))
        return 0
    for k, v in stats.items():
        if k == "notes":
            continue
        if k == "density":
            v = f"{v:.6f}"
        elif isinstance(v, list):
            v = ", ".join(map(str, v))
        print(f"{k}: {v}")
    for n in ds.notes:
        print(f"note: {n}")
    return 0


def _prepare_config(args: argparse.Namespace) -> DataPrepareConfig:
    flags: dict[str, Any] = {}
    if args.dataset is not None:
        flags["dataset"] = args.dataset
    if args.path is not None:
        flags["path"] = args.path
    if args.opt:
        flags["options"] = parse_opts(args.opt)
    for key in ("split", "seed", "candidates", "output"):
        if getattr(args, key) is not None:
            flags[key] = getattr(args, key)
    pre: dict[str, Any] = {}
    if args.kcore is not None:
        pre["kcore"] = args.kcore
    if args.min_rating is not None:
        pre["min_rating"] = args.min_rating
    if args.no_dedup:
        pre["dedup"] = False
    if pre:
        flags["preprocess"] = pre
    dotted = parse_overrides(args.overrides)
    merged = deep_merge(flags, dotted)
    return load_config(DataPrepareConfig, args.config, merged)


def cmd_prepare(args: argparse.Namespace) -> int:
    if args.help_config:
        print("\n".join(describe_config(DataPrepareConfig)))
        return 0
    cfg = _prepare_config(args)
    if not cfg.output:
        raise RecalignInputError("an output directory is required (--output DIR or output: in the config)")
    from recalign.rundir import open_output_dir

    open_output_dir(cfg.output)  # not a file, writable, not held by another live run
    split, ds, reports = prepare(cfg)
    print(f"dataset {ds.name}: {ds.n_users} users, {ds.n_items} items, {ds.n_interactions} interactions")
    for rep in reports:
        print(rep.summary())
    counts = {s: int((split.examples["stage"] == s).sum()) for s in STAGES}
    print(
        f"split {split.name} (seed {split.seed}, {split.n_candidates} candidates): "
        + ", ".join(f"{s} {counts[s]}" for s in STAGES)
    )
    for n in split.notes:
        if not any(n == r.summary() for r in reports):
            print(f"note: {n}")
    print(
        f"wrote {Path(cfg.output) / 'examples.parquet'} and split.json, config.yaml, items.parquet, users.parquet"
    )
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from recalign.rundir import open_output_dir

    open_output_dir(args.output)  # not a file, writable, not held by another live run
    ds = load_with_options(args.dataset, args.path, parse_opts(args.opt))
    from recalign.data.loaders.recbole import write_recbole

    inter_path, item_path = write_recbole(ds, args.output, args.name)
    print(f"wrote {inter_path} ({ds.n_interactions} interactions) and {item_path} ({ds.n_items} items)")
    for n in ds.notes:
        print(f"note: {n}", file=sys.stderr)
    return 0


__all__ = [
    "DataPrepareConfig",
    "add_source_args",
    "load_from_config",
    "load_with_options",
    "parse_opts",
    "prepare",
    "register",
]
