"""The one place a service's process is described: argv, cwd, environment, log, probe.

Why it exists: a fresh start and the adoption of a process left by a previous agent both need
the same facts (the environment the process got, so a probe command runs in it; the port and
dependency URLs, for the fingerprint). Built twice, they drifted; built here once, a probe of
an adopted process checks exactly what a probe of a fresh one would.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from devmesh.agent import state as state_mod
from devmesh.agent.paths import Home
from devmesh.core import desired, model
from devmesh.supervisor import process


@dataclass(frozen=True, slots=True, kw_only=True)
class Launch:
    service: model.Service
    port: int | None
    urls: Mapping[str, str]
    """Dependency name -> URL given to the process as NAME_URL."""
    spawn: process.Launch | None
    """None when the process cannot be described (``error`` says why)."""
    check: model.Health
    """The service's health check with ``${PORT}``-style names filled in."""
    error: str | None = None
    """Why there is no process: a ``${NAME}`` in env or command that has no value."""


def port_of(rec: state_mod.ProjectRecord, svc: model.Service) -> int | None:
    """The service's port: its own fixed one, the one the agent picked, or none."""
    if not svc.wants_port:
        return None
    return svc.port if svc.port is not None else rec.ports.get(svc.name)


def urls(rec: state_mod.ProjectRecord, proj: model.Project, svc: model.Service) -> dict[str, str]:
    """The service's NAME_URLs: its proxy edge listeners, else direct ports or fallbacks."""
    prefix = f"{svc.name}->"
    edges = {k[len(prefix) :]: v for k, v in rec.edges.items() if k.startswith(prefix)}
    return desired.dependency_urls(proj, svc, rec.ports, edges)


def build(
    home: Home,
    rec: state_mod.ProjectRecord,
    proj: model.Project,
    svc: model.Service,
    *,
    port: int | None,
    urls: Mapping[str, str],
    db_env: Mapping[str, str] | None = None,
    db_error: str | None = None,
) -> Launch:
    """Describe the process of ``svc`` with ``port``, ``urls`` and its database's variables.

    A ``${NAME}`` in env or command that has no value gives a launch with ``error`` set and
    no process, so the start fails with that message rather than raising.
    """
    try:
        if db_error is not None:
            raise ValueError(db_error)
        env = desired.launch_env(rec.base_env, proj, svc, port=port, urls=urls, db_env=db_env)
        argv = desired.launch_argv(proj, svc, port=port, urls=urls, db_env=db_env)
    except ValueError as exc:
        return Launch(
            service=svc,
            port=port,
            urls=dict(urls),
            spawn=None,
            check=svc.effective_health,
            error=str(exc),
        )
    return Launch(
        service=svc,
        port=port,
        urls=dict(urls),
        spawn=process.Launch(
            argv=argv,
            cwd=svc.cwd or proj.directory,
            env=env,
            log_path=home.service_log(proj.name, svc.name),
        ),
        check=desired.probe_health(svc.effective_health, env),
    )


def fresh(
    home: Home,
    rec: state_mod.ProjectRecord,
    proj: model.Project,
    svc: model.Service,
    *,
    db_env: Mapping[str, str] | None = None,
    db_error: str | None = None,
) -> Launch:
    """The launch of a new process of ``svc`` under the project's current record."""
    return build(
        home,
        rec,
        proj,
        svc,
        port=port_of(rec, svc),
        urls=urls(rec, proj, svc),
        db_env=db_env,
        db_error=db_error,
    )
