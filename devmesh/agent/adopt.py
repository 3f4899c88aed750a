"""Adopting survivors: the processes a previous agent started that still run.

Why it exists: an agent may be restarted (an upgrade, a crash, ``kill -9``) while its services
keep running; starting them again would fail on their ports or run two copies. The registry
names each process by pid *and* start time, so a recycled pid is never mistaken for ours.
A survivor gets an ``Instance`` as it was started (the service rebuilt from its persisted
spec, its port and dependency URLs), so it is probed and stopped as it was started; the
planner then restarts it only if the configuration changed meanwhile. A process that is gone
has the rest of its session killed, so nothing it forked lingers.

What it does not guarantee: the exit status of an adopted process (it is not our child).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

from devmesh.agent import launch as launch_mod
from devmesh.agent import state as state_mod
from devmesh.agent.instance import Instance
from devmesh.agent.paths import Home
from devmesh.core import desired, model, plan
from devmesh.core import health as health_core
from devmesh.supervisor import process

log = logging.getLogger("devmesh.agent")


def survivors(
    home: Home,
    records: Mapping[str, state_mod.ProcessRecord],
    projects: Mapping[str, tuple[state_mod.ProjectRecord, model.Project]],
    db_env: Callable[[str, model.Service], Mapping[str, str]] | None = None,
) -> list[tuple[Instance, launch_mod.Launch | None]]:
    """Instances for the recorded processes that still run; each with its launch, if known.

    The launch (for the health check's environment) is known while the project is applied;
    ``db_env`` gives the database variables the process was started with, if it has one.
    """
    out: list[tuple[Instance, launch_mod.Launch | None]] = []
    for rec in records.values():
        key = (rec.project, rec.service)
        proc = process.adopt(rec.pid, rec.start_time)
        if proc is None:
            log.info("%s: pid %d is gone; cleaning up", plan.key_text(key), rec.pid)
            process.kill_session(rec.sid)
            continue
        applied = projects.get(rec.project)
        directory = applied[1].directory if applied else "/"
        try:
            svc = desired.service_from_spec(rec.service, rec.spec, directory=directory)
        except (KeyError, ValueError, TypeError) as exc:
            log.warning(
                "%s: cannot read the recorded spec (%s); stopping pid %d",
                plan.key_text(key),
                exc,
                rec.pid,
            )
            process.kill_session(proc.sid)
            continue
        urls = {str(k): str(v) for k, v in (rec.spec.get("dep_urls") or {}).items()}
        inst = Instance(
            key=key,
            phase=plan.Phase.RUNNING,
            service=svc,
            port=rec.port,
            urls=urls,
            fingerprint=rec.fingerprint,
            deps=tuple(_key(d) for d in rec.deps),
            proc=proc,
            restarts=rec.restarts,
        )
        if inst.health_kind is not model.HealthKind.NONE:
            inst.tracker = health_core.start(svc.effective_health, proc.started_at)
        launch = None
        if applied is not None:
            launch = launch_mod.build(
                home,
                applied[0],
                applied[1],
                svc,
                port=rec.port,
                urls=urls,
                db_env=db_env(rec.project, svc) if db_env and svc.db else None,
            )
        log.info("%s: adopted running pid %d", plan.key_text(key), proc.pid)
        out.append((inst, launch))
    return out


def record(inst: Instance) -> state_mod.ProcessRecord | None:
    """What the registry keeps of a live instance, so a later agent can adopt it."""
    if inst.proc is None or inst.phase not in (plan.Phase.RUNNING, plan.Phase.STOPPING):
        return None
    return state_mod.ProcessRecord(
        project=inst.key[0],
        service=inst.key[1],
        pid=inst.proc.pid,
        sid=inst.proc.sid,
        start_time=inst.proc.start_time,
        started_at=inst.proc.started_at,
        fingerprint=inst.fingerprint,
        spec=inst.spec,
        deps=[plan.key_text(d) for d in inst.deps],
        port=inst.port,
        restarts=inst.restarts,
    )


def _key(text: str) -> plan.Key:
    project, _, service = text.partition("/")
    return (project, service)
