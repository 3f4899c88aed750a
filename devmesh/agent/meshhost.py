"""The agent's mesh: one mesh node per agent, set by the first project that asks for one.

Why one: a node is an identity on the network (node id, certificate, discovery socket,
peer-channel port). Two projects cannot each announce this machine under different
settings, so the agent holds one ``mesh.node.Node`` and the project that started it owns
its settings, as the proxy's ports come from the project that started the agent. A later
project whose ``mesh:`` differs is refused as a whole (naming both projects and the
differing keys) before anything of it is applied; projects without ``mesh:`` are not
concerned. When the last project with a ``mesh:`` goes down, the node says goodbye and
stops, so the next project may bring other settings. When the team identity changes under
a running node (``mesh join``, ``mesh init --force``), the node says goodbye and starts
again with the new one (``reload_identity``).

The node's catalog is computed from the applied projects after every reconcile round:
the services marked ``share: true`` that run here and are enabled, with their health. The
node announces a new revision at once when it changes (``Node.set_services``).

The peer channel (``mesh.port``) is a listener of the agent's proxy, not of the node: a
teammate's call to a shared service then goes through the proxy's one forwarding path, and
the catalog is one more answer of that listener. The node opens no listener of its own here
(``NodeSettings.serve_channel``); its ``PeerChannel`` opens the proxy's before the node first
announces (the announcement carries the bound port) and closes it after the goodbye. The node
still decides who may call (``Node.authorize``) and counts refusals and served catalogs.

The team secret lives in the node's identity (``DEVMESH_HOME/mesh``); nothing here prints
or logs it.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

import anyio

from devmesh.core import catalog as catalogs
from devmesh.core import model, nodenames, plan
from devmesh.core import peers as peerreg
from devmesh.mesh import discovery, membership, node
from devmesh.mesh import identity as ids

log = logging.getLogger("devmesh.mesh")

NO_IDENTITY = (
    "this machine has no team identity: run `devmesh mesh init` (a new team) or "
    "`devmesh mesh join FILE` (a teammate's bundle) first"
)


MESH_OFF = "this machine has not joined a team"
"""Why a project's ``mesh:`` is off (``status`` and ``peers`` say it; ``mesh_off`` in JSON)."""


def _has_identity(home: Path) -> bool:
    """Whether a team identity is installed, once no `mesh init|join` is writing one."""
    membership.settled(home)
    return ids.exists(home)


def _identity_now(home: Path) -> ids.Identity | None:
    membership.settled(home)
    return membership.current(home)


class MeshError(Exception):
    """The mesh cannot run as asked; the message names the project, the key and the fix."""


class PeerChannel(Protocol):
    """Where the agent serves the peer channel for its node (its proxy's peer listener)."""

    def available(self) -> bool:
        """Whether it can serve now; when not (no proxy), the node serves its own channel."""
        ...

    async def open(self, n: node.Node, host: str, port: int) -> int:
        """Listen on ``host:port`` for ``n`` (0 picks a port); the bound port. Raises OSError."""
        ...

    async def close(self) -> None: ...


class _Instance(Protocol):
    phase: plan.Phase

    def health(self) -> plan.Health: ...


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Applied:
    """What the mesh needs of one applied project."""

    name: str
    project: model.Project
    enabled: tuple[str, ...]


def differences(a: model.MeshSettings, b: model.MeshSettings) -> list[tuple[str, Any, Any]]:
    """(dotted key, value in a, value in b) for every mesh key whose value differs."""
    out: list[tuple[str, Any, Any]] = []

    def walk(x: Any, y: Any, prefix: str) -> None:
        for f in dataclasses.fields(x):
            vx, vy = getattr(x, f.name), getattr(y, f.name)
            if dataclasses.is_dataclass(vx):
                walk(vx, vy, f"{prefix}.{f.name}")
            elif vx != vy:
                out.append((f"{prefix}.{f.name}", vx, vy))

    walk(a, b, "mesh")
    return out


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return "[" + ", ".join(str(v) for v in value) + "]"
    return "(default)" if value is None else str(value)


