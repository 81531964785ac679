"""The output directory of a command: checked, created and locked before anything is written to it.

Every command that takes ``--output DIR`` opens it with :func:`open_output_dir`, which

- refuses a path that exists but is not a directory, or that lies under a file (``--output
  notes.txt/run``), instead of failing later with ``FileExistsError`` from ``mkdir``;
- creates the directory (and its parents) and refuses it when it cannot write there;
- takes an **advisory lock**, ``DIR/.recalign.lock``, so that two recalign runs never write into one
  directory at once (two trainings interleaving checkpoints in one ``checkpoints/`` would leave a run
  that resumes from the other's state). The lock file records the holder's pid, host, start time and
  command; a second run is refused with a one-line error naming that pid.

All refusals are :class:`~recalign.errors.RecalignInputError` (one line, exit code 2 from the CLI).

Liveness: the lock is an ``flock`` held on the lock file for as long as the run lasts, so the
operating system releases it when the holder dies in any way, SIGKILL included; the pid in the file
is for people. A lock file that nobody holds (left by a killed run) is *stale*: the next run takes it
over and prints one ``note:`` line naming the previous pid. Where ``fcntl`` does not exist
(Windows), the lock falls back to an exclusive-create file whose pid is checked for liveness.

Release: at the end of the enclosing :func:`scope` (the CLI wraps every command in one, and the
recipe entry points such as :func:`~recalign.methods.sft.run_sft` are :func:`releasing`), when the
process exits, or with :func:`release`; also after an exception. Opening a directory this process
already holds is allowed (re-entrant, counted). Under ``accelerate launch`` the main process takes
the lock; the other processes of the same run only check the path.
"""

from __future__ import annotations

import atexit
import errno
import functools
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from recalign.errors import RecalignInputError

try:  # POSIX
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".recalign.lock"

F = TypeVar("F", bound=Callable[..., Any])


@dataclass
class _Held:
    path: Path  # the lock file
    fd: int | None  # open descriptor holding the flock (None in the fallback)
    pid: int  # the process that took it (a forked child must not release its parent's lock)
    count: int = 1


_HELD: dict[str, _Held] = {}
_SCOPES: list[list[str]] = []
_GUARD = threading.RLock()


# ---------------------------------------------------------------------- public API
def open_output_dir(path: str | Path, *, option: str = "--output", lock: bool = True) -> Path:
    """Check, create and (with ``lock``) lock the output directory ``path``; returns it as a Path.

    ``option`` names the command-line option in the messages. One-line input errors for: a path that
    is a file (or lies under one), a directory that cannot be created or written, and a directory
    locked by another live recalign run.
    """
    out = Path(path)
    _check_not_a_file(out, option)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        _check_not_a_file(out, option)  # raced with something creating a file there
        raise RecalignInputError(
            f"cannot create the directory; choose another {option}", source=out
        ) from None
    except PermissionError:
        raise RecalignInputError(
            f"cannot create the directory (permission denied); choose another {option}", source=out
        ) from None
    except OSError as e:
        raise RecalignInputError(
            f"cannot create the directory ({e.strerror or e}); choose another {option}", source=out
        ) from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise _not_writable(out, option)
    if lock and _is_main_process():
        _acquire(out, option)
    return out


def read_lock(path: str | Path) -> dict | None:
    """The holder record of ``DIR/.recalign.lock`` (pid, host, started, command), or None."""
    try:
        text = (Path(path) / LOCK_NAME).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    return _parse(text)


def release(path: str | Path) -> None:
    """Give up one hold of this process on ``path``'s lock (the last one removes the lock file)."""
    key = _key(Path(path))
    with _GUARD:
        held = _HELD.get(key)
        if held is None or held.pid != os.getpid():
            return
        held.count -= 1
        if held.count > 0:
            return
        del _HELD[key]
        for s in _SCOPES:
            while key in s:
                s.remove(key)
        _unlock(held)


def release_all() -> None:
    """Release every lock this process holds (runs at exit)."""
    with _GUARD:
        for key in list(_HELD):
            held = _HELD.pop(key)
            if held.pid == os.getpid():
                _unlock(held)
        _SCOPES.clear()


def held_by_this_process() -> list[Path]:
    """Directories whose lock this process holds."""
    with _GUARD:
        return [h.path.parent for h in _HELD.values() if h.pid == os.getpid()]


@contextmanager
def scope() -> Iterator[None]:
    """Locks taken inside the block are released when it ends (also on an exception)."""
    mine: list[str] = []
    with _GUARD:
        _SCOPES.append(mine)
    try:
        yield
    finally:
        with _GUARD:
            if mine in _SCOPES:
                _SCOPES.remove(mine)
            keys = list(mine)
        for key in keys:
            held = _HELD.get(key)
            if held is not None:
                release(held.path.parent)


