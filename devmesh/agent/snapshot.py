"""A frozen picture of the engine after a round, for the views and the control API.

Why it exists: `status`, `up -d`'s wait and the log feed need facts from the engine (which
projects are applied and in what order, what runs, what the last plan said) but must not
reach into its mutable state: a view that reads an instance while a task changes it can
show a half-updated row. The engine builds one ``Snapshot`` on demand; everything in it is
immutable or a copy.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from devmesh.agent.paths import Home
from devmesh.core import model, plan


@dataclass(frozen=True, slots=True, kw_only=True)
class InstanceView:
    """One started (or failed-to-start) process, as the engine last saw it."""

    key: plan.Key
    phase: plan.Phase
    port: int | None
    pid: int | None
    """Set while the process runs."""
    started_at: float | None
    health: plan.Health
    health_detail: str | None
    health_probes: int
    health_failures: int
    """Failures counted against the check's retries."""
    restarts: int
    failures: int
    """Crashes in a row."""
    exit_text: str | None
    reason: str | None
    """Why a start failed."""
    retry_at: float | None
    will_restart: bool
    """Exited, and the restart policy starts it again (after ``retry_at``)."""
    gave_up: bool
    """Exited too often under a bounded policy (``max_retries``): crash-looping."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ProjectView:
    name: str
    project: model.Project
    enabled: tuple[str, ...]
    ports: Mapping[str, int]
    """Ports the agent picked for ``port: auto``."""
    edges: Mapping[str, int]
    """Proxy listener port per dependency edge ("caller->target")."""
    urls: Mapping[str, Mapping[str, str]]
    """Per service: dependency name -> URL it is given."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Snapshot:
    now: float
    started_at: float
    """When the agent started."""
    projects: tuple[ProjectView, ...]
    """In the order they were first applied (the first keeps NAME.localhost)."""
    instances: Mapping[plan.Key, InstanceView]
    wants: frozenset[plan.Key]
    actions: Mapping[plan.Key, tuple[plan.Action, ...]]
    """The last plan's actions, per service."""
    hosts: Mapping[plan.Key, str]
    """Host name (before ``.localhost``) of each service the proxy routes to."""
    proxy_port: int | None
    https_port: int | None
    home: Home

    def project(self, name: str) -> ProjectView | None:
        return next((p for p in self.projects if p.name == name), None)

    def service(self, key: plan.Key) -> model.Service | None:
        p = self.project(key[0])
        return p.project.services.get(key[1]) if p else None

    def service_log(self, key: plan.Key) -> Path:
        return self.home.service_log(*key)
