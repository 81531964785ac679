"""The catalogue behind a recommend session: which dataset a model goes with, and typed titles to items.

Part of the library behind ``recalign recommend`` / ``explain`` / ``serve`` (:mod:`recalign.lm.recommend`,
which re-exports these names):

- :func:`load_catalogue`: the dataset of a model (given explicitly, named by a run directory's
  ``config.yaml``, else the embedded ML-100K);
- :func:`match_titles`: catalogue indices of typed titles, matched exactly, then case-insensitively
  (with or without the year); an unknown or ambiguous title is a one-line
  :class:`~recalign.errors.RecalignInputError` with the closest catalogue titles;
- :func:`is_cllm4rec_run`: whether a path is a CLLM4Rec run directory (ID tables, not an adapter).
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path

from recalign.errors import RecalignInputError


def match_titles(dataset, titles: list[str], what: str = "history") -> list[int]:
    """Catalogue indices of ``titles``: exact match first, then case-insensitive; unknown -> error."""
    from recalign.lm.prompts import display_titles

    shown = display_titles(dataset)
    raw = [str(t) for t in dataset.items["title"]]
    exact: dict[str, int] = {}
    folded: dict[str, list[int]] = {}
    for i, (a, b) in enumerate(zip(shown, raw)):
        for t in {a, b}:
            exact.setdefault(t, i)
            folded.setdefault(" ".join(t.casefold().split()), []).append(i)
    out = []
    for t in titles:
        if not isinstance(t, str):
            raise RecalignInputError(f"{what} titles must be strings, got {json.dumps(t)}")
        t_clean = " ".join(t.split())
        if not t_clean:
            raise RecalignInputError(f"empty {what} title")
        if t_clean in exact:
            out.append(exact[t_clean])
            continue
        hits = sorted(set(folded.get(t_clean.casefold(), [])))
        if len(hits) == 1:
            out.append(hits[0])
            continue
        if len(hits) > 1:
            names = "; ".join(shown[i] for i in hits[:3])
            raise RecalignInputError(f"{what} title {t!r} is ambiguous ({names}); give the exact title")
        close = difflib.get_close_matches(t_clean, shown, n=3, cutoff=0.6)
        hint = f"; did you mean: {'; '.join(close)}" if close else ""
        raise RecalignInputError(f"unknown {what} title {t!r} (not in the {dataset.name} catalogue){hint}")
    return out


def is_cllm4rec_run(path: Path) -> bool:
    """A CLLM4Rec run directory: fine-tuned ID tables next to a config with CLLM4Rec's sections."""
    if not (path.is_dir() and (path / "model.safetensors").is_file() and (path / "config.yaml").is_file()):
        return False
    if (path / "config.json").is_file():  # a plain HF model directory with a config.yaml beside it
        return False
    from recalign.config import read_yaml

    cfg = read_yaml(path / "config.yaml") or {}
    return isinstance(cfg, dict) and "finetune" in cfg and "pretrain" in cfg


def load_catalogue(
    model: str | Path, dataset: str | None = None, path: str | None = None, options: dict | None = None
):
    """The catalogue of ``model``: ``dataset``/``path`` if given, else the dataset named by the run
    directory's ``config.yaml`` (recipe runs and CLLM4Rec runs alike), else the embedded ML-100K."""
    from recalign.data.prepare import load_with_options

    run = Path(model)
    if dataset or path:
        return load_with_options(dataset or "ml-100k", path, dict(options or {}))
    cfg = run / "config.yaml"
    if run.is_dir() and cfg.is_file():
        from recalign.config import read_yaml

        data = (read_yaml(cfg) or {}).get("data") or {}
        if isinstance(data, dict) and data.get("dataset"):
            return load_with_options(str(data["dataset"]), data.get("path"), dict(data.get("options") or {}))
    return load_with_options("ml-100k", None, {})


__all__ = ["is_cllm4rec_run", "load_catalogue", "match_titles"]
