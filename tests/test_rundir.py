"""The output-directory guard and run lock (recalign.rundir).

Why: every command writes into ``--output``; a path that is a file used to end in a traceback from
``mkdir``, and two runs started into one directory would interleave checkpoints. These tests pin the
guarantees: refusals are one-line input errors; the lock names its holder's pid; it is released at
the end of a scope, on an exception, at exit and (being an flock) when the holder is killed; a stale
lock is taken over with one note; a re-entrant hold is counted; a forked child never frees its
parent's lock; of many processes racing for one directory exactly one wins; under ``accelerate
launch`` only the main process locks. The end-to-end version (a real ``recalign sft`` paused inside
a checkpoint save, a second run refused, SIGKILL, ``--resume`` taking the lock over) is
tests/scale/test_kill_in_checkpoint.py; every command's refusals are in the malformed-input
catalogue (tests/data/malformed/cases.yaml).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from recalign import rundir
from recalign.cli.main import main
from recalign.errors import RecalignInputError
from recalign.rundir import LOCK_NAME, open_output_dir, read_lock, releasing, scope

SRC = Path(__file__).resolve().parents[1] / "src"

HOLD = (
    "import sys\n"
    "from recalign.rundir import open_output_dir\n"
    "open_output_dir(sys.argv[1])\n"
    "print('held', flush=True)\n"
    "sys.stdin.read()\n"
)


def _env(**extra):
    return {**os.environ, "PYTHONPATH": str(SRC), **extra}


def _holder(directory: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(directory)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=_env(),
    )
    assert proc.stdout.readline().strip() == b"held"
    return proc


@pytest.fixture(autouse=True)
def _no_leftover_locks():
    yield
    rundir.release_all()


def test_a_file_or_a_path_under_a_file_is_refused(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("x")
    with pytest.raises(
        RecalignInputError, match=r"notes.txt: is a file, not a directory; choose another --output"
    ):
        open_output_dir(f)
    with pytest.raises(
        RecalignInputError, match=r"notes.txt/a/b: cannot create the directory: .*notes.txt is a file"
    ):
        open_output_dir(f / "a" / "b")
    with pytest.raises(RecalignInputError, match="choose another --save-dir"):
        open_output_dir(f, option="--save-dir")
    assert f.read_text() == "x"


def test_an_unwritable_directory_is_refused(tmp_path):
    d = tmp_path / "ro"
    d.mkdir()
    immutable = False
    if os.geteuid() == 0:  # permission bits do not stop root; an immutable directory does
        immutable = shutil.which("chattr") is not None and (
            subprocess.run(["chattr", "+i", str(d)], capture_output=True).returncode == 0
        )
        if not immutable:
            pytest.skip("running as root without chattr: cannot make a directory unwritable")
    else:
        d.chmod(0o555)
    try:
        with pytest.raises(RecalignInputError, match=r"ro: directory is not writable \(permission denied\)"):
            open_output_dir(d)
        with pytest.raises(
            RecalignInputError, match=r"ro/run: cannot create the directory \(permission denied\)"
        ):
            open_output_dir(d / "run")
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(d)], capture_output=True)
        d.chmod(0o755)


def test_lock_records_the_holder_and_is_released_at_the_end_of_the_scope(tmp_path):
    out = tmp_path / "a" / "run"
    with scope():
        assert open_output_dir(out) == out and out.is_dir()  # parents created
        info = read_lock(out)
        assert info["pid"] == os.getpid() and info["host"] and info["started"] and "command" in info
        with scope():
            open_output_dir(out)  # re-entrant: counted, not refused
        assert (out / LOCK_NAME).is_file()  # the inner scope gave up its hold only
        assert out in rundir.held_by_this_process()
    assert not (out / LOCK_NAME).exists() and rundir.held_by_this_process() == []


def test_lock_is_released_on_an_exception_and_by_a_releasing_function(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(KeyError), scope():
        open_output_dir(out)
        raise KeyError("boom")
    assert not (out / LOCK_NAME).exists()

    @releasing
    def run(path):
        open_output_dir(path)
        assert (path / LOCK_NAME).is_file()
        raise ValueError("a bug inside the run")

    with pytest.raises(ValueError):
        run(out)
    assert not (out / LOCK_NAME).exists()


def test_a_failing_command_releases_its_lock(tmp_path, capsys):
    out = tmp_path / "prep"
    missing = tmp_path / "missing.csv"
    assert main(["data", "prepare", "--dataset", "csv", "--path", str(missing), "--output", str(out)]) == 2
    assert "missing.csv" in capsys.readouterr().err
    assert out.is_dir() and not (out / LOCK_NAME).exists()


def test_a_live_holder_refuses_a_second_run_with_its_pid(tmp_path, capsys):
    out = tmp_path / "run"
    holder = _holder(out)
    try:
        with pytest.raises(RecalignInputError) as e:
            open_output_dir(out)
        msg = str(e.value)
        assert msg.startswith(f"{out}: held by another recalign run (pid {holder.pid}, started ")
        assert msg.endswith("wait for it to finish or choose another --output") and "\n" not in msg
        # the same through the CLI: one line, exit 2, the directory untouched
        assert main(["sft", "--output", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"(pid {holder.pid}, " in err[0]
        assert read_lock(out)["pid"] == holder.pid
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert not (out / LOCK_NAME).exists()  # released when the holder exits normally
    with scope():
        open_output_dir(out)


def test_a_killed_holder_leaves_a_stale_lock_that_is_taken_over_with_a_note(tmp_path, capsys):
    out = tmp_path / "run"
    holder = _holder(out)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait(timeout=30)
    assert read_lock(out)["pid"] == holder.pid  # the file is still there, its flock is not
    with scope():
        open_output_dir(out)
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"note: {out}: took over the stale lock of pid {holder.pid} (no longer running)"]
        assert read_lock(out)["pid"] == os.getpid()
    assert not (out / LOCK_NAME).exists()


def test_an_unreadable_lock_file_is_taken_over_with_a_note(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_NAME).write_bytes(b'{"pid": 12')  # cut short by a crash while it was written
    with scope():
        open_output_dir(out)
    assert "took over a lock file left unreadable by an interrupted run" in capsys.readouterr().err


def test_lock_is_released_when_the_process_exits_without_a_scope(tmp_path):
    out = tmp_path / "run"
    code = "import sys\nfrom recalign.rundir import open_output_dir\nopen_output_dir(sys.argv[1])\n"
    subprocess.run([sys.executable, "-c", code, str(out)], check=True, env=_env())
    assert out.is_dir() and not (out / LOCK_NAME).exists()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_never_releases_its_parents_lock(tmp_path):
    out = tmp_path / "run"
    with scope():
        open_output_dir(out)
        pid = os.fork()
        if pid == 0:  # child: what a forked worker's exit handlers would do
            rundir.release_all()
            os._exit(0)
        os.waitpid(pid, 0)
        assert read_lock(out)["pid"] == os.getpid()
        with pytest.raises(RecalignInputError, match="held by another recalign run"):
            _refused_elsewhere(out)  # still held: another process is refused


def _refused_elsewhere(out: Path) -> None:
    """Raise the error another process gets when it tries to open ``out``."""
    code = (
        "import sys\nfrom recalign.errors import RecalignInputError\nfrom recalign.rundir import open_output_dir\n"
        "try:\n    open_output_dir(sys.argv[1])\nexcept RecalignInputError as e:\n    print(e); sys.exit(3)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, env=_env())
    if proc.returncode == 3:
        raise RecalignInputError(proc.stdout.strip())


def test_of_processes_racing_for_one_directory_exactly_one_wins(tmp_path):
    out = tmp_path / "run"
    code = (
        "import sys\nfrom recalign.errors import RecalignInputError\nfrom recalign.rundir import open_output_dir\n"
        "sys.stdin.readline()\n"  # all start together
        "try:\n    open_output_dir(sys.argv[1]); print('won', flush=True)\n"
        "except RecalignInputError as e:\n    print('refused', flush=True)\n"
        "sys.stdin.readline()\n"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(out)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=_env(),
        )
        for _ in range(6)
    ]
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    results = [p.stdout.readline().strip() for p in procs]
    for p in procs:
        p.stdin.close()
        p.wait(timeout=30)
    assert sorted(results) == ["refused"] * 5 + ["won"], results
    assert not (out / LOCK_NAME).exists()


def test_only_the_main_process_of_a_launched_run_locks(tmp_path, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert open_output_dir(out).is_dir() and not (out / LOCK_NAME).exists()
    f = tmp_path / "file"
    f.write_text("")
    with pytest.raises(RecalignInputError, match="is a file"):  # the path checks still apply
        open_output_dir(f)


def test_lock_file_is_json_with_a_pid(tmp_path):
    out = tmp_path / "run"
    with scope():
        open_output_dir(out)
        record = json.loads((out / LOCK_NAME).read_text())
        assert set(record) == {"pid", "host", "started", "command"}
