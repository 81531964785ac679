"""``recalign recommend`` (single and batch mode), ``recalign explain`` and quiet loading, end to end on a
tiny saved Llama and a tiny ML-100K-format directory."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
import _lm_tiny  # noqa: E402

from recalign.cli.main import main  # noqa: E402


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("rec")
    data = _lm_tiny.write_ml100k_dir(root / "ml")
    model = _lm_tiny.write_tiny_model(root / "model")
    return root, ["--model", str(model), "--dataset", "ml-100k", "--path", str(data), "--threads", "1"]


def test_recommend_exact_matches_exhaustive_and_is_quiet(world, capsys):
    _, src = world
    hist = ["--history", "Toy Story (1995)", "Fargo (1996)"]
    assert main(["recommend", *src, *hist, "-k", "5", "--json"]) == 0
    out = capsys.readouterr()
    fast = json.loads(out.out)
    assert "Loading weights" not in out.err and "Warning" not in out.err  # quiet by default
    assert "exact: top 5 in" in out.err
    assert main(["recommend", *src, *hist, "-k", "5", "--json", "--method", "exhaustive"]) == 0
    slow = json.loads(capsys.readouterr().out)
    assert [r["title"] for r in fast] == [r["title"] for r in slow]
    assert (
        main(
            [
                "recommend",
                *src,
                *hist,
                "-k",
                "3",
                "--method",
                "two-stage",
                "--retriever",
                "pop",
                "--retrieve",
                "5",
            ]
        )
        == 0
    )
    table = capsys.readouterr().out.strip().splitlines()
    assert len(table) == 3 and table[0].lstrip().startswith("1. ")
    assert main(["recommend", *src, *hist, "--method", "two-stage"]) == 2
    assert "needs --retriever" in capsys.readouterr().err


def test_verbose_shows_library_output(world, capsys):
    _, src = world
    assert main(["recommend", *src, "--history", "Heat (1995)", "-k", "1", "-v"]) == 0
    assert "Loading weights" in capsys.readouterr().err


def test_batch_mode_writes_one_line_per_history(world, capsys):
    root, src = world
    inp = root / "users.jsonl"
    inp.write_text(
        '["Toy Story (1995)", "Fargo (1996)"]\n'
        "\n"
        '{"history": ["Heat (1995)"], "k": 2, "id": "alice"}\n'
        '{"history": ["Heat (1995)"], "candidates": ["Jaws (1975)", "Babe (1995)"]}\n'
    )
    out = root / "out" / "recs.jsonl"
    assert main(["recommend", *src, "--input", str(inp), "--output", str(out), "-k", "3"]) == 0
    assert "wrote 3 lines" in capsys.readouterr().err
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["line"] for r in rows] == [1, 3, 4]
    assert [len(r["recommendations"]) for r in rows] == [3, 2, 2]
    assert rows[1]["id"] == "alice" and "id" not in rows[0]
    assert {r["title"] for r in rows[2]["recommendations"]} == {"Jaws (1975)", "Babe (1995)"}
    # the same history alone gives the same answer as in the batch
    assert (
        main(["recommend", *src, "--history", "Toy Story (1995)", "Fargo (1996)", "-k", "3", "--json"]) == 0
    )
    assert [r["title"] for r in json.loads(capsys.readouterr().out)] == [
        r["title"] for r in rows[0]["recommendations"]
    ]


def test_batch_mode_reports_every_bad_line_and_writes_nothing(world, capsys):
    root, src = world
    inp = root / "bad.jsonl"
    inp.write_text(
        '["Toy Story (1995)"]\n'
        '["Toy Stroy (1995)"]\n'
        "{not json\n"
        '{"history": []}\n'
        '{"history": ["Heat (1995)"], "k": 0}\n'
        '{"history": ["Heat (1995)"], "colour": 1}\n'
        "42\n"
    )
    out = root / "never.jsonl"
    assert main(["recommend", *src, "--input", str(inp), "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 6 and all(line.startswith(f"error: {inp}:") for line in err)
    assert f"{inp}:2: unknown history title 'Toy Stroy (1995)'" in err[0] and "Toy Story (1995)" in err[0]
    assert f"{inp}:3: not valid JSON" in err[1]
    assert f"{inp}:4, field 'history': needs a non-empty list" in err[2]
    assert f"{inp}:5, field 'k'" in err[3]
    assert f"{inp}:6: unknown key 'colour'" in err[4]
    assert f"{inp}:7: expected a list of titles or an object" in err[5]
    assert not out.exists()
    assert main(["recommend", *src, "--input", str(inp)]) == 2
    assert "--input needs --output" in capsys.readouterr().err
    assert main(["recommend", *src, "--input", str(inp), "--output", str(root)]) == 2
    assert "is a directory" in capsys.readouterr().err
    assert main(["recommend", *src]) == 2
    assert "give --history" in capsys.readouterr().err


def test_explain_and_recommend_explain(world, capsys):
    _, src = world
    hist = ["--history", "Toy Story (1995)", "Babe (1995)"]
    assert main(["explain", *src, *hist, "--item", "jumanji (1995)", "--json"]) == 0
    body = json.loads(capsys.readouterr().out)
    assert body["title"] == "Jumanji (1995)" and isinstance(body["explanation"], str)
    assert main(["explain", *src, *hist, "--item", "Jumanjy (1995)"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: command line: unknown item title 'Jumanjy (1995)'") and "Jumanji" in err
    assert main(["recommend", *src, *hist, "-k", "2", "--explain", "--json"]) == 0
    recs = json.loads(capsys.readouterr().out)
    assert len(recs) == 2 and all("explanation" in r for r in recs)
