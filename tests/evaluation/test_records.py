"""``script_command``: the ``command`` a benchmark records must re-run it from the repository root."""

from __future__ import annotations

import shlex
import sys

from recalign.evaluation.records import script_command


def test_arguments_are_shell_quoted_and_round_trip():
    argv = ["--seeds", "0,1", "model.name=a b", "--label=it's"]
    cmd = script_command("benchmarks/x.py", argv)
    assert cmd.startswith("python benchmarks/x.py ")
    assert shlex.split(cmd) == ["python", "benchmarks/x.py", *argv]


def test_an_explicit_empty_argv_is_not_replaced_by_the_process_arguments(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["pytest", "-q", "tests/"])
    assert script_command("benchmarks/x.py", []) == "python benchmarks/x.py"


def test_without_argv_the_process_arguments_are_used(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["/abs/path/benchmarks/x.py", "--only", "pop"])
    # the script path is the one given, not the process's argv[0] (an absolute path would not re-run elsewhere)
    assert script_command("benchmarks/x.py") == "python benchmarks/x.py --only pop"
