"""The process driver against real processes: spawn, wait, stop a whole tree, adopt."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import psutil
import pytest

from devmesh.supervisor import process


def _launch(tmp_path: Path, code: str, **kw: object) -> process.Launch:
    args = {
        "argv": (sys.executable, "-c", textwrap.dedent(code)),
        "cwd": str(tmp_path),
        "env": dict(os.environ),
        "log_path": tmp_path / "logs" / "svc.log",
    }
    args.update(kw)
    return process.Launch(**args)  # type: ignore[arg-type]


def _wait_for_file(path: Path, timeout_s: float = 10) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().endswith("\n"):
            return path.read_text()
        time.sleep(0.01)
    log = path.parent / "logs" / "svc.log"
    output = log.read_text() if log.exists() else "(no log)"
    raise AssertionError(f"{path} was not written within {timeout_s} s; log: {output}")


def _session_entries(sid: int) -> list[int]:
    """Every /proc entry of the session, zombies included."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                raw = (entry / "stat").read_text()
            except OSError:
                continue
            if int(raw[raw.rfind(")") + 2 :].split()[3]) == sid:
                found.append(int(entry.name))
    return found


@pytest.fixture
def procs() -> Iterator[list[process.Proc]]:
    """Procs spawned by a test; whatever is left is SIGKILLed and reaped at teardown."""
    spawned: list[process.Proc] = []
    yield spawned
    for proc in spawned:
        anyio.run(lambda p=proc: process.stop(p, signal="SIGKILL", grace_s=0))


@pytest.fixture
def subreaper() -> Iterator[None]:
    """Orphaned grandchildren come to us (not to a pid 1 that may never reap them)."""
    process.set_child_subreaper(True)
    yield
    process.set_child_subreaper(False)


def test_spawn_appends_stdout_and_stderr_to_the_log(tmp_path, procs):
    code = """
        import os, sys
        print("out", os.getcwd(), os.environ.get("ONLY_HERE"), os.environ.get("HOME"))
        sys.stdout.flush()
        print("err", file=sys.stderr)
        sys.exit(3)
    """
    env = {"PATH": os.environ["PATH"], "ONLY_HERE": "yes"}
    for _ in range(2):
        before = time.time()
        proc = process.spawn(_launch(tmp_path, code, env=env))
        procs.append(proc)
        assert proc.sid == proc.pid
        assert before <= proc.started_at <= time.time()  # the wall clock at spawn
        result = anyio.run(process.wait, proc)
        assert result == process.Exit(3, None)
        assert result.describe() == "exited with code 3"
    line = f"out {tmp_path} yes None\nerr\n"
    assert (tmp_path / "logs" / "svc.log").read_text() == line * 2


def test_spawn_resolves_argv0_on_the_launch_path_not_ours(tmp_path, procs):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    tool = bin_dir / "devmesh-test-tool"
    tool.write_text(f"#!{sys.executable}\nprint('tool ran')\n")
    tool.chmod(0o755)
    launch = _launch(tmp_path, "", argv=("devmesh-test-tool",), env={"PATH": f"/nowhere:{bin_dir}"})
    proc = process.spawn(launch)
    procs.append(proc)
    assert anyio.run(process.wait, proc) == process.Exit(0, None)
    assert launch.log_path.read_text() == "tool ran\n"


def test_spawn_not_found_names_the_command_path_and_cwd(tmp_path):
    launch = _launch(tmp_path, "", argv=("no-such-tool",), env={"PATH": "/nope:/nada"})
    with pytest.raises(process.SpawnError) as info:
        process.spawn(launch)
    assert info.value.kind == "not_found"
    assert str(info.value) == (
        f"cannot start 'no-such-tool': not found on PATH (PATH=/nope:/nada, cwd={tmp_path})"
    )


def test_spawn_relative_path_missing(tmp_path):
    launch = _launch(tmp_path, "", argv=("./run.sh",), env={"PATH": "/usr/bin"})
    with pytest.raises(process.SpawnError) as info:
        process.spawn(launch)
    assert info.value.kind == "not_found"
    assert str(info.value) == (
        f"cannot start './run.sh': no such file (PATH=/usr/bin, cwd={tmp_path})"
    )


def test_spawn_not_executable(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "tool").write_text("#!/bin/sh\n")
    launch = _launch(tmp_path, "", argv=("tool", "--flag"), env={"PATH": str(bin_dir)})
    with pytest.raises(process.SpawnError) as info:
        process.spawn(launch)
    assert info.value.kind == "not_executable"
    assert str(info.value) == (
        f"cannot start 'tool': {bin_dir}/tool is not an executable file "
        f"(PATH={bin_dir}, cwd={tmp_path})"
    )


