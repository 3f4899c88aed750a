"""Log lines for `devmesh logs` and attached `devmesh up`, from the per-service files.

Why offsets are taken before anything is yielded: attached `up` opens this feed, waits for
its ``{"ready": true}`` item and only then applies the project, so no line a starting
service writes can fall between "feed opened" and "feed following". Rotation is
copy-and-truncate, so a file that shrinks is read again from its start.

Times come from each log's time index (see ``supervisor.logs``), which ``stamp_forever``
keeps current while the agent runs and which the feed itself stamps before it reads, so
every line it yields has a time. Lines of several services are merged in time order: the
first batch as a whole, then each poll's new lines. Lines with the same time keep the order
of their files, then of the services as asked.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import anyio

from devmesh.supervisor import logs

POLL_S = 0.1
"""How often new lines are looked for, and logs stamped: the precision of their times."""
CHUNK = 65536


def _size(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0


def _item(label: str, line: str, time_s: float | None) -> dict[str, Any]:
    return {"service": label, "line": line, "time": time_s}


def _order(time_s: float | None) -> float:
    return float("inf") if time_s is None else time_s


async def feed(
    paths: Mapping[str, Path],
    *,
    tail: int | None,
    follow: bool,
    since_s: float | None = None,
) -> AsyncIterator[dict[str, Any]]:
    """Items ``{"service", "line", "time"}``: the last ``tail`` lines of each log (all when
    None) seen at or after ``since_s``, merged in time order; then ``{"ready": true}``; then,
    when ``follow``, new lines as they come."""
    offsets = {label: _size(p) for label, p in paths.items()}
    for p in paths.values():
        with contextlib.suppress(OSError):
            logs.stamp(p)
    if tail != 0:
        batch: list[tuple[float, int, int, str, logs.TimedLine]] = []
        for rank, (label, p) in enumerate(paths.items()):
            lines = logs.timed_lines(p, tail=tail, since_s=since_s)
            if lines:
                offsets[label] = max(offsets[label], lines[-1].end)
            batch.extend((_order(ln.time_s), rank, n, label, ln) for n, ln in enumerate(lines))
        batch.sort(key=lambda b: b[:3])
        for _, _, _, label, ln in batch:
            yield _item(label, ln.text, ln.time_s)
    yield {"ready": True}
    if not follow:
        return
    partial = dict.fromkeys(paths, b"")
    indexes = {label: logs.TimeIndex(p) for label, p in paths.items()}
    while True:
        fresh: list[tuple[float, int, int, str, str, float | None]] = []
        for rank, (label, p) in enumerate(paths.items()):
            with contextlib.suppress(OSError):
                logs.stamp(p)
            size = _size(p)
            if size < offsets[label]:
                offsets[label], partial[label] = 0, b""
            if size == offsets[label]:
                continue
            with open(p, "rb") as f:
                f.seek(offsets[label])
                data = f.read(min(CHUNK, size - offsets[label]))
            start = offsets[label] - len(partial[label])
            offsets[label] += len(data)
            *complete, partial[label] = (partial[label] + data).split(b"\n")
            index = indexes[label]
            index.refresh()
            for n, raw in enumerate(complete):
                start += len(raw) + 1
                when = index.time_at(start)
                fresh.append((_order(when), rank, n, label, raw.decode("utf-8", "replace"), when))
        if not fresh:
            await anyio.sleep(POLL_S)
            continue
        fresh.sort(key=lambda b: b[:3])
        for _, _, _, label, line, when in fresh:
            yield _item(label, line, when)


async def stamp_forever(paths: Callable[[], Iterable[Path]], *, poll_s: float = POLL_S) -> None:
    """Keep the time index of every log ``paths()`` names current, so each line gets the
    time it was written to within ``poll_s``, whether or not anyone reads the logs."""
    seen: dict[Path, tuple[int, int]] = {}
    while True:
        current: dict[Path, tuple[int, int]] = {}
        for p in paths():
            with contextlib.suppress(OSError):
                st = os.stat(p)
                current[p] = (st.st_size, st.st_mtime_ns)
                if seen.get(p) != current[p]:  # the index is read only when the log changed
                    logs.stamp(p)
        seen = current
        await anyio.sleep(poll_s)