def _loopback_only(mesh: model.MeshSettings) -> bool:
    """Whether discovery stays on this machine, so the peer channel needs no other address."""
    if tuple(mesh.discovery.interfaces) != ("lo",) or mesh.discovery.mdns:
        return False
    if mesh.discovery.serf and not all(_is_loopback(j) for j in mesh.discovery.serf.join):
        return False
    return all(_is_loopback(seed) for seed in mesh.discovery.peers)


def _is_loopback(entry: str) -> bool:
    """Whether ``HOST:PORT`` names this machine (localhost or a loopback address)."""
    host = entry.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def node_settings(home: Path, mesh: model.MeshSettings) -> node.NodeSettings:
    """The node's settings from a project's ``mesh:``."""
    d = mesh.discovery
    return node.NodeSettings(
        home=home,
        node_name=mesh.node_name,
        interfaces=tuple(d.interfaces),
        broadcast=d.broadcast,
        discovery_port=d.port,
        seeds=tuple(d.peers),
        mdns=d.mdns,
        serf=d.serf is not None,
        serf_port=d.serf.port if d.serf else 7946,
        serf_join=tuple(d.serf.join) if d.serf else (),
        channel_host="127.0.0.1" if _loopback_only(mesh) else "0.0.0.0",
        channel_port=mesh.port,
        interval_s=d.interval_s,
        allow=tuple(mesh.allow),
    )


def shared_services(
    applied: Iterable[Applied], instances: Mapping[plan.Key, _Instance]
) -> tuple[catalogs.SharedService, ...]:
    """The catalog entries of the enabled ``share: true`` services that run here."""
    out = []
    for a in applied:
        for name in a.enabled:
            svc = a.project.services.get(name)
            if svc is None or not svc.share or not svc.runs_here or svc.version is None:
                continue
            out.append(
                catalogs.SharedService(
                    name=name,
                    project=a.name,
                    version=svc.version,
                    branch=svc.branch,
                    health=_health(instances.get((a.name, name))),
                )
            )
    return tuple(sorted(out, key=lambda s: (s.project, s.name)))


def _health(inst: _Instance | None) -> str:
    if inst is None:
        return "starting"
    if inst.phase is not plan.Phase.RUNNING:
        return "stopped"
    h = inst.health()
    if h is plan.Health.NONE:
        return "healthy"  # no check: running is ready
    return h.value


def _valid(services: tuple[catalogs.SharedService, ...]) -> tuple[catalogs.SharedService, ...]:
    """Drop (with a warning) an entry peers would refuse, so one does not void the catalog."""
    node_id = "0" * 32
    keep = []
    for s in services:
        one = catalogs.Catalog(node_id=node_id, services=(s,))
        try:
            catalogs.decode(catalogs.encode(one), node_id=node_id)
        except catalogs.CatalogError as exc:
            log.warning("mesh: %s/%s is not shared: %s", s.project, s.name, exc)
            continue
        keep.append(s)
    return tuple(keep)


