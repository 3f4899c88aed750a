"""The agent's persisted registry: applied projects and the processes it started.

Why it is persisted at all: an agent that dies (``kill -9``, an OOM, a laptop lid) must come
back without starting a second copy of every service. The record of each process carries
its pid *and* its start time, so a recycled pid is never mistaken for ours.

Writes are atomic (temp file in the same folder, fsync, rename, fsync of the folder): a
crash mid-write leaves the previous state, never half a file. A file that cannot be read
(corrupt, or written by a newer devmesh) is moved aside, not overwritten, and the agent
starts empty; the message names the file it kept. A file of the previous schema (1, start
times in kernel ticks since boot) is converted on reading, so an upgraded agent still
adopts the services the old one left running.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

SCHEMA_VERSION = 2
"""2: processes are identified by psutil's start time (``start_time``), not kernel ticks."""


class StateError(Exception):
    """The state file could not be used; ``kept`` is where the unreadable file was moved."""

    def __init__(self, path: Path, problem: str, kept: Path | None) -> None:
        self.path, self.problem, self.kept = path, problem, kept
        where = f"; kept as {kept}" if kept else ""
        super().__init__(f"{path}: {problem}{where}; starting with an empty registry")


@dataclass(slots=True, kw_only=True)
class ProjectRecord:
    name: str
    document: dict[str, Any]
    """The normalised devmesh.yaml (model.to_document), as validated by the CLI."""
    directory: str
    source: str
    enabled: list[str]
    """Services the user asked to run (with their dependencies)."""
    base_env: dict[str, str]
    ports: dict[str, int] = field(default_factory=dict)
    """Ports the agent picked for ``port: auto``; kept so URLs stay stable across restarts."""
    edges: dict[str, int] = field(default_factory=dict)
    """Proxy listener port per dependency edge ("caller->target"), kept for stable NAME_URLs."""
    branches: dict[str, str] = field(default_factory=dict)
    """Branch namespace per service, as resolved at apply (``branch: auto`` is the git branch
    then); a service with a ``branch`` key that is absent here runs in the default one."""
    applied_at: float = 0.0


@dataclass(slots=True, kw_only=True)
class ProcessRecord:
    project: str
    service: str
    pid: int
    sid: int
    start_time: float
    """The process's start time as psutil reads it (with ``pid``, its identity)."""
    started_at: float
    fingerprint: str
    spec: dict[str, Any]
    deps: list[str]
    port: int | None
    restarts: int = 0


@dataclass(slots=True, kw_only=True)
class State:
    projects: dict[str, ProjectRecord] = field(default_factory=dict)
    """In the order they were first applied (kept in the file): the first keeps NAME.localhost."""
    processes: dict[str, ProcessRecord] = field(default_factory=dict)
    """Keyed by "project/service"."""

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA_VERSION,
            "projects": {k: asdict(v) for k, v in self.projects.items()},  # applied order
            "processes": {k: asdict(v) for k, v in sorted(self.processes.items())},
        }

    @classmethod
    def from_json(cls, data: Any) -> State:
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        version = data.get("schema")
        if version == 1:
            data = _from_schema_1(data)
        elif version != SCHEMA_VERSION:
            raise ValueError(f"schema version {version!r}, this devmesh reads {SCHEMA_VERSION}")
        return cls(
            projects={k: ProjectRecord(**v) for k, v in data.get("projects", {}).items()},
            processes={k: ProcessRecord(**v) for k, v in data.get("processes", {}).items()},
        )


def _from_schema_1(data: dict[str, Any]) -> dict[str, Any]:
    """Schema 1 recorded kernel ticks since boot; psutil's start time is boot time + ticks."""
    boot_s = psutil.boot_time()
    ticks_per_s = os.sysconf("SC_CLK_TCK")
    processes = {}
    for key, rec in (data.get("processes") or {}).items():
        rec = dict(rec)
        rec["start_time"] = boot_s + int(rec.pop("start_ticks")) / ticks_per_s
        processes[key] = rec
    return {**data, "processes": processes}


def load(path: Path) -> State:
    """Read the state, or an empty one when there is none.

    Raises StateError after moving an unreadable file aside; the caller logs it and goes on
    with the empty state it gets from ``State()``.
    """
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return State()
    try:
        return State.from_json(json.loads(raw))
    except (ValueError, TypeError) as exc:
        kept = path.with_name(f"{path.name}.unreadable-{int(time.time())}")
        os.replace(path, kept)
        raise StateError(path, f"unreadable state ({exc})", kept) from exc


def encode(state: State) -> bytes:
    return json.dumps(state.to_json(), indent=1).encode()


def save(path: Path, state: State | bytes) -> None:
    """Write atomically: readers see the old file or the new one, never a mix."""
    data = state if isinstance(state, bytes) else encode(state)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
