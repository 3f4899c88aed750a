"""The route table and the edge listeners' ports as one JSON file, for proxies in other processes.

Why a file: proxy worker processes share nothing with the agent but the ports (that is their
point: one Python process saturates one core), so they need the agent's route table by some
other way. A file they poll is the simplest one that also survives a worker restart: a new
worker reads the current table at start, with no handshake. Polling costs one ``stat`` per
quarter second per worker.

The format is the standalone proxy's (``python -m devmesh.proxy --routes FILE``)::

    {"backends": [{"project": "shop", "service": "api", "port": 8080, "host": "127.0.0.1",
                   "scheme": "http", "state": "restarting", "reason": "exited with status 1",
                   "attempt": 2, "retry_at": 1767225600.5}],
     "agent": {...},                                   (optional, where devmesh.localhost goes)
     "edges": [{"caller_project": "shop", "caller_service": "web",
                "target_service": "api", "port": 41234}]}

With a mesh, the file also carries ``mesh`` (one object per ``table.MeshRoute``: ``owner`` (the
project that runs a dependency naming another one), ``peers``, ``fallback``, ``rules`` with
their requirements and settings, ``caller_branches``) and ``peer_tls`` (the node's file paths,
which workers load themselves), so a worker routes every call as the agent does.

Only ``project``, ``service`` and ``port`` are required in a backend; ``write`` always spells
out every ``table.Backend`` field so a worker's table equals the agent's. An edge's ``port``
may be null in a hand-written file (the standalone proxy then picks one).

``write`` replaces the file atomically (a temp file in the same folder, then ``os.replace``),
so a reader sees the old table or the new one, never half of one. It writes only when the
content changed, and makes the new file's mtime later than the old one's even when both land
in the same tick of the filesystem clock, so a reader that compares ``stamp`` values sees
every change and nothing else.

What it does not guarantee: durability across a machine crash (no fsync; the agent writes
the file again when it starts).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from devmesh.core import model, routes
from devmesh.proxy import table

_BACKEND_FIELDS = tuple(f.name for f in dataclasses.fields(table.Backend))


class RoutesFileError(ValueError):
    """The routes file is not valid JSON of the expected shape; names the file and the cause."""

    def __init__(self, path: Path | str, reason: str) -> None:
        self.path, self.reason = str(path), reason
        super().__init__(f"{path}: {reason}")


Edges = Mapping[table.Edge, int | None]
Parsed = tuple[table.RouteTable, dict[table.Edge, int | None]]


def encode(routes: table.RouteTable, edges: Edges) -> bytes:
    """The file's bytes for a table and edges; the same input always gives the same bytes."""
    doc: dict[str, Any] = {"backends": [_backend_doc(b) for b in routes.backends]}
    if routes.agent is not None:
        doc["agent"] = _backend_doc(routes.agent)
    if routes.mesh:
        doc["mesh"] = [_mesh_doc(m) for m in routes.mesh]
    if routes.peer_tls is not None:
        doc["peer_tls"] = dataclasses.asdict(routes.peer_tls)
    if routes.node_names:
        doc["node_names"] = [list(pair) for pair in routes.node_names]
    doc["edges"] = [
        {
            "caller_project": e.caller_project,
            "caller_service": e.caller_service,
            "target_service": e.target_service,
            "port": port,
        }
        for e, port in sorted(
            edges.items(), key=lambda item: (item[0].caller_project, item[0].label)
        )
    ]
    return (json.dumps(doc, indent=1) + "\n").encode()


def decode(data: bytes, path: Path | str = "<routes>") -> Parsed:
    """Parse the file's bytes. Raises RoutesFileError naming ``path`` on any problem."""
    try:
        doc = json.loads(data)
        if not isinstance(doc, dict):
            raise TypeError("expected a JSON object at the top")
        backends = tuple(_backend(b) for b in doc.get("backends") or ())
        agent = _backend(doc["agent"]) if doc.get("agent") else None
        mesh = tuple(_mesh(m) for m in doc.get("mesh") or ())
        peer_tls = table.PeerTLS(**doc["peer_tls"]) if doc.get("peer_tls") else None
        node_names = tuple((str(i), str(n)) for i, n in doc.get("node_names") or ())
        edges: dict[table.Edge, int | None] = {}
        for e in doc.get("edges") or ():
            port = e.get("port")
            if port is not None and (type(port) is not int or not 0 <= port < 65536):
                raise ValueError(f"edge port {port!r} is not a port number")
            edge = table.Edge(
                caller_project=str(e["caller_project"]),
                caller_service=str(e["caller_service"]),
                target_service=str(e["target_service"]),
            )
            edges[edge] = port
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        reason = f"missing key {exc}" if isinstance(exc, KeyError) else str(exc)
        raise RoutesFileError(path, reason) from exc
    return table.RouteTable(backends, agent, mesh, peer_tls, node_names), edges


