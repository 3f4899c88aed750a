"""Log lines for `devmesh logs` and attached `devmesh up`, from the per-service files.

Why offsets are taken before anything is yielded: attached `up` opens this feed, waits for
its ``{"ready": true}`` item and only then applies the project, so no line a starting
service writes can fall between "feed opened" and "feed following". Rotation is
copy-and-truncate, so a file that shrinks is read again from its start.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import anyio

from devmesh.supervisor import logs

POLL_S = 0.1
CHUNK = 65536


def _size(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0


async def feed(
    paths: Mapping[str, Path], *, tail: int, follow: bool
) -> AsyncIterator[dict[str, Any]]:
    offsets = {label: _size(p) for label, p in paths.items()}
    if tail:
        for label, p in paths.items():
            for line in logs.tail(p, tail):
                yield {"service": label, "line": line}
    yield {"ready": True}
    if not follow:
        return
    partial = dict.fromkeys(paths, b"")
    while True:
        idle = True
        for label, p in paths.items():
            size = _size(p)
            if size < offsets[label]:
                offsets[label], partial[label] = 0, b""
            if size == offsets[label]:
                continue
            idle = False
            with open(p, "rb") as f:
                f.seek(offsets[label])
                data = f.read(min(CHUNK, size - offsets[label]))
            offsets[label] += len(data)
            *lines, partial[label] = (partial[label] + data).split(b"\n")
            for raw in lines:
                yield {"service": label, "line": raw.decode("utf-8", "replace")}
        if idle:
            await anyio.sleep(POLL_S)
