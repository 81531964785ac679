"""Comparison reports on hand-made records: exact table text, real PNG output, the CLI."""

from __future__ import annotations

import json

import matplotlib.image as mpimg
import numpy as np
import pytest

from recalign.cli.main import main
from recalign.errors import RecalignInputError
from recalign.evaluation.records import ResultRecord, write_records
from recalign.evaluation.report import (
    collect_records,
    comparison_table,
    plot_size,
    plot_table,
    render_markdown,
    write_report,
)

METRICS = ["HR@1", "NDCG@5", "HR@10"]


def rec(split, protocol, method, metrics, seed=0):
    return ResultRecord("ml-100k", split, protocol, method, metrics, n_examples=943, seed=seed, command="cmd")


def records():
    return [
        rec("loo", "candidates", "pop", {"HR@1": 0.2, "NDCG@5": 0.3, "MRR@5": 0.9}),
        rec("loo", "candidates", "sasrec", {"HR@1": 0.4, "NDCG@5": 0.5}, seed=0),
        rec("loo", "candidates", "sasrec", {"HR@1": 0.6, "NDCG@5": 0.7}, seed=1),
        rec("loo", "full", "pop", {"HR@10": 0.1, "NDCG@10": 0.05}),
        rec("llara", "candidates", "sasrec", {"HR@1": 0.3}),
    ]


# Worked out by hand: groups sorted (llara < loo; candidates before full); only requested metrics that
# some record of the group has; two sasrec seeds averaged (sample std of 0.4, 0.6 = 0.1414); the best
# of a column with >1 value in bold; a method without a record shows a dash.
EXPECTED = (
    "| method | ml-100k/llara/candidates HR@1 | ml-100k/loo/candidates HR@1 | ml-100k/loo/candidates NDCG@5 "
    "| ml-100k/loo/full HR@10 |\n"
    "|---|---:|---:|---:|---:|\n"
    "| pop | – | 0.2000 | 0.3000 | 0.1000 |\n"
    "| sasrec | 0.3000 | **0.5000 ± 0.1414 (n=2)** | **0.6000 ± 0.1414 (n=2)** | – |\n"
)


def test_markdown_table_exact():
    assert render_markdown(comparison_table(records(), METRICS)) == EXPECTED


def test_method_order_follows_first_appearance_and_groups_are_sorted():
    table = comparison_table(list(reversed(records())), METRICS)
    assert table.methods == ["sasrec", "pop"]
    assert [g for g, _ in table.columns][0] == ("ml-100k", "llara", "candidates")
    assert table.columns[-1] == (("ml-100k", "loo", "full"), "HR@10")


def test_lower_is_better_metrics_bold_the_minimum():
    rs = [rec("loo", "rating", "a", {"RMSE": 0.9}), rec("loo", "rating", "b", {"RMSE": 1.1})]
    md = render_markdown(comparison_table(rs, ["RMSE"]))
    assert "| a | **0.9000** |" in md and "| b | 1.1000 |" in md


def test_unknown_metrics_are_an_input_error():
    with pytest.raises(RecalignInputError, match="none of the metrics"):
        comparison_table(records(), ["Recall@50"])


def test_directory_collection_skips_non_records_and_duplicates(tmp_path):
    write_records(tmp_path / "a" / "records.json", records()[:3])
    write_records(tmp_path / "b.json", records()[3:])
    (tmp_path / "a" / "metrics.json").write_text(json.dumps({"candidates/HR@1": 0.5}))
    got = collect_records([tmp_path, tmp_path / "b.json"])  # b.json reached twice
    assert len(got) == 5
    assert render_markdown(comparison_table(got, METRICS)) == EXPECTED


def test_collect_rejects_missing_and_non_result_files(tmp_path):
    with pytest.raises(RecalignInputError, match="no such file"):
        collect_records([tmp_path / "nope.json"])
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(RecalignInputError, match="not a results file"):
        collect_records([tmp_path / "x.json"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(RecalignInputError, match="no result records"):
        collect_records([tmp_path / "empty"])


def _has_colour(img: np.ndarray, hex_colour: str, tol: float = 0.02) -> bool:
    rgb = np.array([int(hex_colour[i : i + 2], 16) / 255 for i in (1, 3, 5)])
    return bool((np.abs(img[..., :3] - rgb).max(-1) < tol).any())


def test_plot_is_a_decodable_png_of_the_expected_size_with_a_bar_per_method(tmp_path):
    table = comparison_table(records(), METRICS)
    path = plot_table(table, tmp_path / "plot.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = mpimg.imread(path)
    assert img.shape[:2] == plot_size(table) and img.shape[2] in (3, 4)
    assert plot_size(table)[1] > plot_size(comparison_table(records()[:1], METRICS))[1]  # one panel per group
    # matplotlib's default cycle: C0 (pop) and C1 (sasrec) bars must both be drawn
    assert _has_colour(img, "#1f77b4") and _has_colour(img, "#ff7f0e")
    assert not _has_colour(img, "#2ca02c")  # no third method, no third colour


def test_write_report_files(tmp_path):
    md_path, png_path, table = write_report(records(), tmp_path / "out", METRICS, sources=["r.json"])
    assert table == EXPECTED
    text = md_path.read_text()
    assert EXPECTED in text and "report.png" in text and "`r.json`" in text and "    cmd" in text
    assert mpimg.imread(png_path).shape[:2] == plot_size(comparison_table(records(), METRICS))


def test_cli_report_prints_and_writes(tmp_path, capsys):
    write_records(tmp_path / "res.json", records())
    code = main(
        [
            "report",
            str(tmp_path / "res.json"),
            "--metrics",
            ",".join(METRICS),
            "--output",
            str(tmp_path / "r"),
        ]
    )
    assert code == 0
    assert capsys.readouterr().out == EXPECTED
    assert (tmp_path / "r" / "report.md").read_text().count("| pop |") == 1
    assert mpimg.imread(tmp_path / "r" / "report.png").shape[0] > 0


def test_cli_report_without_output_only_prints(tmp_path, capsys, monkeypatch):
    write_records(tmp_path / "res.json", records())
    monkeypatch.chdir(tmp_path)
    assert main(["report", "res.json", "--metrics", ",".join(METRICS)]) == 0
    assert capsys.readouterr().out == EXPECTED
    assert sorted(p.name for p in tmp_path.iterdir()) == ["res.json"]


def test_cli_report_bad_input_exits_2(tmp_path, capsys):
    assert main(["report", str(tmp_path / "missing.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "missing.json" in err and err.count("\n") == 1
