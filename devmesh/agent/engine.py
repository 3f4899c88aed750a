"""The engine: the applied projects, and the loop that closes the gap to what runs.

Strategy: each round syncs the proxy's edge listeners, plans (``core.plan.plan`` over what
is wanted and what is seen), has the ``reconcile.Runner`` carry out the actions, publishes the
route table (``routing``) and saves the registry; then it sleeps until an observation wakes
it or the plan's next deadline. The pieces live in their own modules: ``reconcile``
(processes), ``routing`` (what the proxy routes by), ``adopt`` (survivors of a previous
agent), ``launch`` (the one description of a process), ``preflight`` (checks before an
apply). Readers outside get a frozen ``snapshot.Snapshot``, never the mutable state.

Projects are kept in the order they were first applied: applying one again keeps its place,
removing it and applying it again sends it to the back. The route table follows that order,
so the first project keeps ``NAME.localhost`` when two have a service of the same name.

What it does not guarantee: log rotation while no agent runs (rotation is copy-and-truncate
from here).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import time
from collections.abc import Callable
from pathlib import Path

import anyio
import anyio.abc

from devmesh.agent import (
    adopt,
    databases,
    launch,
    meshhost,
    metrics,
    peerchannel,
    preflight,
    reconcile,
    routing,
)
from devmesh.agent import snapshot as snap
from devmesh.agent import state as state_mod
from devmesh.agent.instance import Instance
from devmesh.agent.paths import Home
from devmesh.core import desired, model, plan, routes
from devmesh.proxy import accesslog, routesfile, server, table, workers
from devmesh.supervisor import logs

log = logging.getLogger("devmesh.agent")

ROTATE_EVERY_S = 5.0
AD_HOC_SOURCE = "<command line>"
"""The source of a project `devmesh run NAME -- CMD` made up: it has no folder of its own."""
LOG_MAX_BYTES = 10 * 2**20


class Engine:
    """Owns the applied projects and the processes; the control API calls into it."""

    def __init__(
        self,
        home: Home,
        *,
        clock: Callable[[], float] = time.time,
        rand: Callable[[], float] = random.random,
        proxy: server.ProxyServer | None = None,
    ) -> None:
        self.home = home
        self.proxy = proxy
        self.routes = table.RouteTable()
        """What the proxy routes by; replaced (never mutated) after each round."""
        self.metrics: metrics.History | None = None
        """The proxy's metrics history (``History.query``); None with DEVMESH_METRICS=off."""
        self.route_file: Path | None = None
        """Where the routes and edge ports are published for proxy worker processes after
        each round; None when the agent runs no workers."""
        self.proxy_workers: workers.WorkerSet | None = None
        """The proxy's worker processes, when it has any (``status`` counts the ready ones)."""
        self.clock = clock
        self.state = state_mod.State()
        self.models: dict[str, model.Project] = {}
        self.runner = reconcile.Runner(clock=clock, rand=rand, wake=self.wake)
        self.databases = databases.Databases(home, wake=self.wake)
        """Provisioned before their services start (``databases.Databases.gate``)."""
        self.last_plan = plan.Plan(actions=(), wake_at=None)
        self.started_at = clock()
        self._wake = anyio.Event()
        self._changed = anyio.Event()
        self.generation = 0
        """Count of finished reconcile rounds; lets a waiter notice a round it did not await."""
        self._saved: bytes | None = None
        self.mesh = meshhost.MeshHost(
            home.root,
            channel=peerchannel.ProxyPeerChannel(lambda: self.proxy),
            on_change=self.republish,
        )
        """The agent's one mesh node (started by the first apply with a ``mesh:``); its peer
        channel is the proxy's peer listener, and what peers share changes the routes."""
        self._wants: dict[plan.Key, plan.Want] | None = None
        """What the last round planned for (None before the first): a republish between
        rounds builds the table from it."""
        self._edge_warnings: dict[tuple[str, str, str], str] = {}
        """(project, caller, service) -> the version warning last logged for that edge."""
        self.dashboard: table.Backend | None = None
        """The dashboard's listener, where the proxy sends devmesh.localhost (None: the
        proxy's own index page)."""

    # ---------------------------------------------------------------- lifecycle

    def load_state(self) -> str | None:
        """Read the registry and its projects; returns a warning to log, if any."""
        warning = None
        try:
            self.state = state_mod.load(self.home.state)
        except state_mod.StateError as exc:
            warning = str(exc)
            self.state = state_mod.State()
        for name, rec in list(self.state.projects.items()):
            try:
                self.models[name] = _model(rec)
            except (KeyError, ValueError, TypeError) as exc:
                log.warning("dropping project %s from the registry: %s", name, exc)
                del self.state.projects[name]
        return warning

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        async with anyio.create_task_group() as tg:
            self.runner.tg = tg
            self.databases.tg = tg
            for inst, survivor_launch in adopt.survivors(
                self.home,
                self.state.processes,
                self._applied_by_name(),
                db_env=self.databases.recorded_env,
            ):
                self.runner.instances[inst.key] = inst
                self.runner.watch(inst, survivor_launch)
            tg.start_soon(self._rotate_logs)
            task_status.started()
            while True:
                if self.proxy is not None:
                    await routing.sync_edges(self.proxy, self._applied())
                wants = self._reconcile()
                self._publish_routes(wants)
                self.mesh.publish(self.mesh_view(), self.runner.instances)
                self._save()
                self.generation += 1
                self._changed.set()
                self._changed = anyio.Event()
                wake_at = self.last_plan.wake_at
                timeout = math.inf if wake_at is None else max(0.0, wake_at - self.clock())
                with anyio.move_on_after(timeout):
                    await self._wake.wait()
                self._wake = anyio.Event()

    async def shutdown(self) -> None:
        """Stop every service (dependents first) and forget them: SIGTERM leaves no orphans.

        The projects' database servers stop too (their data is kept; `up` starts them).
        """
        projects = list(self.state.projects)
        self.state.projects.clear()
        self.models.clear()
        self.wake()
        with anyio.move_on_after(max(self.runner.longest_grace_s() + 5, 10)):
            while self.runner.instances:
                generation = self.generation
                await self.changed(generation)
        for name in projects:
            with anyio.move_on_after(60):
                try:
                    await self.databases.stop_project(name)
                except Exception:  # the agent is leaving either way; say what stays up
                    log.exception("%s: could not stop its databases", name)
        self._save()

    def wake(self) -> None:
        self._wake.set()

    async def changed(self, since: int | None = None) -> None:
        """Wait for the end of a reconcile round after generation ``since`` (default: now)."""
        if since is None or since == self.generation:
            await self._changed.wait()

    # ---------------------------------------------------------------- desired state

    def _applied(self) -> list[tuple[state_mod.ProjectRecord, model.Project]]:
        """(record, model) of every applied project, in the order they were first applied."""
        return [(rec, self.models[name]) for name, rec in self.state.projects.items()]

    def mesh_view(self) -> list[meshhost.Applied]:
        """The applied projects as the mesh sees them (for its checks and its catalog)."""
        return [
            meshhost.Applied(name=rec.name, project=proj, enabled=tuple(rec.enabled))
            for rec, proj in self._applied()
        ]

    def _applied_by_name(self) -> dict[str, tuple[state_mod.ProjectRecord, model.Project]]:
        return {rec.name: (rec, proj) for rec, proj in self._applied()}

    def wants(
        self, overrides: dict[str, state_mod.ProjectRecord | None] | None = None
    ) -> dict[plan.Key, plan.Want]:
        """What every applied project asks for; ``overrides`` lets a dry run swap one in."""
        records = dict(self.state.projects)
        for name, rec in (overrides or {}).items():
            if rec is None:
                records.pop(name, None)
            else:
                records[name] = rec
        out: dict[plan.Key, plan.Want] = {}
        for name, rec in records.items():
            proj = self.models[name] if rec is self.state.projects.get(name) else _model(rec)
            urls = {n: launch.urls(rec, proj, s) for n, s in proj.services.items()}
            out.update(desired.wants_for(proj, rec.enabled, rec.ports, urls))
        return out

    def seen(self) -> dict[plan.Key, plan.Seen]:
        return {k: i.seen() for k, i in self.runner.instances.items()}

    def prepare(
        self,
        proj: model.Project,
        *,
        directory: str,
        source: str,
        selected: list[str] | None,
        base_env: dict[str, str],
        branches: dict[str, str] | None = None,
        no_deps: bool = False,
    ) -> state_mod.ProjectRecord:
        """The record an apply of ``proj`` would store: enabled services and their ports.

        Ports picked before for ``port: auto`` are kept, so URLs survive an `up` again.
        ``no_deps``: the selected services alone, not their dependencies (``up --no-deps``).
        Raises preflight.NoFreePortError when no free port can be found.
        """
        enabled = desired.enabled_closure(proj, selected, no_deps=no_deps)
        old = self.state.projects.get(proj.name)
        if selected is not None and old is not None:
            enabled |= {s for s in old.enabled if s in proj.services and proj.services[s].runs_here}
        taken: set[int] = set()
        for name, rec in self.state.projects.items():
            if name != proj.name:
                taken.update(rec.ports.values())
                taken.update(s.port for s in self.models[name].services.values() if s.port)
        return state_mod.ProjectRecord(
            name=proj.name,
            document=model.to_document(proj),
            directory=directory,
            source=source,
            enabled=sorted(enabled),
            base_env=base_env,
            ports=preflight.pick_ports(proj, enabled, old.ports if old else {}, taken),
            edges=dict(old.edges) if old else {},
            branches=dict(branches or {}),
            applied_at=self.clock(),
        )

    def preflight(self, rec: state_mod.ProjectRecord, proj: model.Project) -> list[str]:
        """Problems that would make applying ``rec`` fail half-way (see ``preflight``)."""
        ours = {
            i.port: k
            for k, i in self.runner.instances.items()
            if i.port is not None and i.phase is not plan.Phase.FAILED
        }
        return preflight.problems(rec, proj, ours)

    def preview(self, rec: state_mod.ProjectRecord) -> plan.Plan:
        """What the planner would do if ``rec`` were applied now (a dry run)."""
        return plan.plan(self.wants({rec.name: rec}), self.seen(), self.clock())

    def dependency_urls(
        self, rec: state_mod.ProjectRecord, proj: model.Project, svc: model.Service
    ) -> dict[str, str]:
        return launch.urls(rec, proj, svc)

    def apply(self, rec: state_mod.ProjectRecord, proj: model.Project) -> None:
        # Assigning to an existing key keeps the project's place in the order.
        self.state.projects[rec.name] = rec
        self.models[rec.name] = proj
        # `up` is the user asking again: services that failed to start or gave up after
        # crashing get a fresh start (and crash count), as `docker compose up` would do.
        for key, inst in list(self.runner.instances.items()):
            if key[0] == rec.name and inst.phase in (plan.Phase.FAILED, plan.Phase.EXITED):
                del self.runner.instances[key]
        self.databases.retry(rec.name)
        self.wake()

    def folder_conflict(self, project: str, directory: str, source: str) -> str | None:
        """Why ``project`` cannot be applied from ``directory``: it is applied from another.

        A project belongs to one folder. A second folder with the same project name would
        otherwise take the first one's place and stop the services its file does not list
        (the first folder's), so it is refused, naming both folders and the ways out. The
        same folder reached through a symlink, or a file given with ``-f`` from elsewhere,
        is the same project: real paths are compared.
        """
        rec = self.state.projects.get(project)
        if rec is None or _same_folder(rec.directory, directory):
            return None
        if rec.source == source == AD_HOC_SOURCE:
            return None  # `devmesh run NAME -- CMD` again from another shell: no file to own
        this = source if source and not source.startswith("<") else directory
        return (
            f"project {project} is already applied from {rec.directory}, and a project "
            f"belongs to one folder; this file ({this}) is in {directory}. To run both, give "
            f"this one another project name (`devmesh -p NAME up`, or `project: NAME` in its "
            f"devmesh.yaml); to move the project here, stop it first: `devmesh down -p {project}`"
        )

    def knows(self, project: str) -> bool:
        return project in self.state.projects or any(k[0] == project for k in self.runner.instances)

    async def down(
        self, project: str, services: list[str] | None, *, volumes: bool = False
    ) -> list[str]:
        """Stop a project (or some of its services) and wait until they are stopped.

        Stopping the whole project also stops what serves its databases (data kept);
        ``volumes`` deletes the databases of the stopped services. Returns the names of the
        services that were running or starting.
        """
        targets = [
            k
            for k in self.runner.instances
            if k[0] == project and (services is None or k[1] in services)
        ]
        rec = self.state.projects.get(project)
        if rec is not None:
            if services is None:
                del self.state.projects[project]
                self.models.pop(project, None)
            else:
                rec.enabled = [s for s in rec.enabled if s not in services]
        self.wake()
        while True:
            generation = self.generation
            if not any(k in self.runner.instances for k in targets):
                break
            await self.changed(generation)
        if volumes:
            await self.databases.drop_project(project, services)
        elif services is None:
            await self.databases.stop_project(project)
        return [k[1] for k in targets]

    async def restart(self, key: plan.Key) -> Instance:
        """Restart one service at the user's request and return its new instance once the
        next round started it (its ``proc`` set, or ``reason`` saying why it could not start).

        The process is stopped the way its service says (signal, grace); the planner then
        starts it again as for any wanted service that does not run. Raises RestartError
        when the service is not one this agent runs or is stopping already.
        """
        name = plan.key_text(key)
        if key not in self.wants():
            raise RestartError(404, f"{name} is not a service this agent runs")
        inst = self.runner.instances.get(key)
        if inst is None:
            raise RestartError(409, f"{name} has not started yet; it starts by itself")
        if inst.phase is plan.Phase.STOPPING:
            raise RestartError(409, f"{name} is stopping already")
        self.runner.restart(key, "restart asked for")
        self.wake()
        with anyio.fail_after(inst.service.stop.grace_s + 60):
            while True:
                generation = self.generation
                new = self.runner.instances.get(key)
                if new is not None and new is not inst and new.phase is not plan.Phase.STOPPING:
                    return new
                await self.changed(generation)

    # ---------------------------------------------------------------- a round

    def _reconcile(self) -> dict[plan.Key, plan.Want]:
        """Plan and carry out one round; returns the wants it planned for."""
        wants = self.wants()
        planned = plan.plan(wants, self.seen(), self.clock())
        actions = self.databases.gate(planned.actions, wants, self.models)
        self.last_plan = plan.Plan(actions=actions, wake_at=planned.wake_at)
        self.runner.execute(self.last_plan.actions, self._launch, wants)
        return wants

    def _launch(self, key: plan.Key) -> launch.Launch:
        rec = self.state.projects[key[0]]
        proj = self.models[key[0]]
        db_env, db_error = self.databases.launch_env(key)
        return launch.fresh(
            self.home, rec, proj, proj.services[key[1]], db_env=db_env, db_error=db_error
        )

    def _actions(self) -> dict[plan.Key, tuple[plan.Action, ...]]:
        out: dict[plan.Key, list[plan.Action]] = {}
        for a in self.last_plan.actions:
            out.setdefault(a.key, []).append(a)
        return {k: tuple(v) for k, v in out.items()}

    def _publish_routes(self, wants: dict[plan.Key, plan.Want]) -> None:
        self._wants = wants
        n = self.mesh.node
        self.routes = routing.build_table(
            self._applied(),
            wants,
            self.runner.instances,
            self._actions(),
            mesh_peers=n.registry.peers() if n is not None else (),
            identity=n.identity if n is not None else None,
            names=self.mesh.display_names(),
            agent=self.dashboard,
        )
        self.publish_route_file()
        self._log_edge_warnings()

    def republish(self) -> None:
        """Rebuild the route table now, between rounds: the mesh node says what peers share
        changed (a catalog arrived, a peer expired or left), or the node started or stopped.

        Nothing is planned or started: only what the proxy routes by is replaced, so a
        peer's instance takes calls as soon as its catalog is here, not at the next round.
        """
        if self._wants is None:
            return  # the first round publishes anyway
        try:
            self._publish_routes(self._wants)
        except Exception:  # the node's task must not die of it; the next round retries
            log.exception("cannot rebuild the route table after a mesh change")

    def explain(
        self, project: str, service: str, *, caller: str | None = None, branch: str | None = None
    ) -> routes.Decision | None:
        """Where a call to ``service`` of ``project`` would go now, and why (no cursor moves).

        The proxy answers with its runtime state (down marks, outstanding requests); an
        engine without a proxy replays the selection over the table alone.
        """
        if self.proxy is not None:
            return self.proxy.explain(project, service, caller=caller, branch=branch)
        return routing.decide(
            self.routes, project, service, caller=caller, branch=branch, now_s=self.clock()
        )

    def node_name(self) -> str | None:
        """This agent's node name while it is a mesh node, as every view shows it
        (``NAME#ID6`` while a live peer has the same name)."""
        n = self.mesh.node
        if n is None:
            return None
        return self.mesh.display_names().get(n.identity.node_id, n.identity.node_name)

    def _log_edge_warnings(self) -> None:
        """One log line when an edge's decision starts to warn, and when its warning changes."""
        now: dict[tuple[str, str, str], str] = {}
        for rec, proj in self._applied():
            for caller, service in desired.local_edges(proj, rec.enabled):
                try:
                    decision = self.explain(rec.name, service, caller=caller)
                except Exception:  # explaining must never break publishing
                    log.debug("cannot explain %s -> %s", caller, service, exc_info=True)
                    continue
                if decision is not None and decision.warning:
                    key = (rec.name, caller, service)
                    now[key] = decision.warning
                    if self._edge_warnings.get(key) != decision.warning:
                        log.warning("%s: %s -> %s: %s", rec.name, caller, service, decision.warning)
        self._edge_warnings = now

    def publish_route_file(self) -> None:
        """Hand the routes and the bound edge ports to the proxy workers (they poll the file).

        Written only when its content changed, so a round that changed nothing the proxy
        sees costs the workers nothing. A write failure is logged: the workers keep serving
        the previous table and the agent's own proxy is current anyway.
        """
        if self.route_file is None or self.proxy is None:
            return
        try:
            routesfile.write(self.route_file, self.routes, self.proxy.edge_ports())
        except OSError as exc:
            log.warning("cannot publish the routes to the proxy workers: %s", exc)

    def _save(self) -> None:
        procs: dict[str, state_mod.ProcessRecord] = {}
        for key, inst in self.runner.instances.items():
            rec = adopt.record(inst)
            if rec is not None:
                procs[plan.key_text(key)] = rec
        self.state.processes = procs
        data = state_mod.encode(self.state)
        if data == self._saved:
            return  # most rounds change only health: no need to fsync the registry again
        self.home.ensure()
        state_mod.save(self.home.state, data)
        self._saved = data

    async def _rotate_logs(self) -> None:
        while True:
            await anyio.sleep(ROTATE_EVERY_S)
            for key in list(self.runner.instances):
                with contextlib.suppress(OSError):
                    logs.rotate_if_needed(self.home.service_log(*key), max_bytes=LOG_MAX_BYTES)

    # ---------------------------------------------------------------- readers

    def service_logs(self) -> list[Path]:
        """The log file of every service instance the engine holds (for log time stamping)."""
        return [self.home.service_log(*key) for key in self.runner.instances]

    @staticmethod
    def access_text(line: str) -> str:
        """One access-log JSON line as people read it; a line of another format as it is."""
        import json

        try:
            return accesslog.format_text(accesslog.Entry(**json.loads(line)))
        except (ValueError, TypeError):
            return line

    def snapshot(self) -> snap.Snapshot:
        """A frozen picture of the engine for views; cheap enough to take per request."""
        wants = self.wants()
        projects = tuple(
            snap.ProjectView(
                name=rec.name,
                project=proj,
                enabled=tuple(rec.enabled),
                ports=dict(rec.ports),
                edges=dict(rec.edges),
                urls={n: launch.urls(rec, proj, s) for n, s in proj.services.items()},
            )
            for rec, proj in self._applied()
        )
        instances = {}
        for key, inst in self.runner.instances.items():
            seen = inst.seen()
            want = wants.get(key)
            running = inst.proc is not None and inst.phase is plan.Phase.RUNNING
            instances[key] = snap.InstanceView(
                key=key,
                phase=inst.phase,
                port=inst.port,
                pid=inst.proc.pid if running and inst.proc else None,
                started_at=inst.proc.started_at if running and inst.proc else None,
                health=inst.health(),
                health_detail=inst.tracker.last_detail if inst.tracker else None,
                health_probes=inst.tracker.probes if inst.tracker else 0,
                health_failures=inst.tracker.failures if inst.tracker else 0,
                restarts=inst.restarts,
                failures=inst.failures,
                exit_text=inst.exit.describe() if inst.exit else None,
                reason=inst.reason,
                retry_at=inst.retry_at,
                will_restart=want is not None and plan.will_restart(want, seen),
                gave_up=want is not None and plan.gave_up(want, seen),
            )
        p = self.proxy
        return snap.Snapshot(
            now=self.clock(),
            started_at=self.started_at,
            projects=projects,
            instances=instances,
            wants=frozenset(wants),
            actions=self._actions(),
            hosts=routing.hosts(self.routes),
            proxy_port=p.http_port if p is not None else None,
            https_port=p.https_port if p is not None else None,
            home=self.home,
        )


def _same_folder(a: str, b: str) -> bool:
    """Whether two folders are one (symlinks resolved; a folder gone compares by its path)."""
    return a == b or os.path.realpath(a) == os.path.realpath(b)


class RestartError(Exception):
    """A restart that cannot be done now; ``status`` is the HTTP status that says why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _model(rec: state_mod.ProjectRecord) -> model.Project:
    """The record's project, with each service's branch as resolved when it was applied."""
    proj = model.from_document(
        rec.document, directory=rec.directory, default_name=rec.name, source=rec.source
    )
    return desired.resolve_branches(proj, rec.branches)
