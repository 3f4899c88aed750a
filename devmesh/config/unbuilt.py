"""Keys the schema accepts whose feature is not built yet, and the warning each one gets.

Why: the schema describes the whole product so that files written today keep working,
but a key that is silently accepted and does nothing misleads: a user who writes
``db: {engine: postgres}`` expects a database. So every such key is named here, once,
with what is missing, and the loader turns each key present in a file into a warning
at the key (``devmesh.yaml:12:5: services.api.db: not built yet: ...``). Every command
that loads a config (validate, up, plan) shows it. When a feature lands, its row is
deleted, and nothing else changes.

A row may apply only to some values (``applies``): a value that asks for what already
happens must not warn. The table is empty while every key of the schema is built; the
mechanism stays so that the next key added ahead of its feature is one row.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from devmesh.config import marks as marks_mod
from devmesh.config import report

Key = tuple[str | int, ...]


def _always(value: Any, parent: Mapping[str, Any]) -> bool:
    return True


@dataclass(frozen=True, slots=True, kw_only=True)
class Row:
    key: str
    """Dotted key path; ``<name>`` matches any service name."""
    missing: str
    """What is not built, and what happens instead; follows "not built yet: "."""
    applies: Callable[[Any, Mapping[str, Any]], bool] = _always
    """(value, the mapping that holds the key) -> whether this use of the key is affected."""
    when: str = "present"
    """``applies`` in words, for the docs."""


TABLE: tuple[Row, ...] = ()
"""Empty today: every key of the schema does what its description says."""


def _matches(
    value: Any, parts: list[str], path: Key
) -> Iterator[tuple[Key, Any, Mapping[str, Any]]]:
    """(path, value, parent) of each key of ``value`` that the pattern ``parts`` names."""
    if not parts or not isinstance(value, Mapping):
        return
    head, rest = parts[0], parts[1:]
    keys = list(value) if head == "<name>" else [head] if head in value else []
    for key in keys:
        child = value[key]
        if rest:
            yield from _matches(child, rest, (*path, key))
        else:
            yield (*path, key), child, value


def warnings(doc: Any, marks: marks_mod.Marks, file: str) -> list[report.Problem]:
    """A warning, at the key, for each use in ``doc`` of a key of TABLE that applies."""
    out: list[report.Problem] = []
    for row in TABLE:
        for path, value, parent in _matches(doc, row.key.split("."), ()):
            if not row.applies(value, parent):
                continue
            out.append(
                report.placed(
                    file, marks.key(path), path, f"not built yet: {row.missing}", report.WARNING
                )
            )
    return out
