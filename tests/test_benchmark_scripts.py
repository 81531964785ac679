"""Benchmark scripts are as quiet as the CLI: each parses its command line through
:func:`recalign.logs.parse_args`, which adds ``-v`` and hides the libraries' deprecation warnings and
progress bars otherwise (a plain ``ArgumentParser.parse_args`` left transformers' ``FutureWarning``\\ s
in the knowledge and DPO4Rec benchmark logs). The test reads the scripts' source, so a new benchmark
that parses its arguments the plain way fails here."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = sorted(p for p in BENCHMARKS.glob("*.py") if "argparse" in p.read_text(encoding="utf-8"))


def _plain_parse_calls(tree: ast.AST) -> list[int]:
    """Lines of ``<parser>.parse_args(...)`` calls (an attribute call: the parser's own method)."""
    return [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr in ("parse_args", "parse_known_args")
    ]


def _imports_quiet_parser(tree: ast.AST) -> bool:
    return any(
        isinstance(node, ast.ImportFrom)
        and node.module == "recalign.logs"
        and any(a.name == "parse_args" for a in node.names)
        for node in ast.walk(tree)
    )


def test_there_are_benchmarks_with_a_command_line():
    assert len(SCRIPTS) >= 10


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_benchmark_parses_its_arguments_quietly(script):
    tree = ast.parse(script.read_text(encoding="utf-8"), filename=str(script))
    plain = _plain_parse_calls(tree)
    assert not plain, f"{script.name}: parse arguments with recalign.logs.parse_args (lines {plain})"
    assert _imports_quiet_parser(tree), f"{script.name}: does not import recalign.logs.parse_args"


def test_the_check_catches_a_plain_parser():
    tree = ast.parse("import argparse\np = argparse.ArgumentParser()\nargs = p.parse_args()\n")
    assert _plain_parse_calls(tree) == [3]
    assert not _imports_quiet_parser(tree)
