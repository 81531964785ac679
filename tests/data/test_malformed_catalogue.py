"""The on-disk catalogue of malformed inputs (tests/data/malformed/cases.yaml), run through the CLI.

Why a catalogue on disk next to the inline cases in tests/cli/test_data_cli.py: users and future
engineers can reproduce a case by hand (``recalign data stats --dataset ml-1m --path
tests/data/malformed/ml1m_tab_separated``) and add one by dropping a file here and a YAML entry,
without writing Python. Each case must give exit code 2, nothing on stdout, exactly one
``error: ...`` line on stderr containing the expected fragment (which names file, line and problem),
and never a traceback. A second test keeps the catalogue itself honest: every file is listed,
every listed path exists, ids are unique.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from recalign.cli.main import main

HERE = Path(__file__).resolve().parent / "malformed"
REPO = Path(__file__).resolve().parents[2]
CASES = yaml.safe_load((HERE / "cases.yaml").read_text(encoding="utf-8"))["cases"]


def _argv(case: dict, tmp: Path) -> list[str]:
    path = str(HERE / case["path"])
    if "command" in case:
        return [str(a).replace("{path}", path).replace("{tmp}", str(tmp)) for a in case["command"]]
    argv = ["data", "stats", "--dataset", case["dataset"], "--path", path]
    for k, v in (case.get("opts") or {}).items():
        argv += ["--opt", f"{k}={v}"]
    return argv


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_malformed_case_is_one_line_exit_2(case, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)  # config cases hold repository-relative paths
    code = main(_argv(case, tmp_path))
    out, err = capsys.readouterr()
    assert code == 2, f"exit {code}; stderr: {err!r}"
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert case["expect"] in lines[0], lines[0]
    assert "Traceback" not in err and out == ""


def test_catalogue_is_consistent():
    """At least 20 cases, unique ids, every path present, and no file here that no case uses."""
    assert len(CASES) >= 20
    ids = [c["id"] for c in CASES]
    assert len(ids) == len(set(ids)), "duplicate case ids"
    for c in CASES:
        assert set(c) <= {"id", "path", "dataset", "opts", "command", "expect"}, c
        assert c.get("expect"), c
        assert ("dataset" in c) != ("command" in c), f"{c['id']}: give dataset or command, not both"
        assert (HERE / c["path"]).exists(), f"{c['id']}: missing {c['path']}"
    used = {Path(c["path"]).parts[0] for c in CASES}
    present = {p.name for p in HERE.iterdir()} - {"cases.yaml"}
    assert present == used, f"unlisted: {sorted(present - used)}"
