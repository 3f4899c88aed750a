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
    write lands at offset 0 (no hole of NUL bytes) and lines stay in order.

    The writer runs until the test has rotated three times under it, then says how many
    lines it wrote, so the count of rotations is the test's choice, not the machine's speed.
    """
    log = tmp_path / "svc.log"
    stop = tmp_path / "stop"
    code = (
        "import os, sys, time\n"
        "i = 0\n"
        "while not os.path.exists(sys.argv[1]):\n"
        "    print(f'line {i:06d}', flush=True)\n"
        "    i += 1\n"
        "    time.sleep(0.001)\n"
        "print(f'wrote {i}', flush=True)\n"
    )
    launch = process.Launch(
        argv=(sys.executable, "-c", code, str(stop)),
        cwd=str(tmp_path),
        env=dict(os.environ),
        log_path=log,
    )
    proc = process.spawn(launch)

    async def main() -> int:
        rotations = 0
        with anyio.fail_after(60):
            while rotations < 3:
                rotations += logs.rotate_if_needed(log, max_bytes=500, keep=50)
                await anyio.sleep(0.005)  # a poll, as the agent's rotation loop does
            stop.touch()
            assert await process.wait(proc) == process.Exit(0, None)
        return rotations

    try:
        rotations = anyio.run(main)
    finally:
        anyio.run(lambda: process.stop(proc, signal="SIGKILL", grace_s=0))
    assert "\0" not in log.read_text()
    seen = []
    for n in range(50, 0, -1):
        rotated = tmp_path / f"svc.log.{n}"
        if rotated.exists():
            text = rotated.read_text()
            assert "\0" not in text
            seen += text.splitlines()
    seen += log.read_text().splitlines()
    assert seen[-1].startswith("wrote ")
    written = int(seen[-1].split()[1])
    # Copy-and-truncate may cut a line written during the copy (documented race): keep whole ones.
    whole = [p for p in (line.split() for line in seen) if len(p) == 2 and len(p[1]) == 6]
    numbers = [int(p[1]) for p in whole]
    assert numbers == sorted(numbers)
    assert numbers[-1] == written - 1
    # The race loses only what is written between the last read and the truncation (a line
    # or two, more if the machine stalls the agent there): never most of the output.
    assert rotations == 3 and written - len(numbers) < written // 2


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


class _Follower:
    """Follows a log in the background; the test waits on what it has seen, never on time."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.started = anyio.Event()
        self._grew = anyio.Event()

    async def seen(self, count: int) -> None:
        """Return once ``count`` lines were yielded."""
        while len(self.lines) < count:
            await self._grew.wait()
            self._grew = anyio.Event()

    def add(self, line: str) -> None:
        self.lines.append(line)
        self._grew.set()


async def _collect(path: Path, count: int, script, **kw) -> list[str]:
    """Follow `path` while `script(follower)` runs; return the first `count` lines. The
    script starts once the follower fixed its starting point."""
    fol = _Follower()
    with anyio.fail_after(10):
        async with (
            anyio.create_task_group() as tg,
            aclosing(logs.follow(path, started=fol.started, **kw)) as it,
        ):

            async def run_script() -> None:
                await fol.started.wait()
                await script(fol)

            tg.start_soon(run_script)
            async for line in it:
                fol.add(line)
                if len(fol.lines) == count:
                    break
    return fol.lines


def test_follow_from_end_yields_only_new_complete_lines(tmp_path):
    log = tmp_path / "svc.log"
    log.write_text("old 1\nold 2\n")

    async def script(fol: _Follower) -> None:
        _append(log, "new 1\nnew ")
        await fol.seen(1)
        _append(log, "2\nnew 3\n")

    lines = anyio.run(lambda: _collect(log, 3, script, poll_s=0.02))
    assert lines == ["new 1", "new 2", "new 3"]


def test_follow_from_start(tmp_path):
    log = tmp_path / "svc.log"
    log.write_text("old 1\n")

    async def script(fol: _Follower) -> None:
        _append(log, "new 1\n")

    lines = anyio.run(lambda: _collect(log, 2, script, from_end=False, poll_s=0.02))
    assert lines == ["old 1", "new 1"]


def test_follow_waits_for_the_file_to_exist(tmp_path):
    log = tmp_path / "later.log"

    async def script(fol: _Follower) -> None:
        _append(log, "hello\nworld\n")

    lines = anyio.run(lambda: _collect(log, 2, script, poll_s=0.02))
    assert lines == ["hello", "world"]


def test_follow_survives_copytruncate_rotation(tmp_path):
    log = tmp_path / "svc.log"
    log.write_text("")

    async def script(fol: _Follower) -> None:
        _append(log, "before 1\nbefore 2\n")
        await fol.seen(2)
        assert logs.rotate_if_needed(log, max_bytes=1)
        _append(log, "after 1\n")  # shorter than what was read: the shrink shows

    lines = anyio.run(lambda: _collect(log, 3, script, poll_s=0.02))
    assert lines == ["before 1", "before 2", "after 1"]
    assert (tmp_path / "svc.log.1").read_text() == "before 1\nbefore 2\n"


def test_follow_survives_rename_rotation(tmp_path):
    log = tmp_path / "svc.log"
    log.write_text("")

    async def script(fol: _Follower) -> None:
        _append(log, "old file\n")
        await fol.seen(1)
        log.rename(tmp_path / "svc.log.old")
        _append(log, "new file\n")

    lines = anyio.run(lambda: _collect(log, 2, script, poll_s=0.02))
    assert lines == ["old file", "new file"]


