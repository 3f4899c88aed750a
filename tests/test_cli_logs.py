"""`devmesh logs -t/--since` and time-ordered interleaving, against a real agent.

Two services print a line each time the test drops a trigger file, so the order in which
their lines were written is the test's to choose, not a race.
"""

from __future__ import annotations

import datetime
import re
from pathlib import Path

import pytest
from agentkit import PY, Mesh

from devmesh.commands.logs import parse_since

# Prints "NAME N" for N = 1..3, each once the file go-NAME-N exists in $TRIGGERS.
TALKER = """
import os, pathlib, sys, time
name, folder = os.environ["DEVMESH_SERVICE"], pathlib.Path(os.environ["TRIGGERS"])
print(name, "up", flush=True)
for n in range(1, 4):
    while not (folder / f"go-{name}-{n}").exists():
        time.sleep(0.02)
    print(name, n, flush=True)
while True:
    time.sleep(60)
"""

PROJECT = """
version: 1
project: chat
services:
  one:
    version: 1.0.0
    command: {py} talker.py
    env: {{TRIGGERS: {triggers}}}
    health: {{tcp: false}}
  two:
    version: 1.0.0
    command: {py} talker.py
    env: {{TRIGGERS: {triggers}}}
    health: {{tcp: false}}
"""

STAMP = re.compile(r"^(\w+) \| (\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z) (.*)$")


@pytest.fixture
def chat(mesh: Mesh) -> tuple[Mesh, Path]:
    triggers = mesh.root / "triggers"
    triggers.mkdir()
    d = mesh.project("chat", PROJECT.format(py=PY, triggers=triggers), {"talker.py": TALKER})
    mesh.cli("up", "-d", cwd=d, check=True)
    order = [("one", 1), ("two", 1), ("two", 2), ("one", 2), ("one", 3), ("two", 3)]
    for name, n in order:
        (triggers / f"go-{name}-{n}").touch()
        # Reading the log through the agent stamps it: the line has its time before the next.
        mesh.wait_for(
            lambda name=name, n=n: f"{name} {n}\n" in mesh.cli("logs", name, cwd=d).stdout,
            what=f"line {name} {n}",
        )
    return mesh, d


def _stamped(out: str) -> list[tuple[str, str, str]]:
    rows = []
    for line in out.splitlines():
        m = STAMP.match(line)
        assert m, f"not `NAME | TIME line`: {line!r}"
        rows.append((m[1], m[2], m[3]))
    return rows


def test_logs_interleave_services_in_time_order_with_timestamps(chat: tuple[Mesh, Path]) -> None:
    mesh, d = chat
    rows = _stamped(mesh.cli("logs", "-t", cwd=d, check=True).stdout)
    said = [text for _, _, text in rows if not text.endswith(" up")]
    assert said == ["one 1", "two 1", "two 2", "one 2", "one 3", "two 3"]
    assert [name for name, _, text in rows if text == "two 2"] == ["two"]
    times = [t for _, t, _ in rows]
    assert times == sorted(times)
    for _, t, _ in rows:  # a time of this run, not of the epoch
        moment = datetime.datetime.fromisoformat(t)
        assert abs((moment - datetime.datetime.now(datetime.UTC)).total_seconds()) < 3600


def test_logs_since_filters_by_the_time_lines_were_written(chat: tuple[Mesh, Path]) -> None:
    mesh, d = chat
    shown = mesh.cli("logs", "-t", cwd=d, check=True).stdout
    rows = _stamped(shown)
    when = next(t for _, t, text in rows if text == "one 2")
    out = mesh.cli("logs", "--since", when, cwd=d, check=True).stdout
    again = mesh.cli("logs", "-t", cwd=d, check=True).stdout
    assert out.splitlines() == ["one | one 2", "one | one 3", "two | two 3"], (shown, again)
    whole = mesh.cli("logs", "--since", "1h", "two", cwd=d, check=True).stdout
    assert whole.splitlines() == ["two up", "two 1", "two 2", "two 3"]
    tail = mesh.cli("logs", "--since", when, "--tail", "1", cwd=d, check=True).stdout
    assert tail.splitlines() == ["one | one 3", "two | two 3"]


def test_logs_rejects_a_since_it_cannot_read(mesh: Mesh) -> None:
    r = mesh.cli("logs", "--since", "yesterday", "-p", "x")
    assert r.returncode == 2
    assert "usage: devmesh logs" in r.stderr
    assert "--since: expected a duration (10m, 1h30m, 45s) or a time" in r.stderr


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10m", 1_000_000.0 - 600),
        ("1h30m", 1_000_000.0 - 5400),
        ("1.5h", 1_000_000.0 - 5400),
        ("45s", 1_000_000.0 - 45),
        ("250ms", 1_000_000.0 - 0.25),
        ("2026-12-03T07:00:00Z", 1796281200.0),
        ("2026-12-03T09:00:00+02:00", 1796281200.0),
        ("2026-12-03T07:00:00.5Z", 1796281200.5),
        ("1796281200", 1796281200.0),
    ],
)
def test_since_accepts_what_docker_accepts(text: str, expected: float) -> None:
    assert parse_since(text, 1_000_000.0) == pytest.approx(expected)


def test_since_without_a_zone_is_local_time() -> None:
    local = datetime.datetime(2026, 12, 3, 7, 0, 0).timestamp()
    assert parse_since("2026-12-03T07:00:00", 0.0) == local
    assert parse_since("2026-12-03", 0.0) == datetime.datetime(2026, 12, 3).timestamp()


@pytest.mark.parametrize("text", ["", "m", "10x", "soon", "10m ago", "2026-13-01"])
def test_since_names_what_it_expected(text: str) -> None:
    with pytest.raises(ValueError, match="expected a duration"):
        parse_since(text, 0.0)
