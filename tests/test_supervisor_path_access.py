"""A PATH entry the user cannot search is skipped, as execvp and ``shutil.which`` skip it.

The case: `runuser -u alice -- devmesh up` keeps root's PATH, whose first entries (under
/root) alice cannot enter. Finding a service's command must go on to the next entry, not
fail with PermissionError. Root reads every directory, so the checks run as a real
unprivileged user: a child forked from this process drops to ``nobody`` (uid 65534) when
the suite runs as root (as in CI), and the directory is mode 000 for an ordinary user.
Then the agent's own code runs there: the apply's preflight and the supervisor's spawn.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from devmesh.agent import preflight
from devmesh.agent import state as state_mod
from devmesh.core import model
from devmesh.supervisor import process

NOBODY = 65534


@pytest.fixture
def place() -> Iterator[Path]:
    """A folder the unprivileged user owns, with a ``locked`` folder it cannot search."""
    path = Path(tempfile.mkdtemp(prefix="devmesh-path-"))
    try:
        (path / "locked").mkdir()
        (path / "locked" / "true").write_text("#!/bin/sh\nexit 7\n")
        os.chmod(path / "locked" / "true", 0o755)  # would be found if it could be reached
        if os.geteuid() == 0:
            os.chown(path, NOBODY, NOBODY)  # the user's own folder (the service's, its log)
            os.chmod(path, 0o755)
        # Root's folder (like /root, mode 0700) as another user sees it; unprivileged, the
        # suite owns it, so it is closed to its owner too.
        os.chmod(path / "locked", 0o700 if os.geteuid() == 0 else 0o000)
        yield path
    finally:
        os.chmod(path / "locked", 0o700)
        shutil.rmtree(path, ignore_errors=True)


def unprivileged(check: Callable[[], Any]) -> Any:
    """``check()`` in a forked child that is not root; its JSON result, or its error."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 0
        try:
            os.close(read)
            if os.geteuid() == 0:
                os.setgroups([])
                os.setgid(NOBODY)
                os.setuid(NOBODY)
            try:
                out = {"ok": check()}
            except Exception as exc:
                out = {"error": f"{type(exc).__name__}: {exc}"}
            os.write(write, json.dumps(out).encode())
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0 and data, "the unprivileged child failed"
    result = json.loads(data)
    assert "error" not in result, result["error"]
    return result["ok"]


def _project(place: Path, command: str) -> tuple[state_mod.ProjectRecord, model.Project]:
    doc = {"version": 1, "project": "p", "services": {"svc": {"command": [command]}}}
    proj = model.from_document(doc, directory=str(place), default_name="p", source="")
    rec = state_mod.ProjectRecord(
        name="p",
        document=doc,
        directory=str(place),
        source="",
        enabled=["svc"],
        base_env={"PATH": f"{place / 'locked'}:/usr/bin:/bin"},
    )
    return rec, proj


def test_the_preflight_skips_an_unreadable_path_entry(place: Path) -> None:
    def check() -> list[list[str]]:
        assert not os.access(place / "locked", os.X_OK), "the folder must be closed to us"
        return [
            preflight.problems(*_project(place, "true"), {}),
            preflight.problems(*_project(place, "no-such-command-here"), {}),
        ]

    found, missing = unprivileged(check)
    assert found == []
    assert len(missing) == 1
    assert "service svc: cannot start 'no-such-command-here': not found on PATH" in missing[0]


def test_a_service_starts_from_the_next_path_entry(place: Path) -> None:
    def check() -> list[Any]:
        path = f"{place / 'locked'}:/usr/bin:/bin"
        found = process.resolve("true", str(place), path)
        proc = process.spawn(
            process.Launch(
                argv=("true",), cwd=str(place), env={"PATH": path}, log_path=place / "svc.log"
            )
        )
        import anyio

        ended = anyio.run(process.wait, proc)
        return [found, ended.code]

    found, code = unprivileged(check)
    assert found in ("/usr/bin/true", "/bin/true")
    assert code == 0  # /usr/bin/true ran, not the unreachable script (exit 7)