def test_spawn_missing_cwd(tmp_path):
    missing = tmp_path / "gone"
    launch = _launch(tmp_path, "pass", cwd=str(missing), env={"PATH": "/usr/bin"})
    with pytest.raises(process.SpawnError) as info:
        process.spawn(launch)
    assert info.value.kind == "cwd_missing"
    assert str(info.value) == (
        f"cannot start '{sys.executable}': working directory is missing "
        f"(PATH=/usr/bin, cwd={missing})"
    )


def test_wait_reports_the_signal(tmp_path, procs):
    proc = process.spawn(_launch(tmp_path, "import time; time.sleep(60)"))
    procs.append(proc)
    assert process.alive(proc)
    os.kill(proc.pid, signal.SIGKILL)
    result = anyio.run(process.wait, proc)
    assert result == process.Exit(None, signal.SIGKILL)
    assert result.describe() == "was killed by SIGKILL"
    assert not process.alive(proc)
    assert not Path(f"/proc/{proc.pid}").exists() or _session_entries(proc.sid) == []
    # A late waiter gets the same recorded status.
    assert anyio.run(process.wait, proc) == result


def test_wait_is_cancellable(tmp_path, procs):
    proc = process.spawn(_launch(tmp_path, "import time; time.sleep(60)"))
    procs.append(proc)

    async def main() -> None:
        with anyio.move_on_after(0.2) as scope:
            await process.wait(proc)
        assert scope.cancelled_caught
        assert process.alive(proc)

    anyio.run(main)


TREE = """
    import os, subprocess, sys, time
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    child = subprocess.Popen(sleeper)
    escaper = subprocess.Popen(
        [sys.executable, "-c",
         "import os, subprocess, sys, time\\n"
         "os.setpgid(0, 0)\\n"
         "g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\\n"
         "print(g.pid, flush=True)\\n"
         "time.sleep(60)\\n"],
        stdout=subprocess.PIPE, text=True,
    )
    grandchild = int(escaper.stdout.readline())
    with open("pids.tmp", "w") as f:
        f.write(f"{child.pid} {escaper.pid} {grandchild}\\n")
    os.rename("pids.tmp", "pids")
    time.sleep(60)
"""


def test_stop_kills_the_whole_session_including_other_process_groups(tmp_path, procs, subreaper):
    proc = process.spawn(_launch(tmp_path, TREE))
    procs.append(proc)
    pids = [int(p) for p in _wait_for_file(tmp_path / "pids").split()]
    assert set(process.session_pids(proc.sid)) == {proc.pid, *pids}
    escaper_pgrp = os.getpgid(pids[1])
    assert escaper_pgrp == pids[1] != proc.sid

    result = anyio.run(lambda: process.stop(proc, grace_s=10))
    assert result == process.Exit(None, signal.SIGTERM)  # the first signal was enough
    assert process.session_pids(proc.sid) == []
    assert _session_entries(proc.sid) == []  # no zombies either: all reaped
    assert not process.alive(proc)


def test_stop_sigkills_a_process_that_ignores_sigterm(tmp_path, procs):
    code = """
        import signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        open("ready", "w").write("ready\\n")
        time.sleep(60)
    """
    proc = process.spawn(_launch(tmp_path, code))
    procs.append(proc)
    _wait_for_file(tmp_path / "ready")
    started = time.monotonic()
    result = anyio.run(lambda: process.stop(proc, grace_s=0.5))
    elapsed = time.monotonic() - started
    assert result == process.Exit(None, signal.SIGKILL)
    assert elapsed >= 0.5  # the grace period was given before SIGKILL (a floor, not a speed)
    assert process.session_pids(proc.sid) == []


def test_stop_with_custom_signal_returns_the_clean_exit(tmp_path, procs):
    code = """
        import signal, sys, time
        signal.signal(signal.SIGINT, lambda *_: sys.exit(0))
        open("ready", "w").write("ready\\n")
        time.sleep(60)
    """
    proc = process.spawn(_launch(tmp_path, code))
    procs.append(proc)
    _wait_for_file(tmp_path / "ready")
    assert anyio.run(lambda: process.stop(proc, signal="INT", grace_s=10)) == process.Exit(0, None)


