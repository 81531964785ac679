"""Comparison reports: any set of result records → a Markdown table and a PNG bar plot.

Layout: one row per method (in order of first appearance, so the caller controls it), one column per
(dataset/split/protocol, metric). Groups are sorted by dataset, split and protocol (candidates, full,
generation) so the same records always give the same table whatever the file order. A column appears
only if at least one record of its group has the metric. Several records for the same cell (seeds, or
the same run listed twice) are averaged and shown as ``mean ± std (n=k)``; exact duplicates are
counted once. The best value of each column is bold (higher is better for every metric we report;
a metric where lower is better, such as RMSE/MAE, is bolded at its minimum).

Used by ``recalign report`` and importable: :func:`collect_records`, :func:`comparison_table`,
:func:`render_markdown`, :func:`plot_table`, :func:`write_report`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from recalign.errors import RecalignInputError
from recalign.evaluation.records import PROTOCOLS, ResultRecord, read_records
from recalign.io import atomic_write_text

DEFAULT_METRICS = ("HR@1", "NDCG@5", "HR@10", "NDCG@10", "ValidRatio")
LOWER_IS_BETTER = ("RMSE", "MAE")
MISSING = "–"


# ---------------------------------------------------------------------- reading
def _looks_like_records(path: Path) -> bool:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    if isinstance(data, dict):
        return "records" in data or ("metrics" in data and "method" in data)
    return isinstance(data, list) and bool(data) and all(isinstance(d, dict) and "metrics" in d for d in data)


def collect_records(paths: Iterable[str | Path]) -> list[ResultRecord]:
    """Records from result files and directories.

    A file must be a results file (an error otherwise: the user named it). A directory contributes every
    ``*.json`` below it that holds records; other JSON files there (``metrics.json``, training logs) are
    skipped. Exact duplicates (the same record reached twice) are kept once.
    """
    out: list[ResultRecord] = []
    seen: set[str] = set()
    for p in paths:
        path = Path(p)
        if path.is_dir():
            files = [f for f in sorted(path.rglob("*.json")) if _looks_like_records(f)]
            if not files:
                raise RecalignInputError(
                    "no result records (*.json with 'records') in this directory", source=path
                )
        elif path.is_file():
            files = [path]
        else:
            raise RecalignInputError("no such file or directory", source=path)
        for f in files:
            for r in read_records(f):
                key = json.dumps(r.to_dict(), sort_keys=True, default=str)
                if key not in seen:
                    seen.add(key)
                    out.append(r)
    return out


# ---------------------------------------------------------------------- table
Group = tuple[str, str, str]  # dataset, split, protocol


def group_label(g: Group) -> str:
    return "/".join(g)


@dataclass
class Cell:
    values: list[float] = field(default_factory=list)

    @property
    def mean(self) -> float:
        return float(np.mean(self.values))

    @property
    def std(self) -> float:
        return float(np.std(self.values, ddof=1)) if len(self.values) > 1 else 0.0


@dataclass
class ComparisonTable:
    methods: list[str]
    columns: list[tuple[Group, str]]
    cells: dict[tuple[str, Group, str], Cell]

    def value(self, method: str, group: Group, metric: str) -> float | None:
        c = self.cells.get((method, group, metric))
        return c.mean if c and c.values else None

    @property
    def groups(self) -> list[Group]:
        out: list[Group] = []
        for g, _ in self.columns:
            if g not in out:
                out.append(g)
        return out


def _protocol_order(p: str) -> int:
    return PROTOCOLS.index(p) if p in PROTOCOLS else len(PROTOCOLS)


def comparison_table(
    records: Sequence[ResultRecord], metrics: Sequence[str] | None = None
) -> ComparisonTable:
    """Arrange ``records`` as methods × (group, metric); ``metrics`` defaults to :data:`DEFAULT_METRICS`."""
    if not records:
        raise RecalignInputError("no result records to report")
    wanted = list(metrics) if metrics else list(DEFAULT_METRICS)
    methods: list[str] = []
    cells: dict[tuple[str, Group, str], Cell] = {}
    present: dict[Group, set[str]] = {}
    for r in records:
        if r.method not in methods:
            methods.append(r.method)
        g = (r.dataset, r.split, r.protocol)
        present.setdefault(g, set())
        for m in wanted:
            v = r.metrics.get(m)
            if v is None or (isinstance(v, float) and math.isnan(v)):
                continue
            present[g].add(m)
            cells.setdefault((r.method, g, m), Cell()).values.append(float(v))
    groups = sorted(present, key=lambda g: (g[0], g[1], _protocol_order(g[2]), g[2]))
    columns = [(g, m) for g in groups for m in wanted if m in present[g]]
    if not columns:
        have = sorted({k for r in records for k in r.metrics})
        raise RecalignInputError(
            f"none of the metrics {', '.join(wanted)} is in the records (they have: {', '.join(have)})",
            field="metrics",
        )
    return ComparisonTable(methods=methods, columns=columns, cells=cells)


def _fmt(cell: Cell | None, bold: bool) -> str:
    if cell is None or not cell.values:
        return MISSING
    text = f"{cell.mean:.4f}"
    if len(cell.values) > 1:
        text += f" ± {cell.std:.4f} (n={len(cell.values)})"
    return f"**{text}**" if bold else text


def render_markdown(table: ComparisonTable) -> str:
    """The table as GitHub Markdown (header ``method | <dataset/split/protocol> <metric> | ...``)."""
    header = ["method"] + [f"{group_label(g)} {m}" for g, m in table.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * len(table.columns)) + "|"]
    best: dict[tuple[Group, str], float] = {}
    for g, m in table.columns:
        vals = [v for v in (table.value(meth, g, m) for meth in table.methods) if v is not None]
        if len(vals) > 1:
            best[(g, m)] = min(vals) if m.split("@")[0] in LOWER_IS_BETTER else max(vals)
    for meth in table.methods:
        row = [meth]
        for g, m in table.columns:
            v = table.value(meth, g, m)
            is_best = (
                v is not None and (g, m) in best and math.isclose(v, best[(g, m)], rel_tol=0, abs_tol=1e-12)
            )
            row.append(_fmt(table.cells.get((meth, g, m)), is_best))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------- plot
PANEL_WIDTH_IN = 4.0
HEIGHT_IN = 4.0
LEGEND_WIDTH_IN = 1.8
DPI = 100


def plot_size(table: ComparisonTable, dpi: int = DPI) -> tuple[int, int]:
    """``(height, width)`` in pixels of the PNG :func:`plot_table` writes for ``table``."""
    width = PANEL_WIDTH_IN * len(table.groups) + LEGEND_WIDTH_IN
    return round(HEIGHT_IN * dpi), round(width * dpi)


def plot_table(table: ComparisonTable, path: str | Path, dpi: int = DPI) -> Path:
    """Grouped bar chart: one panel per dataset/split/protocol, metrics on the x axis, a bar per method.

    Uses matplotlib's Agg backend (no display needed) and a fixed figure size (see :func:`plot_size`), so
    the image size is predictable. Written to a temporary name and renamed into place.
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    groups = table.groups
    h_px, w_px = plot_size(table, dpi)
    fig, axes = plt.subplots(1, len(groups), figsize=(w_px / dpi, h_px / dpi), dpi=dpi, squeeze=False)
    n = len(table.methods)
    width = 0.8 / max(n, 1)
    for ax, g in zip(axes[0], groups):
        metrics = [m for gg, m in table.columns if gg == g]
        x = np.arange(len(metrics))
        for k, meth in enumerate(table.methods):
            vals = [table.value(meth, g, m) for m in metrics]
            heights = [v if v is not None else 0.0 for v in vals]
            ax.bar(x + (k - (n - 1) / 2) * width, heights, width, label=meth, color=f"C{k % 10}")
        ax.set_xticks(x, metrics, rotation=30, ha="right", fontsize=8)
        ax.set_title(group_label(g), fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=8, frameon=False)
    fig.subplots_adjust(
        left=0.6 / (w_px / dpi), right=1 - LEGEND_WIDTH_IN / (w_px / dpi), bottom=0.22, top=0.9, wspace=0.3
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    try:
        fig.savefig(tmp, dpi=dpi, format="png")
        tmp.replace(path)
    finally:
        plt.close(fig)
        if tmp.exists():
            tmp.unlink()
    return path


# ---------------------------------------------------------------------- everything
def write_report(
    records: Sequence[ResultRecord],
    output: str | Path,
    metrics: Sequence[str] | None = None,
    sources: Sequence[str | Path] = (),
) -> tuple[Path, Path, str]:
    """Write ``report.md`` and ``report.png`` to ``output``; returns their paths and the table text."""
    out = Path(output)
    table = comparison_table(records, metrics)
    md = render_markdown(table)
    png = plot_table(table, out / "report.png")
    lines = ["# recalign comparison", "", md, "![metrics](report.png)", ""]
    lines += [
        "NDCG@K = 1/log2(rank+1) for a hit within K (one target, IDCG = 1); ties are ranked against the "
        "target. Cells with several records show mean ± sample std (n records).",
        "",
    ]
    if sources:
        lines += ["Sources: " + ", ".join(f"`{s}`" for s in sources), ""]
    commands = sorted({r.command for r in records if r.command})
    if commands:
        lines += ["Commands:", ""] + [f"    {c}" for c in commands] + [""]
    md_path = out / "report.md"
    atomic_write_text(md_path, "\n".join(lines))
    return md_path, png, md
