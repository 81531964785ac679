"""Name → loader registry.

``load_dataset("ml-100k")`` gives the embedded default. Other names take a ``path`` (file or directory)
and format-specific options. A path alone is accepted too: ``load_dataset("path/to/ml-100k")`` guesses
the format from the files present.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from recalign.data.dataset import RecDataset
from recalign.errors import RecalignInputError


def _embedded(**_: Any) -> RecDataset:
    from recalign.data.loaders.embedded import load_ml100k_embedded

    return load_ml100k_embedded()


# Loaders register themselves here: name -> callable(path=..., **options) -> RecDataset
DATASETS: dict[str, Callable[..., RecDataset]] = {"ml-100k": _embedded}


def register(name: str) -> Callable[[Callable[..., RecDataset]], Callable[..., RecDataset]]:
    def deco(fn: Callable[..., RecDataset]) -> Callable[..., RecDataset]:
        DATASETS[name] = fn
        return fn

    return deco


def import_all() -> None:
    """Import every loader module, so that each registers its formats."""
    # Imported lazily so that `recalign --help` stays fast; each module calls `register`.
    import importlib

    for mod in ("movielens", "amazon", "lastfm", "recbole", "tabular"):
        try:
            importlib.import_module(f"recalign.data.loaders.{mod}")
        except ModuleNotFoundError as e:  # a loader module not written yet must not break the others
            if e.name != f"recalign.data.loaders.{mod}":
                raise


def load_dataset(name: str, /, path: str | Path | None = None, **options: Any) -> RecDataset:
    """Load a dataset by registered format name (``ml-100k`` is the embedded default).

    ``options`` go to the loader. The name a dataset carries in results is the loader option
    ``dataset_name`` (it used to be ``name``, which clashed with this function's first argument; that
    spelling is refused with a message saying so).
    """
    check_option_names(options)
    import_all()
    if path is None and name not in DATASETS and Path(name).exists():
        path, name = name, _guess_format(Path(name))
    if name not in DATASETS:
        raise RecalignInputError(
            f"unknown dataset '{name}' (known: {', '.join(sorted(DATASETS))})", field="dataset"
        )
    if path is not None and not Path(path).exists():
        raise RecalignInputError("no such file or directory", source=path)
    if name == "ml-100k" and path is not None:
        name = "ml-100k-raw"
    return DATASETS[name](path=path, **options) if path is not None else DATASETS[name](**options)


def check_option_names(options: dict[str, Any]) -> None:
    """Refuse the loader option ``name`` (renamed ``dataset_name``) with a one-line error.

    ``name`` used to be how the CSV / Parquet / RecBole / Amazon / MovieLens / LastFM loaders were told
    the dataset's name; through ``load_dataset`` (and so ``--opt name=...`` on the command line) it collided
    with the format name and failed with a ``TypeError``.
    """
    if "name" in options:
        raise RecalignInputError(
            "loader option 'name' is now called 'dataset_name' (e.g. --opt dataset_name=books, or "
            "options: {dataset_name: books} in YAML); 'name' clashed with the dataset format name",
            field="options",
        )


def _guess_format(path: Path) -> str:
    names = {p.name for p in path.iterdir()} if path.is_dir() else {path.name}
    if "u.data" in names or path.suffix == ".zip":
        return "ml-100k-raw"
    if "ratings.dat" in names:
        return "ml-1m"
    if "user_artists.dat" in names:
        return "lastfm"
    if any(n.endswith(".inter") for n in names):
        return "recbole"
    raise RecalignInputError("cannot tell the dataset format from the files here; pass --format", source=path)