class MeshHost:
    """Starts, checks, feeds and stops the agent's one mesh node."""

    def __init__(
        self,
        home: Path,
        *,
        channel: PeerChannel | None = None,
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        self.home = home
        self.channel = channel
        self.on_change = on_change
        """Called when the node starts or stops and when what peers share changes."""
        self.hosted = False
        """Whether the running node's peer channel is ``channel`` (else its own listener)."""
        self.node: node.Node | None = None
        self.owner: str | None = None
        """The project whose ``mesh:`` the node runs with."""
        self.settings: model.MeshSettings | None = None
        self._services: tuple[catalogs.SharedService, ...] = ()
        self._warned: set[tuple[str, str]] = set()
        self.off: str | None = None
        """Why the mesh a project asks for (``owner``, ``settings``) is off: MESH_OFF while
        this machine has not joined a team, or the reason the identity installed since
        could not start it (``reload_identity``); ``node`` is None then."""
        self._lock = anyio.Lock()
        """One change of the node at a time: an ``up`` and a ``mesh join`` arriving together
        must not both stop and start it."""

    # ---------------------------------------------------------------- checks and start

    def conflict(self, proj: model.Project, others: Iterable[Applied]) -> str | None:
        """Why applying ``proj`` must be refused because of the running mesh, if it must."""
        if proj.mesh is None or self.settings is None:
            return None
        holders = [a.name for a in others if a.project.mesh is not None and a.name != proj.name]
        if not holders:
            return None  # it alone asks for a mesh: it may change the settings
        diffs = differences(proj.mesh, self.settings)
        if not diffs:
            return None
        owner = self.owner if self.owner in holders else holders[0]
        said = "; ".join(
            f"{key} is {_show(mine)} in project {proj.name} but {_show(theirs)} in project {owner}"
            for key, mine, theirs in diffs
        )
        return (
            f"this agent runs one mesh, set by project {owner}: {said}. Give project "
            f"{proj.name} the same mesh: settings, or `devmesh down` project {owner} first"
        )

    async def ensure(self, proj: model.Project, others: Iterable[Applied]) -> None:
        """Run the node for ``proj``'s ``mesh:`` (a no-op when it runs with these settings).

        Raises MeshError naming the cause; the node that ran before is kept (or restarted
        as it was) when the new one cannot start, so a failed apply changes nothing.
        """
        async with self._lock:
            await self._ensure(proj, others)

    async def _ensure(self, proj: model.Project, others: Iterable[Applied]) -> None:
        mesh = proj.mesh
        if mesh is None:
            return
        problem = self.conflict(proj, others)
        if problem:
            raise MeshError(problem)
        has_identity = await anyio.to_thread.run_sync(_has_identity, self.home)
        if self.settings == mesh and (self.node is not None or not has_identity):
            if self.owner is None:
                self.owner = proj.name
            return
        previous = self.settings if self.node is not None else None
        if self.node is not None:
            await self._stop()
        if not has_identity:
            # Not a reason to refuse the project: its services run, and calls to what runs
            # elsewhere go to the fallback. `mesh init|join` starts the node later.
            self.owner, self.settings, self.off = proj.name, mesh, MESH_OFF
            log.warning("mesh off for project %s: %s", proj.name, NO_IDENTITY)
            return
        try:
            await self._start(proj.name, mesh)
        except MeshError:
            if previous is not None and self.owner is not None:
                try:
                    await self._start(self.owner, previous)
                except MeshError as again:
                    log.error("mesh: cannot restart the previous mesh: %s", again)
            raise

    async def _start(self, owner: str, mesh: model.MeshSettings) -> None:
        where = f"project {owner}"
        if not await anyio.to_thread.run_sync(_has_identity, self.home):
            raise MeshError(f"{where} has a mesh: section but {NO_IDENTITY}")
        hosted = self.channel is not None and self.channel.available()
        settings = dataclasses.replace(node_settings(self.home, mesh), serve_channel=not hosted)
        try:
            n = node.Node(
                settings,
                services=_valid(self._services),
                log=_log_line,
                on_change=self.on_change,
            )
        except ids.IdentityError as exc:
            raise MeshError(f"{where}: mesh identity: {exc}") from exc
        team = n.identity.team.mesh
        if mesh.name is not None and mesh.name != team:
            raise MeshError(
                f"{where}: mesh.name is {mesh.name} but this machine's team identity is "
                f"for mesh {team} ({ids.mesh_dir(self.home)}); use mesh.name: {team}, or "
                "join that team with `devmesh mesh join FILE`"
            )
        try:
            if hosted and self.channel is not None:
                n.channel_port = await self.channel.open(n, settings.channel_host, mesh.port)
            await n.start()
        except (discovery.DiscoveryError, OSError) as exc:
            if hosted and self.channel is not None:
                await self.channel.close()
            if isinstance(exc, discovery.DiscoveryError):
                raise MeshError(f"{where}: mesh.discovery: {exc}") from exc
            raise MeshError(
                f"{where}: cannot open the mesh's sockets (peer channel TCP port {mesh.port}, "
                f"discovery UDP port {mesh.discovery.port}): {exc.strerror or exc}"
            ) from exc
        self.node, self.owner, self.settings, self.hosted = n, owner, mesh, hosted
        self.off = None
        self.on_change()
        log.info(
            "mesh %s: node %s (%s), peer channel on port %d, discovery on %s UDP port %d",
            team,
            n.identity.node_name,
            n.identity.node_id,
            n.channel_port,
            ",".join(mesh.discovery.interfaces) if mesh.discovery.broadcast else "seeds",
            mesh.discovery.port,
        )

    async def reload_identity(self) -> dict[str, Any]:
        """Follow the team identity now in ``DEVMESH_HOME/mesh`` (after `mesh init|join`).

        Why: those commands write the files without the agent. A project's mesh that was
        off for want of an identity starts now, with no service restarted. A running node
        whose identity changed (another team, another node name) would go on announcing
        the old one until the agent restarts: it says goodbye first, so its teammates drop
        it at once, then a node with the same ``mesh:`` settings starts with the new
        identity. When that cannot start (say the project's ``mesh.name`` is not the new
        team's), the mesh stays stopped and the answer says why: the old identity is gone,
        so the old node cannot come back. An identity that did not change (a rejoin of the
        same team under the same name) leaves the running node alone.

        Returns ``{"started": bool, "restarted": bool, "error": str | None}``; both false
        with no error when no project asks for a mesh (the next ``up`` starts one).
        """
        async with self._lock:
            out: dict[str, Any] = {"started": False, "restarted": False, "error": None}
            if self.settings is None or self.owner is None:
                return out
            owner, mesh = self.owner, self.settings
            if self.node is None:
                try:
                    await self._start(owner, mesh)
                except MeshError as exc:
                    log.error("mesh: not started with the team identity: %s", exc)
                    self.off = str(exc)  # still off, now for this reason
                    return {**out, "error": str(exc)}
                log.info("mesh: this machine joined a team; the mesh of project %s is on", owner)
                return {**out, "started": True}
            now = await anyio.to_thread.run_sync(_identity_now, self.home)
            if now == self.node.identity:
                return out
            log.info("mesh: the team identity changed; leaving the mesh to rejoin with it")
            await self._stop()
            try:
                await self._start(owner, mesh)
            except MeshError as exc:
                log.error("mesh: not restarted with the new team identity: %s", exc)
                return {**out, "error": str(exc)}
            return {**out, "restarted": True}

    def off_for(self, proj: model.Project) -> bool:
        """Whether ``proj``'s ``mesh:`` is (or, applied now, would be) off: no identity."""
        if proj.mesh is None:
            return False
        if self.off is not None and self.owner == proj.name:
            return True
        return self.node is None and not ids.exists(self.home)

    async def restore(self, applied: Iterable[Applied]) -> None:
        """After an agent restart: run the mesh of the first applied project that has one."""
        items = list(applied)
        first = next((a for a in items if a.project.mesh is not None), None)
        if first is None:
            return
        try:
            await self.ensure(first.project, items)
        except MeshError as exc:
            log.error("mesh not started: %s", exc)

    async def release(self, applied: Iterable[Applied]) -> None:
        """After a down: stop the node when no applied project asks for a mesh any more."""
        holders = [a.name for a in applied if a.project.mesh is not None]
        async with self._lock:
            if not holders:
                if self.node is not None:
                    log.info("mesh: no applied project has a mesh: section; leaving the mesh")
                await self._stop()
            elif self.owner not in holders:
                self.owner = holders[0]

    async def stop(self) -> None:
        """Say goodbye and close the node (idempotent)."""
        async with self._lock:
            await self._stop()

    async def _stop(self) -> None:
        n, self.node, self.settings = self.node, None, None
        hosted, self.hosted = self.hosted, False
        self.owner, self.off = None, None
        if n is not None:
            await n.stop()  # the goodbye first, then the listener goes
            if hosted and self.channel is not None:
                await self.channel.close()
            self.on_change()

    # ---------------------------------------------------------------- catalog

    def publish(self, applied: Iterable[Applied], instances: Mapping[plan.Key, _Instance]) -> None:
        """Hand the node the current shared services; it announces when they changed."""
        services = shared_services(applied, instances)
        if services == self._services:
            return
        self._services = services
        if self.node is not None:
            self.node.set_services(_valid(services))

    # ---------------------------------------------------------------- views

    def display_names(self) -> dict[str, str]:
        """Node id -> the name every view shows (``NAME#ID6`` when two live nodes, this one
        included, share a name; see ``core.nodenames``); empty while no node runs."""
        n = self.node
        if n is None:
            return {}
        live = [(n.identity.node_id, n.identity.node_name)]
        others: list[tuple[str, str]] = []
        for p in n.registry.peers():
            (live if p.state is peerreg.PeerState.ALIVE else others).append((p.node_id, p.name))
        return nodenames.display_names(live, others)

    def shared_names(self) -> list[str]:
        """The node names two or more live nodes carry now (``peers`` warns about them)."""
        n = self.node
        if n is None:
            return []
        live = [(n.identity.node_id, n.identity.node_name)]
        live += [
            (p.node_id, p.name) for p in n.registry.peers() if p.state is peerreg.PeerState.ALIVE
        ]
        return sorted(nodenames.shared(live))

    def peers(self) -> list[dict[str, Any]]:
        """The peers as ``status --json`` shows them (exactly the documented keys)."""
        if self.node is None:
            return []
        names = self.display_names()
        out = []
        for p in self.node.status()["peers"]:  # type: ignore[attr-defined]
            out.append(
                {
                    "node": p["node"],
                    "name": p["name"],
                    "display_name": nodenames.shown(names, p["node"], p["name"]),
                    "address": p["address"],
                    "state": p["state"],
                    "last_seen_s": p["last_seen_s"],
                    "services": p["services"],
                }
            )
        return out

    def status(self) -> dict[str, Any]:
        """Everything `devmesh peers` shows: this node, peers, backends, drop counters."""
        if self.node is None or self.settings is None:
            if self.off is not None:
                return {"running": False, "mesh_off": self.off, "project": self.owner}
            return {"running": False}
        doc = self.node.status()
        names = self.display_names()
        doc["display_name"] = nodenames.shown(names, str(doc["node"]), str(doc["name"]))
        for p in doc["peers"]:  # type: ignore[attr-defined]
            p["display_name"] = nodenames.shown(names, p["node"], p["name"])
        d = self.settings.discovery
        return {
            "shared_names": self.shared_names(),
            "running": True,
            "project": self.owner,
            "discovery": {
                "broadcast": d.broadcast,
                "interfaces": list(d.interfaces),
                "port": d.port,
                "seeds": list(d.peers),
                "mdns": d.mdns,
                "serf": {"port": d.serf.port, "join": list(d.serf.join)} if d.serf else None,
                "interval_s": d.interval_s,
            },
            "allow": list(self.settings.allow),
            **doc,
        }


def _log_line(line: str) -> None:
    # Every dropped datagram is counted (`devmesh peers`); logging each at INFO would let
    # anyone on the network fill the agent's log.
    log.log(logging.DEBUG if line.startswith("mesh: dropped") else logging.INFO, "%s", line)
