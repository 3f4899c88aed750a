"""Problems found in a devmesh.yaml, and how they are shown to people and to programs.

One shape for every finding (schema, semantic check, YAML syntax, env file), so the CLI,
the agent and editors print them the same way: ``FILE:LINE:COL: key.path: message``, the
form compilers use, which terminals and editors turn into links.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

ERROR = "error"
WARNING = "warning"


@dataclass(frozen=True, slots=True)
class Problem:
    file: str
    """The file shown to the user: a path relative to the cwd, an absolute path, or <stdin>."""
    line: int
    """1-based; 0 when the problem is about the whole file (not found, unreadable)."""
    column: int
    """1-based; 0 with line 0."""
    path: str
    """Dotted key path (``services.api.port``); "" for the whole document."""
    message: str
    severity: str = ERROR
    """"error" fails validation; "warning" is shown but validation passes."""

    @property
    def is_error(self) -> bool:
        return self.severity == ERROR


def dotted(path: Sequence[str | int]) -> str:
    """``("services", "api", "command", 0)`` -> ``services.api.command[0]``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + part
    return out


def sort(problems: Iterable[Problem]) -> list[Problem]:
    """By file, then position: the order a reader scrolls the file in."""
    return sorted(problems, key=lambda p: (p.file, p.line, p.column, p.path, p.message))


def placed(
    file: str, pos: Any, path: Sequence[str | int], message: str, severity: str = ERROR
) -> Problem:
    """A problem at ``pos`` (a marks.Position), in the file the position names, else ``file``:
    a value merged from an override file is reported in that file."""
    return Problem(pos.file or file, pos.line, pos.column, dotted(path), message, severity)


def render_one(p: Problem) -> str:
    where = f"{p.file}:{p.line}:{p.column}" if p.line else p.file
    prefix = "warning: " if p.severity == WARNING else ""
    path = f"{p.path}: " if p.path else ""
    return f"{where}: {prefix}{path}{p.message}"


def render(problems: Iterable[Problem]) -> str:
    return "\n".join(render_one(p) for p in problems)


def plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def summary(file: str, project: str | None, services: Sequence[str]) -> str:
    """The one line printed for a valid file."""
    names = f": {', '.join(services)}" if services else ""
    return f"{file}: valid (project {project}, {plural(len(services), 'service')}{names})"


def files_shown(files: Sequence[str]) -> str:
    """The files of one load in a summary line: ``devmesh.yaml + devmesh.override.yaml``."""
    return " + ".join(files)


def invalid(files: Sequence[str], problems: Iterable[Problem]) -> str:
    """The line after the problems of an invalid load: ``FILES: invalid (N problems)``."""
    errors = sum(1 for p in problems if p.is_error)
    return f"{files_shown(files)}: invalid ({plural(errors, 'problem')})"


def to_json(
    *,
    valid: bool,
    file: str,
    files: Sequence[str] | None = None,
    problems: Sequence[Problem],
    project: str | None,
    services: Sequence[str],
) -> str:
    doc: dict[str, Any] = {
        "valid": valid,
        "file": file,
        "files": list(files) if files is not None else ([file] if file else []),
        "problems": [asdict(p) for p in problems],
        "project": project,
        "services": list(services),
    }
    return json.dumps(doc, indent=2)
