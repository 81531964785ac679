"""Errors the user can act on.

Every problem with user-supplied input (data files, configs, command-line values) is raised as a
:class:`RecalignInputError`. Its message is a single line naming *where* (file, and line or field when
known) and *what* is wrong. The CLI catches exactly this type, prints the message and exits with code 2,
so the user never sees a traceback for their own mistake, while genuine bugs still surface as tracebacks.
"""

from __future__ import annotations

from pathlib import Path


class RecalignInputError(ValueError):
    """Bad user input: a file, a field or a value that recalign cannot use.

    Args:
        problem: what is wrong, in a short phrase ("missing column 'item'").
        source: the file (or config) the problem is in, if any.
        line: 1-based line number within ``source``, if known.
        field: the column / config key concerned, if any.
    """

    def __init__(
        self,
        problem: str,
        *,
        source: str | Path | None = None,
        line: int | None = None,
        field: str | None = None,
    ) -> None:
        self.problem = " ".join(str(problem).split())  # always one line
        self.source = str(source) if source is not None else None
        self.line = line
        self.field = field
        super().__init__(self.format())

    def format(self) -> str:
        where = []
        if self.source:
            where.append(self.source if self.line is None else f"{self.source}:{self.line}")
        elif self.line is not None:
            where.append(f"line {self.line}")
        if self.field:
            where.append(f"field '{self.field}'")
        prefix = ", ".join(where)
        return f"{prefix}: {self.problem}" if prefix else self.problem
