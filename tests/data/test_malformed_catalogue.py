"""The on-disk catalogue of malformed inputs (tests/data/malformed/cases.yaml), run through the CLI.

Why a catalogue on disk next to the inline cases in tests/cli/test_data_cli.py: users and future
engineers can reproduce a case by hand (``recalign data stats --dataset ml-1m --path
tests/data/malformed/ml1m_tab_separated``) and add one by dropping a file here and a YAML entry,
without writing Python. Each case must give exit code 2, nothing on stdout, exactly one
``error: ...`` line on stderr containing the expected fragment (which names file, line and problem),
and never a traceback.

The catalogue covers every loader and every command's arguments: output paths (a file, a path under
a file, a read-only directory, a directory another live run holds), model paths, configs, overrides
and ``recommend`` inputs. Two situations cannot be files in git, so the harness sets them up:
``hold`` (a directory locked by a live helper process for the duration of the case; ``{holder_pid}``
in ``expect`` is its pid) and ``readonly`` (a directory made unwritable: chmod, or ``chattr +i``
when running as root, whom permissions do not stop; skipped where neither works).

A second test keeps the catalogue itself honest: every file is listed, every listed path exists,
ids are unique, at least 60 cases.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
import yaml

from recalign.cli.main import main

HERE = Path(__file__).resolve().parent / "malformed"
REPO = Path(__file__).resolve().parents[2]
CASES = yaml.safe_load((HERE / "cases.yaml").read_text(encoding="utf-8"))["cases"]
FIELDS = {"id", "path", "dataset", "opts", "command", "expect", "hold", "readonly"}

#: the helper that holds a directory's lock: prints "held" once it has it, exits when stdin closes
_HOLD = (
    "import sys\n"
    "from recalign.rundir import open_output_dir\n"
    "open_output_dir(sys.argv[1])\n"
    "print('held', flush=True)\n"
    "sys.stdin.read()\n"
)


def _fill(text: str, case: dict, tmp: Path, **extra: object) -> str:
    text = str(text).replace("{tmp}", str(tmp))
    if "path" in case:
        text = text.replace("{path}", str(HERE / case["path"]))
    for k, v in extra.items():
        text = text.replace("{" + k + "}", str(v))
    return text


def _argv(case: dict, tmp: Path) -> list[str]:
    if "command" in case:
        return [_fill(a, case, tmp) for a in case["command"]]
    argv = ["data", "stats", "--dataset", case["dataset"], "--path", str(HERE / case["path"])]
    for k, v in (case.get("opts") or {}).items():
        argv += ["--opt", f"{k}={v}"]
    return argv


@contextmanager
def held_by_another_process(directory: Path):
    """A live process holding ``directory``'s recalign lock; yields its pid."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(directory)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env
    )
    try:
        assert proc.stdout.readline().strip() == b"held", "lock helper failed"
        yield proc.pid
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)


@contextmanager
def unwritable(directory: Path):
    """``directory`` created and made unwritable for this process (skips the case where impossible)."""
    directory.mkdir(parents=True, exist_ok=True)
    immutable = False
    if os.geteuid() == 0:  # root ignores permission bits; an immutable directory stops it too
        immutable = shutil.which("chattr") is not None and (
            subprocess.run(["chattr", "+i", str(directory)], capture_output=True).returncode == 0
        )
    else:
        directory.chmod(0o555)
    try:
        probe = directory / ".probe"
        try:
            probe.touch()
            probe.unlink()
            pytest.skip("cannot make a directory unwritable here")
        except OSError:
            pass
        yield
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(directory)], capture_output=True)
        directory.chmod(0o755)


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_malformed_case_is_one_line_exit_2(case, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)  # config cases hold repository-relative paths
    with ExitStack() as stack:
        extra = {}
        if "hold" in case:
            extra["holder_pid"] = stack.enter_context(
                held_by_another_process(Path(_fill(case["hold"], case, tmp_path)))
            )
        if "readonly" in case:
            stack.enter_context(unwritable(Path(_fill(case["readonly"], case, tmp_path))))
        capsys.readouterr()
        code = main(_argv(case, tmp_path))
        out, err = capsys.readouterr()
    assert code == 2, f"exit {code}; stderr: {err!r}"
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert _fill(case["expect"], case, tmp_path, **extra) in lines[0], lines[0]
    assert "Traceback" not in err and out == ""


def test_catalogue_is_consistent():
    """At least 60 cases, unique ids, every path present, and no file here that no case uses."""
    assert len(CASES) >= 60
    ids = [c["id"] for c in CASES]
    assert len(ids) == len(set(ids)), "duplicate case ids"
    for c in CASES:
        assert set(c) <= FIELDS, c
        assert c.get("expect"), c
        assert ("dataset" in c) != ("command" in c), f"{c['id']}: give dataset or command, not both"
        assert "path" in c or "command" in c, f"{c['id']}: a loader case needs a path"
        if "path" in c:
            assert (HERE / c["path"]).exists(), f"{c['id']}: missing {c['path']}"
        if "command" in c and "path" in c:
            assert any("{path}" in str(a) for a in c["command"]), f"{c['id']}: path given but not used"
    used = {Path(c["path"]).parts[0] for c in CASES if "path" in c}
    present = {p.name for p in HERE.iterdir()} - {"cases.yaml"}
    assert present == used, f"unlisted: {sorted(present - used)}"


def test_catalogue_covers_every_command_that_takes_output():
    """Every subcommand whose --output is a directory has an output-path case (a file given as --output).

    (``recommend --output FILE.jsonl`` names a file: its metavar says so, and it is not a run directory.)
    """
    from recalign.cli.main import build_parser

    def output_dir_option(parser) -> bool:
        return any(
            "--output" in a.option_strings and "FILE" not in str(a.metavar or "") for a in parser._actions
        )

    def commands_with_output(parser, prefix=()):
        for action in parser._actions:
            if getattr(action, "choices", None) and isinstance(action.choices, dict):
                for name, sub in action.choices.items():
                    yield from commands_with_output(sub, (*prefix, name))
        if prefix and output_dir_option(parser):
            yield prefix

    wanted = set(commands_with_output(build_parser()))
    covered = set()
    for c in CASES:
        if "command" in c and c["expect"].endswith("is a file, not a directory; choose another --output"):
            words = [a for a in c["command"] if not str(a).startswith("-")]
            covered |= {w for w in wanted if tuple(words[: len(w)]) == w}
    assert wanted and wanted <= covered, f"no 'output is a file' case for {sorted(wanted - covered)}"
