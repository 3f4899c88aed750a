"""The agent's side of the dashboard: its data, its one action, its listener and its route.

Why here and not in the dashboard package: the dashboard is a driver and knows no engine;
this module hands it the agent's facts as the ``dashboard.source.Source`` it asks for, built
from what `status`, `peers`, `route` and `db status` already read (``views``,
``routeview``, the mesh host's status, ``logfeed``, the databases), so the page and the CLI
can never disagree. It also starts the listener on a loopback port, makes it the route
table's ``agent`` backend (the proxy sends devmesh.localhost there, HTTP, HTTPS and
WebSocket), and serves ``GET /v1/dashboard`` on the control socket for `devmesh dashboard`.

Change detection: the page gets a new state within a quarter second of any change. Engine
rounds end with an event; peers, routes and health can change between rounds, so the state
is also rebuilt every ``TICK_S`` while a page is connected and sent only when it differs.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
from collections.abc import AsyncIterator
from typing import Any

import anyio
import anyio.abc

from devmesh import __version__
from devmesh.agent import graphview, logfeed, routeview, views
from devmesh.agent.engine import Engine, RestartError
from devmesh.agent.http_server import Request, Response, Router
from devmesh.core import hostroute, overall, plan
from devmesh.dashboard import auth, server
from devmesh.dashboard.source import ActionError
from devmesh.proxy import table

log = logging.getLogger("devmesh.agent")

TICK_S = 0.25
DB_EVERY_S = 3.0
"""How often database status is asked while a page is open (it may run a client)."""
_PASSWORD = re.compile(r"(://[^:/@\s]+:)[^@\s]+@")


class Host:
    """The dashboard's ``Source``: everything it shows, read from the engine."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.databases: list[dict[str, Any]] = []
        self._db_due = 0.0
        self._db_busy = False
        self._tg: anyio.abc.TaskGroup | None = None

    # ------------------------------------------------------------------ state

    def origins(self) -> list[str]:
        """The dashboard's own origins: devmesh.localhost on the proxy's ports."""
        p = self.engine.proxy
        if p is None:
            return []
        out = [auth.origin("http", "devmesh.localhost", p.http_port)]
        if p.https_port:
            out.append(auth.origin("https", "devmesh.localhost", p.https_port))
        return out

    def state(self) -> dict[str, Any]:
        engine = self.engine
        snap = engine.snapshot()
        rows = views.rows(snap)
        for row in rows:
            row.pop("uptime_s", None)  # changes by itself; the page counts from started_at
            row.pop("health_probes", None)  # counts every probe: not a change to show
            key = (row["project"], row["name"])
            inst = snap.instances.get(key)
            row["started_at"] = inst.started_at if inst is not None else None
            svc = snap.service(key)
            row["branch"] = svc.branch if svc is not None else None
            row["share"] = bool(svc.share) if svc is not None else False
        routes = routeview.rows(snap, engine.routes, engine.explain, engine.node_name())
        mesh = engine.mesh.status()
        node = engine.mesh.node
        graph = graphview.document(
            snap,
            engine.explain,
            machine_name=engine.node_name() or socket.gethostname(),
            node_id=node.identity.node_id if node is not None else None,
            peer_rows=mesh.get("peers") or [],
            history=engine.metrics,
        )
        _steady(graph)
        summary = overall.summarise(rows)
        self._refresh_databases()
        return {
            "agent": {
                "pid": os.getpid(),
                "version": __version__,
                "started_at": snap.started_at,
                "host": socket.gethostname(),
                "node": engine.node_name(),
                "projects": [p.name for p in snap.projects],
            },
            "proxy": {"http_port": snap.proxy_port, "https_port": snap.https_port},
            "overall": {"level": summary.level, "words": summary.words},
            "services": rows,
            "peers": _peers(mesh, snap.now),
            "mesh": _mesh(mesh),
            "routes": routes,
            "graph": graph,
            "warnings": _warnings(routes),
            "databases": self.databases,
        }

    def _refresh_databases(self) -> None:
        """Start a database status read in a worker thread when one is due (never blocks)."""
        now = anyio.current_time()
        if self._db_busy or now < self._db_due or self._tg is None:
            return
        projects = sorted(self.engine.models.items())
        if not any(s.db is not None for _, proj in projects for s in proj.services.values()):
            self.databases = []
            return
        self._db_busy = True
        self._tg.start_soon(self._read_databases, projects)

    async def _read_databases(self, projects: list[Any]) -> None:
        dbs = self.engine.databases
        rows: list[dict[str, Any]] = []
        try:
            for name, proj in projects:
                try:
                    got = await anyio.to_thread.run_sync(dbs.status_blocking, name, proj)
                except Exception as exc:  # shown on the page, as `db status` would say it
                    got = [{"service": "*", "state": "failed", "error": str(exc)}]
                for row in got:
                    url = row.get("url")
                    if isinstance(url, str):
                        row = {**row, "url": _PASSWORD.sub(r"\1***@", url)}
                    rows.append({"project": name, **row})
            self.databases = rows
        finally:
            self._db_busy = False
            self._db_due = anyio.current_time() + DB_EVERY_S

    async def tick(self) -> None:
        with anyio.move_on_after(TICK_S):
            await self.engine.changed()

    # ------------------------------------------------------------------ action

    async def restart(self, project: str, service: str) -> dict[str, Any]:
        key: plan.Key = (project, service)
        before = self.engine.runner.instances.get(key)
        old_pid = before.proc.pid if before is not None and before.proc is not None else None
        try:
            new = await self.engine.restart(key)
        except RestartError as exc:
            raise ActionError(exc.status, exc.message) from None
        except TimeoutError:
            raise ActionError(504, f"{plan.key_text(key)} did not start again in time") from None
        pid = new.proc.pid if new.proc is not None else None
        name = plan.key_text(key)
        log.info("%s: restarted from the dashboard (pid %s -> %s)", name, old_pid, pid)
        return {
            "project": project,
            "service": service,
            "old_pid": old_pid,
            "pid": pid,
            "restarts": new.restarts,
            "reason": new.reason,
        }

    # ------------------------------------------------------------------ logs

    def service_log(self, project: str, service: str, tail: int) -> AsyncIterator[dict[str, Any]]:
        snap = self.engine.snapshot()
        svc = snap.service((project, service))
        if svc is None or not svc.runs_here:
            raise ActionError(404, f"no service {service} of project {project} runs here")
        return logfeed.feed({service: snap.service_log((project, service))}, tail=tail, follow=True)

    async def access_log(self, tail: int) -> AsyncIterator[dict[str, Any]]:
        items = logfeed.feed({"proxy": self.engine.home.proxy_log}, tail=tail, follow=True)
        try:
            async for item in items:
                if "line" not in item:
                    continue
                try:
                    entry = json.loads(item["line"])
                except ValueError:
                    continue
                if not isinstance(entry, dict):
                    continue
                service = self._service_of(entry)
                if service is None:
                    continue  # the dashboard's own requests
                entry["service"] = service
                yield entry
        finally:
            await items.aclose()  # type: ignore[attr-defined]

    def _service_of(self, entry: dict[str, Any]) -> str | None:
        """The service a request went to: by its host name, else by the upstream's port."""
        found = hostroute.match(str(entry.get("host") or ""))
        if found.kind is hostroute.HostKind.RESERVED:
            return None
        if found.kind is hostroute.HostKind.SERVICE and found.service:
            return found.service
        upstream = str(entry.get("upstream") or "")
        _, _, port = upstream.rpartition(":")
        for b in self.engine.routes.backends:
            if port.isdigit() and b.port == int(port) and b.host == upstream.rpartition(":")[0]:
                return b.service
        return str(entry.get("host") or "-")