def read(path: Path) -> Parsed:
    """The table and edges in ``path``. Raises OSError when unreadable, RoutesFileError when
    its content is not a routes file."""
    return decode(path.read_bytes(), path)


def write(path: Path, routes: table.RouteTable, edges: Edges) -> bool:
    """Replace ``path`` atomically with the table and edges; False when it already held them.

    Raises OSError when the folder cannot be written; the old file is then left as it was.
    """
    data = encode(routes, edges)
    try:
        if path.read_bytes() == data:
            return False
        previous_mtime_ns: int | None = path.stat().st_mtime_ns
    except FileNotFoundError:
        previous_mtime_ns = None
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        if previous_mtime_ns is not None and os.stat(tmp).st_mtime_ns <= previous_mtime_ns:
            # Same clock tick as the last write: readers poll the mtime, so move it forward.
            os.utime(tmp, ns=(previous_mtime_ns + 1, previous_mtime_ns + 1))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return True


def stamp(path: Path) -> tuple[int, int, int] | None:
    """What changes whenever the file does: (mtime_ns, inode, size); None when it is missing.

    The inode and size catch hand edits that land in the same mtime tick as the last one.
    """
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_mtime_ns, st.st_ino, st.st_size


def _backend_doc(backend: table.Backend) -> dict[str, Any]:
    return {name: getattr(backend, name) for name in _BACKEND_FIELDS}


def _backend(doc: Any) -> table.Backend:
    if not isinstance(doc, dict):
        raise TypeError(f"a backend must be an object, got {doc!r}")
    unknown = sorted(set(doc) - set(_BACKEND_FIELDS))
    if unknown:
        raise ValueError(f"unknown backend field(s) {', '.join(unknown)}")
    backend = table.Backend(**doc)
    if type(backend.port) is not int:
        raise ValueError(f"backend {backend.label}: port {backend.port!r} is not a number")
    if backend.attempt is not None and type(backend.attempt) is not int:
        raise ValueError(f"backend {backend.label}: attempt {backend.attempt!r} is not a number")
    if backend.retry_at is not None and type(backend.retry_at) not in (int, float):
        raise ValueError(
            f"backend {backend.label}: retry_at {backend.retry_at!r} is not a time in seconds"
        )
    return backend


def _mesh_doc(route: table.MeshRoute) -> dict[str, Any]:
    return {
        "project": route.project,
        "service": route.service,
        "owner": route.owner,
        "peers": [dataclasses.asdict(p) for p in route.peers],
        "fallback": route.fallback,
        "rules": [
            {
                "caller": r.caller,
                "requirements": [
                    {"range": q.range_text, "declared_by": q.declared_by} for q in r.requirements
                ],
                "versions": r.settings.versions.value,
                "prefer": r.settings.prefer.value,
                "balance": r.settings.balance.value,
            }
            for r in route.rules
        ],
        "caller_branches": [list(pair) for pair in route.caller_branches],
    }


def _mesh(doc: Any) -> table.MeshRoute:
    if not isinstance(doc, dict):
        raise TypeError(f"a mesh route must be an object, got {doc!r}")
    rules = tuple(
        table.CallerRule(
            caller=r.get("caller"),
            requirements=tuple(
                routes.Requirement(range_text=str(q["range"]), declared_by=str(q["declared_by"]))
                for q in r.get("requirements") or ()
            ),
            settings=routes.Settings(
                versions=model.VersionPolicy(r.get("versions", "warn")),
                prefer=model.Prefer(r.get("prefer", "local")),
                balance=routes.Balance(r.get("balance", "round_robin")),
            ),
        )
        for r in doc.get("rules") or ()
    )
    return table.MeshRoute(
        project=str(doc["project"]),
        service=str(doc["service"]),
        owner=None if doc.get("owner") is None else str(doc["owner"]),
        peers=tuple(table.PeerInstance(**p) for p in doc.get("peers") or ()),
        fallback=doc.get("fallback"),
        rules=rules,
        caller_branches=tuple((str(c), str(b)) for c, b in doc.get("caller_branches") or ()),
    )