def releasing(fn: F) -> F:
    """Decorator: run ``fn`` in a :func:`scope`, so the output directories it locks are freed on return."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with scope():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


# ---------------------------------------------------------------------- checks
def _check_not_a_file(out: Path, option: str) -> None:
    if out.exists() and not out.is_dir():
        raise RecalignInputError(f"is a file, not a directory; choose another {option}", source=out)
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise RecalignInputError(
                    f"cannot create the directory: {parent} is a file; choose another {option}", source=out
                )
            break


def _not_writable(out: Path, option: str) -> RecalignInputError:
    return RecalignInputError(
        f"directory is not writable (permission denied); choose another {option}", source=out
    )


# ---------------------------------------------------------------------- locking
def _is_main_process() -> bool:
    """:func:`recalign.training.distributed.is_main`, read from the launcher's environment the same way,
    without importing :mod:`recalign.training` (torch and transformers: seconds, for commands such as
    ``data prepare`` or ``report`` that need neither)."""
    return int(os.environ.get("RANK", "0")) == 0


def _key(out: Path) -> str:
    return os.path.realpath(out)


def _record() -> dict:
    try:
        from recalign.evaluation.records import current_command

        command = current_command()
    except Exception:  # pragma: no cover - never let the record stop a run
        command = " ".join(sys.argv)
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "command": command,
    }


def _parse(text: str) -> dict | None:
    try:
        data = json.loads(text)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def _describe(info: dict | None) -> str:
    if not info or not isinstance(info.get("pid"), int):
        return "pid unknown"
    where = f" on {info['host']}" if info.get("host") and info["host"] != socket.gethostname() else ""
    since = f", started {info['started']}" if info.get("started") else ""
    command = f": {info['command']}" if info.get("command") else ""
    return f"pid {info['pid']}{where}{since}{command}"


def _held_error(out: Path, info: dict | None, option: str) -> RecalignInputError:
    return RecalignInputError(
        f"held by another recalign run ({_describe(info)}); wait for it to finish or choose another {option}",
        source=out,
    )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists (another user's) or cannot tell: assume alive
    return True


def _stale_note(out: Path, info: dict | None) -> None:
    pid = info.get("pid") if info else None
    if pid == os.getpid():
        return
    if not isinstance(pid, int):
        msg = "took over a lock file left unreadable by an interrupted run"
    elif _pid_alive(pid):  # pid reused by another process, or a holder that let go without cleaning up
        msg = f"took over the stale lock of pid {pid} (it no longer holds it)"
    else:
        msg = f"took over the stale lock of pid {pid} (no longer running)"
    print(f"note: {out}: {msg}", file=sys.stderr, flush=True)


def _register(out: Path, held: _Held) -> None:
    key = _key(out)
    _HELD[key] = held
    if _SCOPES:
        _SCOPES[-1].append(key)


def _acquire(out: Path, option: str) -> None:
    key = _key(out)
    with _GUARD:
        held = _HELD.get(key)
        if held is not None and held.pid == os.getpid():
            held.count += 1
            if _SCOPES:
                _SCOPES[-1].append(key)
            return
        if held is not None:  # inherited through fork: not ours
            del _HELD[key]
        lock_path = out / LOCK_NAME
        if fcntl is None:  # pragma: no cover - Windows
            _acquire_fallback(out, lock_path, option)
            return
        for _ in range(50):
            try:
                fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            except PermissionError:
                raise _not_writable(out, option) from None
            except OSError as e:
                if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
                    raise _not_writable(out, option) from None
                raise
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    os.close(fd)
                    raise
                info = _read_fd(fd, wait=True)
                os.close(fd)
                raise _held_error(out, info, option) from None
            # The holder deletes the file before letting go: make sure we locked the file that is
            # still at lock_path, not one unlinked under us (else two runs could both "hold" it).
            try:
                same = os.stat(lock_path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        else:  # pragma: no cover - 50 lost races in a row
            raise _held_error(out, read_lock(out), option)
        previous = _read_fd(fd, wait=False)
        if previous is not None or os.fstat(fd).st_size > 0:
            _stale_note(out, previous)
        data = (json.dumps(_record()) + "\n").encode("utf-8")
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        os.fsync(fd)
        _register(out, _Held(path=lock_path, fd=fd, pid=os.getpid()))


def _read_fd(fd: int, *, wait: bool) -> dict | None:
    """The record in an open lock file; with ``wait``, give a holder that just created the file a
    moment to write it."""
    for _attempt in range(20 if wait else 1):
        try:
            size = os.fstat(fd).st_size
            text = os.pread(fd, max(size, 1), 0).decode("utf-8", errors="replace")
        except OSError:
            return None
        info = _parse(text)
        if info is not None or not wait:
            return info
        time.sleep(0.05)
    return None


def _acquire_fallback(out: Path, lock_path: Path, option: str) -> None:  # pragma: no cover - Windows
    for _ in range(2):
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            info = read_lock(out)
            pid = info.get("pid") if info else None
            if isinstance(pid, int) and _pid_alive(pid):
                raise _held_error(out, info, option) from None
            _stale_note(out, info)
            lock_path.unlink(missing_ok=True)
            continue
        except PermissionError:
            raise _not_writable(out, option) from None
        os.write(fd, (json.dumps(_record()) + "\n").encode("utf-8"))
        os.close(fd)
        _register(out, _Held(path=lock_path, fd=None, pid=os.getpid()))
        return
    raise _held_error(out, read_lock(out), option)


def _unlock(held: _Held) -> None:
    try:
        if held.fd is not None:
            try:
                if os.stat(held.path).st_ino == os.fstat(held.fd).st_ino:
                    held.path.unlink()
            except FileNotFoundError:
                pass
        else:  # pragma: no cover - Windows
            info = _parse(held.path.read_text(encoding="utf-8")) if held.path.is_file() else None
            if info and info.get("pid") == os.getpid():
                held.path.unlink(missing_ok=True)
    except OSError:
        pass
    finally:
        if held.fd is not None:
            with suppress(OSError):
                os.close(held.fd)


atexit.register(release_all)