def _steady(graph: dict[str, Any]) -> None:
    """Drop or round what changes by itself in the graph document: its time, the window
    that grows until the next minute, and rates to the digits the page shows (else every
    tick would be a change to send while any traffic is in the window)."""
    graph.pop("generated_at", None)
    graph.pop("window_s", None)
    for e in [*(graph.get("edges") or []), *(graph.get("inbound") or [])]:
        for field, digits in (("rps", 2), ("error_rate", 4), ("p50_ms", 1), ("p99_ms", 1)):
            if isinstance(e.get(field), float):
                e[field] = round(e[field], digits)


def _peers(mesh: dict[str, Any], now: float) -> list[dict[str, Any]]:
    out = []
    for p in mesh.get("peers") or []:
        seen = p.get("last_seen_s")
        out.append(
            {
                "node": p.get("node"),
                "name": p.get("name"),
                "address": p.get("address"),
                "port": p.get("port"),
                "state": p.get("state"),
                "reason": p.get("reason"),
                "backends": p.get("backends") or [],
                # whole seconds: an age that ticks would make every state a change
                "last_seen_at": int(now - seen) if isinstance(seen, int | float) else None,
                "services": p.get("services") or [],
            }
        )
    return out


def _mesh(mesh: dict[str, Any]) -> dict[str, Any]:
    if not mesh.get("running"):
        return {"running": False}
    return {
        "running": True,
        "mesh": mesh.get("mesh"),
        "name": mesh.get("name"),
        "node": mesh.get("node"),
        "project": mesh.get("project"),
        "discovery": mesh.get("discovery"),
        "drops": mesh.get("drops") or {},
        "channel_refused": mesh.get("channel_refused") or [],
    }


