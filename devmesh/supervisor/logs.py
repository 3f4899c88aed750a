"""Per-service log files: rotation, tail, follow.

Why it exists: a service writes its stdout and stderr straight into its log file (the fd is
inherited with O_APPEND, no pipe through the agent), so the service never blocks on a slow
agent and its output survives an agent restart. The price is that the agent cannot reopen the
file for the child: rotation must be *copytruncate*, as logrotate does for such programs.

The race of copytruncate, accepted: bytes the service appends between the copy and the
truncation are lost. ``rotate_if_needed`` narrows the window by copying, then appending to the
copy whatever arrived meanwhile, then truncating, so the loss is bounded by what the service
writes in the microseconds between the last read and ``ftruncate``. Because the child writes
with O_APPEND, its next write lands at the new end (offset 0), never beyond a hole.

``follow`` tolerates rotation: when the file shrinks below the read position it starts again
from the beginning; when the path is replaced by another file (rename rotation) it drains the
old one and switches. What it does not guarantee: a truncation followed, within one poll, by
more bytes than were read before is not detectable by size and those bytes are read from the
old offset on (some lines lost); with 0.1 s polls and megabyte-sized rotation this is rare.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import anyio.lowlevel

_BLOCK = 8192
_READ_MAX = 1 << 20
"""Bytes read per poll by ``follow``, so one huge burst cannot stall the event loop."""


def _numbered(path: Path, n: int) -> Path:
    return path.with_name(f"{path.name}.{n}")


def rotate_if_needed(path: Path, *, max_bytes: int = 10 * 2**20, keep: int = 3) -> bool:
    """Rotate ``path`` to ``path.1`` (older ones to ``.2`` ... ``.keep``) once it reaches
    ``max_bytes``; True when it rotated. ``keep=0`` truncates without keeping a copy."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return False
    if size < max_bytes:
        return False
    if keep > 0:
        _numbered(path, keep).unlink(missing_ok=True)
        for n in range(keep - 1, 0, -1):
            older = _numbered(path, n)
            if older.exists():
                older.replace(_numbered(path, n + 1))
    with open(path, "r+b") as live:
        if keep > 0:
            with open(_numbered(path, 1), "wb") as copy:
                shutil.copyfileobj(live, copy)
                # Whatever the service appended during the copy, then truncate at once.
                copy.write(live.read())
        live.truncate(0)
    return True


def tail(path: Path, lines: int) -> list[str]:
    """The last ``lines`` lines of ``path`` (without newlines), reading backwards by blocks."""
    if lines <= 0:
        return []
    try:
        with open(path, "rb") as f:
            end = f.seek(0, os.SEEK_END)
            pos = end
            data = b""
            # lines + 1 newlines guarantee `lines` complete lines (the last may lack its newline)
            while pos > 0 and data.count(b"\n") <= lines:
                step = min(_BLOCK, pos)
                pos -= step
                f.seek(pos)
                data = f.read(step) + data
    except FileNotFoundError:
        return []
    text = data.decode("utf-8", "replace")
    out = text.split("\n")
    if out and out[-1] == "":
        out.pop()
    return out[-lines:]


async def follow(path: Path, *, from_end: bool = True, poll_s: float = 0.1) -> AsyncIterator[str]:
    """Yield complete lines (without newline) as they are appended to ``path``, forever.

    Starts at the current end when ``from_end`` and the file exists, else at the beginning
    (a file that appears later is read from its start). Close the iterator to stop.
    """
    f = None
    inode: int | None = None
    pos = 0
    buffer = b""
    first = True
    try:
        while True:
            if f is None:
                try:
                    f = open(path, "rb")  # noqa: SIM115 (kept across polls, closed in finally)
                except FileNotFoundError:
                    first = False
                    await anyio.sleep(poll_s)
                    continue
                inode = os.fstat(f.fileno()).st_ino
                pos = f.seek(0, os.SEEK_END) if (first and from_end) else 0
                first = False
            size = os.fstat(f.fileno()).st_size
            if size < pos:  # truncated (copytruncate rotation): start over at the top
                pos = 0
            f.seek(pos)
            chunk = f.read(_READ_MAX)
            pos += len(chunk)
            buffer += chunk
            *complete, buffer = buffer.split(b"\n")
            for line in complete:
                yield line.decode("utf-8", "replace")
            if len(chunk) == _READ_MAX:
                await anyio.lowlevel.checkpoint()
                continue
            try:
                replaced = path.stat().st_ino != inode
            except FileNotFoundError:
                replaced = True
            if replaced:  # rename rotation: the old file is drained; read the new one
                f.close()
                f = None
                continue
            await anyio.sleep(poll_s)
    finally:
        if f is not None:
            f.close()
