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

Times. Because the service writes straight into the file, its lines carry no time, and none
can be added without a pipe through the agent. Instead a *time index* sits next to each log
(``api.log.times``): fixed-size records ``(size, time)`` meaning "the file had grown to
``size`` bytes by ``time``". The agent appends one with ``stamp`` each time it polls and finds
the file grown, taking ``time`` from the file's mtime: the moment of the last write, which is
exact for the last line of the batch and an upper bound, at most one poll later, for the others.
Bytes written while no agent ran are stamped when the next agent first polls, with the mtime
of then: the time of the last write before it started. A line's time is the one of the first
record that covers its newline. The index is dropped when the log rotates (the kept copies
have none) and halved, keeping every other record, once it reaches ``TIMES_MAX_BYTES``, which
only coarsens the times of old lines.
"""

from __future__ import annotations

import bisect
import os
import shutil
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import anyio
import anyio.lowlevel

_BLOCK = 8192
_READ_MAX = 1 << 20
"""Bytes read per poll by ``follow``, so one huge burst cannot stall the event loop."""
_RECORD = struct.Struct("<Qd")
"""One time-index record: the log's size in bytes, and the unix time it had that size by."""
TIMES_MAX_BYTES = 1 << 20
"""Size at which a time index is halved (65536 records)."""


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
    times_path(path).unlink(missing_ok=True)  # its offsets described the bytes just moved
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


async def follow(
    path: Path,
    *,
    from_end: bool = True,
    poll_s: float = 0.1,
    started: anyio.Event | None = None,
) -> AsyncIterator[str]:
    """Yield complete lines (without newline) as they are appended to ``path``, forever.

    Starts at the current end when ``from_end`` and the file exists, else at the beginning
    (a file that appears later is read from its start). ``started`` is set once that start
    is fixed: whatever is appended afterwards will be yielded. Close the iterator to stop.
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
                    if started is not None:
                        started.set()
                    await anyio.sleep(poll_s)
                    continue
                inode = os.fstat(f.fileno()).st_ino
                pos = f.seek(0, os.SEEK_END) if (first and from_end) else 0
                first = False
                if started is not None:
                    started.set()
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


# ------------------------------------------------------------------- time index


def times_path(path: Path) -> Path:
    """The time index of log ``path``."""
    return path.with_name(path.name + ".times")


def _last_record(index: Path) -> tuple[int, float] | None:
    try:
        with open(index, "rb") as f:
            end = f.seek(0, os.SEEK_END)
            end -= end % _RECORD.size  # a torn last record (crash mid-write) is ignored
            if end == 0:
                return None
            f.seek(end - _RECORD.size)
            size, when = _RECORD.unpack(f.read(_RECORD.size))
            return int(size), float(when)
    except FileNotFoundError:
        return None


def stamp(path: Path) -> bool:
    """Record in the time index that ``path`` has its current size by its mtime.

    True when a record was added (the file grew since the last one). A file smaller than the
    last record was truncated by someone else: its index starts again.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    index = times_path(path)
    last = _last_record(index)
    if last is not None and st.st_size < last[0]:
        index.unlink(missing_ok=True)
        last = None
    if st.st_size <= (last[0] if last else 0):
        return False
    when = max(st.st_mtime, last[1] if last else 0.0)  # times never go back within a file
    with open(index, "ab") as f:
        f.write(_RECORD.pack(st.st_size, when))
        full = f.tell() >= TIMES_MAX_BYTES
    if full:
        _halve(index)
    return True


def _halve(index: Path) -> None:
    """Keep every other record, the last one always: old lines get coarser times."""
    data = index.read_bytes()
    n = _RECORD.size
    records = [data[i : i + n] for i in range(0, len(data) - len(data) % n, n)]
    kept = records[(len(records) - 1) % 2 :: 2]  # ends with the last record
    tmp = index.with_name(index.name + ".tmp")
    tmp.write_bytes(b"".join(kept))
    tmp.replace(index)


class TimeIndex:
    """A log's time index, read incrementally: ``time_at(offset)`` after ``refresh()``."""

    def __init__(self, path: Path) -> None:
        self.index = times_path(path)
        self.sizes: list[int] = []
        self.times: list[float] = []
        self._read = 0
        self._inode: int | None = None

    def refresh(self) -> None:
        """Read the records appended since the last call (all again after a reset)."""
        try:
            with open(self.index, "rb") as f:
                st = os.fstat(f.fileno())
                if st.st_ino != self._inode or st.st_size < self._read:
                    self.sizes, self.times, self._read = [], [], 0
                    self._inode = st.st_ino
                f.seek(self._read)
                data = f.read()
        except FileNotFoundError:
            self.sizes, self.times, self._read, self._inode = [], [], 0, None
            return
        data = data[: len(data) - len(data) % _RECORD.size]
        self._read += len(data)
        for size, when in _RECORD.iter_unpack(data):
            self.sizes.append(size)
            self.times.append(when)

    def time_at(self, end: int) -> float | None:
        """When the byte just before offset ``end`` was first seen; None when not yet."""
        i = bisect.bisect_left(self.sizes, end)
        return self.times[i] if i < len(self.times) else None


@dataclass(frozen=True, slots=True, kw_only=True)
class TimedLine:
    text: str
    """The line without its newline."""
    time_s: float | None
    """Unix time it was first seen (see the module docstring); None when unknown."""
    end: int
    """Offset just past its newline, so a follower knows where to continue."""


def _start_of_tail(f: BinaryIO, end: int, lines: int) -> int:
    """Offset at which the last ``lines`` lines of the open file ``f`` start."""
    pos = end
    newlines = 0
    data = b""
    while pos > 0 and newlines <= lines:
        step = min(_BLOCK, pos)
        pos -= step
        f.seek(pos)
        block = f.read(step)
        data = block + data
        newlines += block.count(b"\n")
    # Drop whole lines from the front until exactly `lines` remain (the last may be open).
    body = data[:-1] if data.endswith(b"\n") else data
    cut = len(body)
    for _ in range(lines):
        cut = body.rfind(b"\n", 0, cut)
        if cut < 0:
            return pos
    return pos + cut + 1


SINCE_SLACK_S = 0.0005
"""Half the millisecond that `logs -t` shows: a time copied from its output into `--since`
includes that line even when rounding to the microsecond carried it into the next millisecond."""


def timed_lines(
    path: Path, *, tail: int | None = None, since_s: float | None = None
) -> list[TimedLine]:
    """The lines of ``path`` with their times: the last ``tail`` (all when None) of those
    seen at or after ``since_s``. Lines are in file order, which is time order."""
    if tail is not None and tail <= 0:
        return []
    index = TimeIndex(path)
    index.refresh()
    try:
        with open(path, "rb") as f:
            end = f.seek(0, os.SEEK_END)
            start = 0 if tail is None else _start_of_tail(f, end, tail)
            f.seek(start)
            data = f.read(end - start)
    except FileNotFoundError:
        return []
    out: list[TimedLine] = []
    pos = start
    for raw in data.split(b"\n"):
        if not raw and pos >= end:
            break
        pos += len(raw) + 1
        line_end = min(pos, end)
        when = index.time_at(line_end)
        if since_s is not None and when is not None and when < since_s - SINCE_SLACK_S:
            continue
        out.append(TimedLine(text=raw.decode("utf-8", "replace"), time_s=when, end=line_end))
    return out