def _warnings(routes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Version mismatches on the edges: a warning the proxy adds, or a call it refuses."""
    out = []
    for r in routes:
        text = r.get("warning")
        if not text and r.get("target") is None and "version" in str(r.get("reason") or ""):
            text = r.get("reason")
        if text:
            out.append(
                {
                    "project": r["project"],
                    "caller": r["caller"],
                    "service": r["service"],
                    "range": r.get("range"),
                    "version": r.get("version"),
                    "refused": r.get("target") is None,
                    "text": text,
                }
            )
    return out


async def start(tg: anyio.abc.TaskGroup, engine: Engine) -> server.Dashboard:
    """Start the dashboard on a loopback port and route devmesh.localhost to it."""
    token = auth.load_or_create_token(engine.home.dashboard_token)
    host = Host(engine)
    host._tg = tg
    dash = server.Dashboard(host, token, host.origins)
    port = await tg.start(dash.serve)
    engine.dashboard = table.Backend(project="devmesh", service="dashboard", port=port)
    engine.republish()
    log.info("dashboard on 127.0.0.1:%d (http://devmesh.localhost:%s/)", port, _port(engine))
    return dash


def _port(engine: Engine) -> int | None:
    return engine.proxy.http_port if engine.proxy is not None else None


def register(router: Router, engine: Engine) -> None:
    """``GET /v1/dashboard``: the dashboard's URLs with the token, for `devmesh dashboard`.

    Only the user reaches the control socket (mode 0600), so handing the token out here is
    no wider than the token file itself.
    """

    @router.route("GET", "/v1/dashboard")
    async def dashboard(req: Request) -> Response:
        token = auth.load_or_create_token(engine.home.dashboard_token)
        p = engine.proxy
        if p is None or p.http_port is None or engine.dashboard is None:
            return Response(503, {"error": "the dashboard is not running"})
        urls = {"http": auth.origin("http", "devmesh.localhost", p.http_port) + f"/?token={token}"}
        if p.https_port:
            https = auth.origin("https", "devmesh.localhost", p.https_port)
            urls["https"] = f"{https}/?token={token}"
        return Response(200, {"url": urls["http"], "urls": urls, "token": token})