@pytest.mark.parametrize("size", [0, 1, 8191, 8192, 8193])
def test_tail_block_boundaries(tmp_path, size):
    log = tmp_path / "svc.log"
    log.write_text("x" * size + "\nlast\n")
    assert logs.tail(log, 2) == ["x" * size, "last"]


# ------------------------------------------------------------------- time index


def _written_at(path: Path, text: str, when: float) -> None:
    """Append text as if written at unix time `when` (the mtime is what a stamp reads)."""
    _append(path, text)
    os.utime(path, (when, when))


def test_lines_get_the_time_of_the_stamp_that_first_covered_them(tmp_path):
    log = tmp_path / "svc.log"
    assert logs.timed_lines(log) == []
    assert not logs.stamp(log)  # no file yet: nothing to record
    _written_at(log, "a\nb\n", 1000.0)
    assert logs.stamp(log)
    assert not logs.stamp(log)  # nothing new: no record
    _written_at(log, "c\nd", 1005.5)  # d has no newline yet
    assert logs.stamp(log)
    got = [(ln.text, ln.time_s) for ln in logs.timed_lines(log)]
    assert got == [("a", 1000.0), ("b", 1000.0), ("c", 1005.5), ("d", 1005.5)]
    assert [ln.end for ln in logs.timed_lines(log)] == [2, 4, 6, 7]
    assert [ln.text for ln in logs.timed_lines(log, tail=2)] == ["c", "d"]
    assert [ln.text for ln in logs.timed_lines(log, since_s=1001)] == ["c", "d"]
    assert [ln.text for ln in logs.timed_lines(log, since_s=1000, tail=3)] == ["b", "c", "d"]
    _append(log, "\ne\n")  # not stamped yet: its time is unknown, not made up
    assert [(ln.text, ln.time_s) for ln in logs.timed_lines(log)][-2:] == [
        ("d", None),
        ("e", None),
    ]


def test_lines_written_while_no_agent_ran_get_the_last_write_time(tmp_path):
    """An agent that starts later stamps the backlog with the file's mtime: the time of the
    last write, exact for the last line, an upper bound for the others."""
    log = tmp_path / "svc.log"
    _written_at(log, "early\n", 500.0)
    _written_at(log, "late\n", 900.0)
    assert logs.stamp(log)
    assert [(ln.text, ln.time_s) for ln in logs.timed_lines(log)] == [
        ("early", 900.0),
        ("late", 900.0),
    ]


def test_times_never_go_back_within_a_file(tmp_path):
    log = tmp_path / "svc.log"
    _written_at(log, "a\n", 2000.0)
    logs.stamp(log)
    _written_at(log, "b\n", 1500.0)  # a clock step back
    logs.stamp(log)
    assert [ln.time_s for ln in logs.timed_lines(log)] == [2000.0, 2000.0]


def test_rotation_and_outside_truncation_restart_the_index(tmp_path):
    log = tmp_path / "svc.log"
    _written_at(log, "x" * 30 + "\n", 100.0)
    logs.stamp(log)
    assert logs.times_path(log).exists()
    assert logs.rotate_if_needed(log, max_bytes=10)
    assert not logs.times_path(log).exists()
    _written_at(log, "after\n", 200.0)
    logs.stamp(log)
    assert [(ln.text, ln.time_s) for ln in logs.timed_lines(log)] == [("after", 200.0)]
    log.write_text("")  # truncated by someone else (say `: > svc.log`)
    _written_at(log, "new\n", 300.0)
    logs.stamp(log)
    assert [(ln.text, ln.time_s) for ln in logs.timed_lines(log)] == [("new", 300.0)]


def test_a_full_index_is_halved_keeping_the_newest_record(tmp_path, monkeypatch):
    monkeypatch.setattr(logs, "TIMES_MAX_BYTES", 16 * 5)
    log = tmp_path / "svc.log"
    for n in range(5):
        _written_at(log, f"line {n}\n", 1000.0 + n)
        logs.stamp(log)
    index = logs.TimeIndex(log)
    index.refresh()
    assert index.times == [1000.0, 1002.0, 1004.0]
    got = [(ln.text, ln.time_s) for ln in logs.timed_lines(log)]
    assert got == [
        ("line 0", 1000.0),
        ("line 1", 1002.0),  # coarser, never earlier than it was
        ("line 2", 1002.0),
        ("line 3", 1004.0),
        ("line 4", 1004.0),
    ]


def test_time_index_reads_only_what_was_appended(tmp_path):
    log = tmp_path / "svc.log"
    index = logs.TimeIndex(log)
    index.refresh()
    assert index.time_at(1) is None
    _written_at(log, "a\n", 10.0)
    logs.stamp(log)
    index.refresh()
    _written_at(log, "b\n", 20.0)
    logs.stamp(log)
    index.refresh()
    assert (index.sizes, index.times) == ([2, 4], [10.0, 20.0])
    logs.times_path(log).unlink()
    index.refresh()
    assert index.sizes == [] and index.time_at(2) is None


def test_a_time_shown_by_logs_t_is_never_later_than_the_lines(tmp_path):
    """`logs -t` floors to the millisecond, and `--since` of a shown time includes its line,
    also where rounding to the microsecond would carry a time into the next millisecond."""
    from devmesh.commands.logs import format_time, parse_since

    when = 1_796_281_200.1239996  # fromtimestamp() rounds this to .124000
    assert format_time(when) == "2026-12-03T07:00:00.123Z"
    log = tmp_path / "svc.log"
    _written_at(log, "early\n", when - 1)
    assert logs.stamp(log)
    _written_at(log, "line\n", when)
    assert logs.stamp(log)
    since = parse_since("2026-12-03T07:00:00.124Z", 0.0)  # what rounding used to show
    assert [ln.text for ln in logs.timed_lines(log, since_s=since)] == ["line"]
