"""Log files: copytruncate rotation (also under a live writer), tail, follow across rotation."""

from __future__ import annotations

import os
import sys
from contextlib import aclosing
from pathlib import Path

import anyio
import pytest

from devmesh.supervisor import logs, process


def _append(path: Path, text: str) -> None:
    with open(path, "a") as f:
        f.write(text)


def test_rotate_shifts_copies_and_truncates(tmp_path):
    log = tmp_path / "svc.log"
    assert not logs.rotate_if_needed(log, max_bytes=10)  # missing file
    log.write_text("first rotation\n")
    assert not logs.rotate_if_needed(log, max_bytes=100)
    assert logs.rotate_if_needed(log, max_bytes=10, keep=2)
    assert log.read_text() == ""
    assert (tmp_path / "svc.log.1").read_text() == "first rotation\n"
    log.write_text("second rotation\n")
    assert logs.rotate_if_needed(log, max_bytes=10, keep=2)
    log.write_text("third rotation\n")
    assert logs.rotate_if_needed(log, max_bytes=10, keep=2)
    assert (tmp_path / "svc.log.1").read_text() == "third rotation\n"
    assert (tmp_path / "svc.log.2").read_text() == "second rotation\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["svc.log", "svc.log.1", "svc.log.2"]


def test_rotate_with_keep_zero_only_truncates(tmp_path):
    log = tmp_path / "svc.log"
    log.write_text("x" * 20)
    assert logs.rotate_if_needed(log, max_bytes=10, keep=0)
    assert log.read_text() == ""
    assert [p.name for p in tmp_path.iterdir()] == ["svc.log"]


def test_rotate_under_a_live_o_append_writer(tmp_path):
    """The child keeps writing through its inherited O_APPEND fd; after truncation its next
    write lands at offset 0 (no hole of NUL bytes) and lines stay in order."""
    log = tmp_path / "svc.log"
    code = (
        "import sys, time\n"
        "for i in range(400):\n"
        "    print(f'line {i:04d}', flush=True)\n"
        "    time.sleep(0.002)\n"
    )
    launch = process.Launch(
        argv=(sys.executable, "-c", code), cwd=str(tmp_path), env=dict(os.environ), log_path=log
    )
    proc = process.spawn(launch)

    async def main() -> int:
        rotations = 0
        with anyio.fail_after(30):
            while process.alive(proc):
                rotations += logs.rotate_if_needed(log, max_bytes=500, keep=50)
                await anyio.sleep(0.01)
            assert await process.wait(proc) == process.Exit(0, None)
        return rotations

    try:
        rotations = anyio.run(main)
    finally:
        anyio.run(lambda: process.stop(proc, signal="SIGKILL", grace_s=0))
    assert rotations >= 2
    assert "\0" not in log.read_text()
    seen = []
    for n in range(50, 0, -1):
        rotated = tmp_path / f"svc.log.{n}"
        if rotated.exists():
            text = rotated.read_text()
            assert "\0" not in text
            seen += text.splitlines()
    seen += log.read_text().splitlines()
    # Copy-and-truncate may cut a line written during the copy (documented race): keep whole ones.
    whole = [p for p in (line.split() for line in seen) if len(p) == 2 and len(p[1]) == 4]
    numbers = [int(p[1]) for p in whole]
    assert len(numbers) >= 300
    assert numbers == sorted(numbers)
    assert numbers[-1] == 399
    assert len(numbers) > 300  # the copytruncate race may lose a few, never many


def test_tail(tmp_path):
    log = tmp_path / "svc.log"
    assert logs.tail(log, 5) == []
    log.write_text("".join(f"line {i}\n" for i in range(10_000)))
    assert logs.tail(log, 3) == ["line 9997", "line 9998", "line 9999"]
    assert logs.tail(log, 0) == []
    _append(log, "partial")
    assert logs.tail(log, 2) == ["line 9999", "partial"]
    short = tmp_path / "short.log"
    short.write_text("a\nb\n")
    assert logs.tail(short, 10) == ["a", "b"]


def test_tail_with_lines_longer_than_a_block(tmp_path):
    log = tmp_path / "svc.log"
    long_lines = [c * 20_000 for c in "abc"]
    log.write_text("\n".join(long_lines) + "\n")
    assert logs.tail(log, 2) == long_lines[1:]
    assert logs.tail(log, 3) == long_lines


async def _collect(path: Path, count: int, script, **kw) -> list[str]:
    """Follow `path` while `script` runs; return the first `count` lines."""
    lines: list[str] = []
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg, aclosing(logs.follow(path, **kw)) as it:
            tg.start_soon(script)
            async for line in it:
                lines.append(line)
                if len(lines) == count:
                    break
    return lines


def test_follow_from_end_yields_only_new_complete_lines(tmp_path):
    log = tmp_path / "svc.log"
    log.write_text("old 1\nold 2\n")

    async def script() -> None:
        await anyio.sleep(0.1)
        _append(log, "new 1\nnew ")
        await anyio.sleep(0.1)
        _append(log, "2\nnew 3\n")

    lines = anyio.run(lambda: _collect(log, 3, script, poll_s=0.02))
    assert lines == ["new 1", "new 2", "new 3"]


def test_follow_from_start(tmp_path):
    log = tmp_path / "svc.log"
    log.write_text("old 1\n")

    async def script() -> None:
        _append(log, "new 1\n")

    lines = anyio.run(lambda: _collect(log, 2, script, from_end=False, poll_s=0.02))
    assert lines == ["old 1", "new 1"]


def test_follow_waits_for_the_file_to_exist(tmp_path):
    log = tmp_path / "later.log"

    async def script() -> None:
        await anyio.sleep(0.1)
        _append(log, "hello\nworld\n")

    lines = anyio.run(lambda: _collect(log, 2, script, poll_s=0.02))
    assert lines == ["hello", "world"]


def test_follow_survives_copytruncate_rotation(tmp_path):
    log = tmp_path / "svc.log"
    log.write_text("")

    async def script() -> None:
        _append(log, "before 1\nbefore 2\n")
        await anyio.sleep(0.1)
        assert logs.rotate_if_needed(log, max_bytes=1)
        await anyio.sleep(0.1)
        _append(log, "after 1\n")

    lines = anyio.run(lambda: _collect(log, 3, script, poll_s=0.02))
    assert lines == ["before 1", "before 2", "after 1"]
    assert (tmp_path / "svc.log.1").read_text() == "before 1\nbefore 2\n"


def test_follow_survives_rename_rotation(tmp_path):
    log = tmp_path / "svc.log"
    log.write_text("")

    async def script() -> None:
        _append(log, "old file\n")
        await anyio.sleep(0.1)
        log.rename(tmp_path / "svc.log.old")
        await anyio.sleep(0.1)
        _append(log, "new file\n")

    lines = anyio.run(lambda: _collect(log, 2, script, poll_s=0.02))
    assert lines == ["old file", "new file"]


@pytest.mark.parametrize("size", [0, 1, 8191, 8192, 8193])
def test_tail_block_boundaries(tmp_path, size):
    log = tmp_path / "svc.log"
    log.write_text("x" * size + "\nlast\n")
    assert logs.tail(log, 2) == ["x" * size, "last"]
