"""Load, filter, split and materialise a dataset: the data layer's one entry point for every recipe.

:func:`prepare` is what ``recalign data prepare`` runs and what every training recipe calls (through
:func:`recalign.methods.load_data`), so an LM run, ``recalign baseline`` and ``recalign data prepare`` see
identical examples and candidate sets. With ``output`` set it writes ``examples.parquet`` + ``split.json``
(:meth:`~recalign.data.splits.Split.save`), ``config.yaml`` (the resolved config, to reproduce the run),
``items.parquet`` and ``users.parquet`` (internal index → original id and item text, so the split can be
read without re-running the loader).
"""

from __future__ import annotations

import codecs
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import pandas as pd

from recalign.config import Ge, cfg_field, check_constraints, save_config
from recalign.data.dataset import RecDataset
from recalign.data.loaders.registry import DATASETS, check_option_names, import_all, load_dataset
from recalign.data.preprocess import FilterReport, PreprocessConfig, preprocess
from recalign.data.splits import Split, build_split
from recalign.errors import RecalignInputError


@dataclass
class DataPrepareConfig:
    """What ``recalign data prepare`` builds."""

    dataset: str = cfg_field("ml-100k", "dataset format name (ml-100k, ml-1m, amazon-2023, csv, ...)")
    path: str | None = cfg_field(None, "file or directory of the dataset; None uses the embedded ML-100K")
    options: dict[str, Any] = cfg_field(
        {}, "loader options, e.g. {user_col: uid, sep: ';', dataset_name: books} (the name in results)"
    )
    split: Literal["loo", "llara"] = cfg_field(
        "loo", "loo (last item test, second-last valid) or llara (8:1:1)"
    )
    seed: int = cfg_field(0, "seed of the candidate sets")
    candidates: Annotated[int, Ge(2, show_value=True)] = cfg_field(
        20, "candidates per example: the target plus candidates-1 unseen items"
    )
    preprocess: PreprocessConfig = cfg_field(
        help="filtering before the split", default_factory=PreprocessConfig
    )
    output: str | None = cfg_field(None, "directory for examples.parquet, split.json and config.yaml")

    def validate(self) -> None:
        check_constraints(self, nested=False)
        self.preprocess.validate()


def normalise_options(options: dict[str, Any]) -> dict[str, Any]:
    """Loader options as given, with escapes in ``*sep`` values decoded (``sep=\\t`` means a tab)."""
    out = {}
    for k, v in options.items():
        if isinstance(v, str) and "\\" in v and k.endswith("sep"):
            v = codecs.decode(v, "unicode_escape")
        out[k] = v
    return out


def load_with_options(
    dataset: str, path: str | Path | None, options: dict[str, Any] | None = None
) -> RecDataset:
    """``load_dataset`` with loader options checked against the loader's signature first.

    A misspelt option must be a one-line error, not a ``TypeError`` traceback from deep inside a loader.
    """
    import_all()
    options = normalise_options(options or {})
    check_option_names(options)
    name = "ml-100k-raw" if dataset == "ml-100k" and path is not None else dataset
    fn = DATASETS.get(name)
    if fn is not None and options:
        params = inspect.signature(fn).parameters
        known = sorted(p for p in params if p != "path")
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            for k in options:
                if k not in params or k == "path":
                    raise RecalignInputError(
                        f"unknown option '{k}' for dataset '{dataset}' (known: {', '.join(known) or 'none'})",
                        field="options",
                    )
    return load_dataset(dataset, path=path, **options)


def load_from_config(cfg: DataPrepareConfig) -> RecDataset:
    """The dataset ``cfg`` names, loaded with its options (no filtering, no split)."""
    return load_with_options(cfg.dataset, cfg.path, cfg.options)


def prepare(cfg: DataPrepareConfig) -> tuple[Split, RecDataset, list[FilterReport]]:
    """Load, filter, split and (if ``cfg.output`` is set) save; returns the split, dataset and reports."""
    ds = load_from_config(cfg)
    ds, reports = preprocess(ds, cfg.preprocess)
    split = build_split(ds, cfg.split, seed=cfg.seed, n_candidates=cfg.candidates)
    split.notes = list(ds.notes) + list(split.notes)
    if cfg.output:
        out = Path(cfg.output)
        split.save(out)
        save_config(cfg, out / "config.yaml")
        items = ds.items.copy()
        items.insert(0, "item_idx", range(len(items)))
        items.astype({c: str for c in items.columns if c != "item_idx"}).to_parquet(
            out / "items.parquet", index=False
        )
        pd.DataFrame({"user_idx": range(ds.n_users), "user_id": ds.user_ids.astype(str)}).to_parquet(
            out / "users.parquet", index=False
        )
    return split, ds, reports


__all__ = ["DataPrepareConfig", "load_from_config", "load_with_options", "normalise_options", "prepare"]
