"""Several devmesh files merged into one document, as docker compose merges override files.

Why: a team commits one devmesh.yaml per repository, and each developer changes what runs
on their own machine in a ``devmesh.override.yaml`` beside it (``services: {api: {remote:
true}}``) without editing the committed file. Compose users know the rule, so it is
compose's: the files are applied in order, each on top of the result so far;

- a mapping merges key by key: a key only in the later file is added (after the keys the
  earlier files wrote), a key in both takes the later file's value, merged again when both
  values are mappings;
- a scalar or a sequence (``command: [...]``, ``depends_on: [a, b]``, ``init``) replaces
  the earlier value whole; so does a value of another type (a list over a mapping);
- ``!reset`` on a value (``fallback: !reset``) removes the key, ``!override`` on a mapping
  replaces the earlier mapping instead of merging into it (compose's tags).

The marks follow the values: every position in the merged ``Marks`` is the position, in
its own file, of the value that won, so an error in a value from the override names the
override file and its line. Pure: no I/O.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from devmesh.config import marks as marks_mod
from devmesh.config import report

MERGE_TAGS = marks_mod.MERGE_TAGS

Path = marks_mod.Path


@dataclass(frozen=True, slots=True)
class Layer:
    """One parsed file: its data (a mapping) and where each value was written."""

    data: dict[str, Any]
    marks: marks_mod.Marks
    file: str
    """The file as shown in messages."""


@dataclass(slots=True)
class Merged:
    data: dict[str, Any]
    marks: marks_mod.Marks
    added: dict[Path, str] = field(default_factory=dict)
    """Paths of the mapping entries a later file added (no earlier file had the key), with
    that file; the first file's entries are not listed."""


def merge(layers: Sequence[Layer]) -> Merged:
    """The layers applied in order (see the module docstring)."""
    out = Merged({}, marks_mod.Marks())
    for index, layer in enumerate(layers):
        out.marks.duplicates += layer.marks.duplicates
        if index == 0:
            out.marks.values[()] = layer.marks.value(())
        out.data = _mapping(out.data, layer.data, (), layer, out, first=index == 0)
    return out


def _mapping(
    result: dict[str, Any],
    over: dict[str, Any],
    path: Path,
    layer: Layer,
    out: Merged,
    *,
    first: bool,
) -> dict[str, Any]:
    """``over`` (of ``layer``) merged onto ``result`` (a new dict; neither is changed)."""
    result = dict(result)
    for key, value in over.items():
        child = (*path, key)
        tag = layer.marks.tags.get(child)
        if key in result:
            old = result[key]
            if isinstance(old, dict) and isinstance(value, dict) and tag not in MERGE_TAGS:
                result[key] = _mapping(old, value, child, layer, out, first=first)
                continue
            _forget(out.marks, child)
            if tag == "!reset":
                del result[key]
                out.added.pop(child, None)
                continue
        elif tag == "!reset":
            continue
        elif not first:
            out.added[child] = layer.file
        result[key] = _take(layer.marks, out.marks, child, value)  # keeps its place
    return result


def _take(src: marks_mod.Marks, dst: marks_mod.Marks, path: Path, value: Any) -> Any:
    """``value`` as it enters the result, its marks copied from src into dst; entries
    written ``!reset`` inside it are dropped (there is nothing below them to reset)."""
    for table_src, table_dst in ((src.keys, dst.keys), (src.values, dst.values)):
        if path in table_src:
            table_dst[path] = table_src[path]
    if path in src.raw:
        dst.raw[path] = src.raw[path]
    if isinstance(value, dict):
        return {
            k: _take(src, dst, (*path, k), v)
            for k, v in value.items()
            if src.tags.get((*path, k)) != "!reset"
        }
    if isinstance(value, list):
        return [_take(src, dst, (*path, i), v) for i, v in enumerate(value)]
    return value


def _forget(marks: marks_mod.Marks, path: Path) -> None:
    """Drop the marks at ``path`` and below (a value that is replaced or removed)."""
    n = len(path)
    for table in (marks.keys, marks.values, marks.raw):
        for p in [p for p in table if p[:n] == path]:
            del table[p]


DECLARING_KEYS = ("command", "version", "fallback", "project")
"""A service an override file adds must have one of these: what makes it a service."""


def partial_services(merged: Merged, first: str) -> list[report.Problem]:
    """An error for each service a later file adds that it does not declare.

    ``services: {apii: {remote: true}}`` in devmesh.override.yaml, for a service the
    committed file does not have, is almost always a misspelt name: merged, it would be a
    service of its own that runs nowhere, while the real one still runs here. Compose adds
    such a service too, then fails on it for want of an image; we say so at the key.
    """
    services = merged.data.get("services")
    if not isinstance(services, dict):
        return []
    known = [str(n) for n in services if ("services", n) not in merged.added]
    out: list[report.Problem] = []
    for path, file in merged.added.items():
        if len(path) != 2 or path[0] != "services":
            continue
        name = str(path[1])
        service = services.get(name)
        if not isinstance(service, dict) or any(k in service for k in DECLARING_KEYS):
            continue
        close = difflib.get_close_matches(name, known, n=1)
        hint = (
            f"did you mean {close[0]!r}? "
            if close
            else f"the services of {first} are: {', '.join(known) or 'none'}; "
        )
        given = ", ".join(map(str, service)) or "nothing"
        out.append(
            report.placed(
                file,
                merged.marks.key(path),
                path,
                f"service {name!r} is in no earlier file, and {file} gives it only {given}: "
                f"{hint}an override changes a service by its exact name, and a service it "
                "adds needs a definition (command and version, or version, fallback or "
                "project for one that runs elsewhere)",
            )
        )
    return out
