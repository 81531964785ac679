"""Result records: the one JSON shape every evaluation produces and every report consumes.

A record is ``{"dataset", "split", "protocol", "method", "metrics": {...}, "n_examples", "seed",
"seconds", "command"}`` (DESIGN.md section 2). Committed result files hold ``{"records": [...]}``.
"""

from __future__ import annotations

import json
import shlex
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from recalign.errors import RecalignInputError
from recalign.io import atomic_write_json

PROTOCOLS = ("candidates", "full", "generation")


@dataclass
class ResultRecord:
    dataset: str
    split: str
    protocol: str
    method: str
    metrics: dict[str, float]
    n_examples: int
    seed: int = 0
    seconds: float = 0.0
    command: str = ""
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        if not d["extra"]:
            d.pop("extra")
        return d

    @classmethod
    def from_dict(cls, d: dict, source: str | None = None) -> ResultRecord:
        required = ("dataset", "split", "protocol", "method", "metrics", "n_examples")
        for k in required:
            if k not in d:
                raise RecalignInputError(f"record is missing '{k}'", source=source)
        known = set(required) | {"seed", "seconds", "command", "extra"}
        extra = dict(d.get("extra", {}))
        extra.update({k: v for k, v in d.items() if k not in known})
        return cls(
            dataset=str(d["dataset"]),
            split=str(d["split"]),
            protocol=str(d["protocol"]),
            method=str(d["method"]),
            metrics={str(k): float(v) for k, v in d["metrics"].items()},
            n_examples=int(d["n_examples"]),
            seed=int(d.get("seed", 0)),
            seconds=float(d.get("seconds", 0.0)),
            command=str(d.get("command", "")),
            extra=extra,
        )


#: The arguments of the running ``recalign`` command (see :func:`set_command_argv`).
_CLI_ARGV: list[str] | None = None


def set_command_argv(argv: list[str] | None) -> None:
    """Record the arguments the ``recalign`` entry point was given (None: no command is running), so that
    a programmatic ``main([...])`` call records its own command, not the host process's argv."""
    global _CLI_ARGV
    _CLI_ARGV = None if argv is None else list(argv)


def current_command() -> str:
    """The command line of this process, shell-quoted, for the ``command`` field."""
    if _CLI_ARGV is not None:
        return " ".join(shlex.quote(a) for a in ["recalign", *_CLI_ARGV])
    argv = list(sys.argv)
    if argv and argv[0].endswith(("recalign", "__main__.py")):
        argv[0] = "recalign"
    return " ".join(shlex.quote(a) for a in argv)


def script_command(script: str, argv: list[str] | None = None) -> str:
    """``python <script> <args>``, shell-quoted, for a benchmark's ``command`` field: ``argv`` as passed to
    its ``main`` (tests call it with a list), else this process's arguments."""
    return shlex.join(["python", script, *(sys.argv[1:] if argv is None else argv)])


def write_records(path: str | Path, records: list[ResultRecord], command: str | None = None) -> None:
    payload: dict = {"records": [r.to_dict() for r in records]}
    if command:
        payload = {"command": command, **payload}
    atomic_write_json(path, payload)


def read_records(path: str | Path) -> list[ResultRecord]:
    """Records from a results file (``{"records": [...]}``), a single record, or a list of records."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise RecalignInputError(f"invalid JSON: {e.msg}", source=path, line=e.lineno) from None
    except UnicodeDecodeError:
        raise RecalignInputError("not UTF-8 text", source=path) from None
    if isinstance(data, dict) and "records" in data:
        items = data["records"]
    elif isinstance(data, dict) and "metrics" in data and "method" in data:
        items = [data]
    elif isinstance(data, list):
        items = data
    else:
        raise RecalignInputError("not a results file (expected {'records': [...]})", source=path)
    return [ResultRecord.from_dict(d, source=str(path)) for d in items]