def test_wait_and_stop_concurrently_both_see_the_exit(tmp_path, procs):
    proc = process.spawn(_launch(tmp_path, "import time; time.sleep(60)"))
    procs.append(proc)
    results: dict[str, object] = {}

    async def waiter(name: str) -> None:
        results[name] = await process.wait(proc)

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(waiter, "wait1")
            tg.start_soon(waiter, "wait2")
            await anyio.wait_all_tasks_blocked()  # both waiters wait on the process
            results["stop"] = await process.stop(proc, grace_s=5)

    anyio.run(main)
    expected = process.Exit(None, signal.SIGTERM)
    assert results == {"wait1": expected, "wait2": expected, "stop": expected}


def test_stop_of_an_exited_process_returns_its_exit(tmp_path, procs):
    proc = process.spawn(_launch(tmp_path, "raise SystemExit(7)"))
    procs.append(proc)
    assert anyio.run(process.wait, proc) == process.Exit(7, None)
    assert anyio.run(lambda: process.stop(proc, grace_s=1)) == process.Exit(7, None)


def test_stop_rejects_an_unknown_signal(tmp_path, procs):
    proc = process.spawn(_launch(tmp_path, "import time; time.sleep(60)"))
    procs.append(proc)
    with pytest.raises(process.UnknownSignalError) as info:
        anyio.run(lambda: process.stop(proc, signal="SIGNOPE"))
    assert str(info.value) == "unknown signal 'SIGNOPE': expected a name such as SIGTERM or SIGINT"
    assert process.alive(proc)


# A reaper that is *not* us holds the orphan, so the adopted process is not our child, and
# it reaps the orphan when it dies so that no zombie is left behind (pid 1 may not reap).
REAPER = """
    import ctypes, os, subprocess, sys, threading
    ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)
    code = ("import subprocess, sys; p = subprocess.Popen([sys.executable, '-c', "
            "'import time; time.sleep(60)'], start_new_session=True, "
            "stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); print(p.pid)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout
    print(out.strip(), flush=True)
    threading.Thread(target=lambda: (sys.stdin.read(), os._exit(0)), daemon=True).start()
    while True:
        try:
            os.wait()
        except ChildProcessError:
            break
"""


@pytest.fixture
def orphan() -> Iterator[int]:
    reaper = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(REAPER)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    pid = int(reaper.stdout.readline())  # type: ignore[union-attr]
    try:
        yield pid
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        reaper.stdin.close()  # type: ignore[union-attr]
        reaper.stdout.close()  # type: ignore[union-attr]
        reaper.wait(timeout=10)


def _start_time(pid: int) -> float:
    return psutil.Process(pid).create_time()


def test_adopt_a_foreign_process_and_notice_its_death(orphan):
    started = _start_time(orphan)
    proc = process.adopt(orphan, started)
    assert proc is not None
    assert (proc.pid, proc.sid, proc.start_time) == (orphan, orphan, started)
    assert proc.started_at == started
    assert process.alive(proc)
    # the same pid with another start time is another process
    assert process.adopt(orphan, started + 5) is None

    async def main() -> process.Exit:
        async with anyio.create_task_group() as tg:
            result: list[process.Exit] = []

            async def waiter() -> None:
                result.append(await process.wait(proc))

            tg.start_soon(waiter)
            await anyio.wait_all_tasks_blocked()
            assert result == []
            os.kill(orphan, signal.SIGTERM)
        return result[0]

    result = anyio.run(main)
    assert result == process.Exit(None, None)
    assert result.describe() == "exited (status unknown: adopted process)"
    assert not process.alive(proc)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{orphan}").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert process.adopt(orphan, started) is None


def test_stop_an_adopted_process(orphan):
    proc = process.adopt(orphan, _start_time(orphan))
    assert proc is not None
    assert anyio.run(lambda: process.stop(proc, grace_s=5)) is None
    assert not process.alive(proc)
    assert process.session_pids(proc.sid) == []


def test_adopt_a_pid_that_does_not_exist():
    assert process.adopt(2**22 + 1, 1) is None


def test_adopting_our_own_child_still_reaps_it_with_its_status(tmp_path, procs):
    proc = process.spawn(_launch(tmp_path, "import sys; sys.stdin.read(); sys.exit(5)"))
    procs.append(proc)
    adopted = process.adopt(proc.pid, proc.start_time)
    assert adopted is not None
    assert (adopted.pid, adopted.sid, adopted.start_time) == (proc.pid, proc.sid, proc.start_time)
    assert anyio.run(process.wait, adopted) == process.Exit(5, None)
    assert process.adopt(proc.pid, proc.start_time) is None
