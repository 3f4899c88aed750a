"""The peer listener: teammates' proxies call this node's shared services here.

Why it is a listener of the proxy and not a server of its own: a call from a peer is one more
request through the proxy's one forwarding path (``forward``), with its streaming, upgrades,
timeouts, error pages and access log. What is particular to it is decided here, as plain
code over the route table:

- who calls: the TLS layer has already required a certificate of the team CA (the listener's
  ``ssl_context``); ``authorize`` turns that certificate and the address into a caller, or a
  refusal in words (``mesh.allow``), which gets 403 and a closed connection;
- ``GET /mesh/v1/catalog``: what this node shares, as the mesh node words it;
- any other request names ``x-devmesh-service: SERVICE.PROJECT`` and goes ONLY to the local
  backend of that name when it is shared and healthy: never to a peer or a fallback, whatever
  the table says, so two nodes announcing each other's services cannot make a loop. A request
  this node cannot serve is answered with ``x-devmesh-unavailable: 1``: the caller then moves
  on as after a failed connection (nothing was forwarded here).
"""

from __future__ import annotations

import dataclasses
import json
import ssl
from collections.abc import Callable

from devmesh.proxy import headers, selection, table

CATALOG_PATH = b"/mesh/v1/catalog"
MAX_CONNECTIONS = 128
"""Teammates' connections (past their TLS handshake) the peer listener holds at once; more
get a 503 and are closed. Peer hops are pooled and kept alive, so a few dozen per busy
teammate is the norm (one per concurrent call)."""
MAX_PER_NODE = 48
"""Of those, the most one teammate's node may hold, so that no member keeps the others out."""
MAX_HANDSHAKES = 128
"""Connections still in their TLS handshake, held apart from the members' places: a stranger
who never finishes a handshake can fill only this budget, never a teammate's place."""
MAX_HANDSHAKES_PER_ADDRESS = 32
"""Of those, the most from one source address (more are closed at once), so that one
stranger cannot fill the handshake budget either; a teammate's burst of new connections
(a worker's pool filling up) stays well within it."""
HANDSHAKE_TIMEOUT_S = 5.0
"""How long a TLS handshake on the peer listener may take before its connection is closed
(the event loop's default is 60 s: a slow stranger would hold a place that long)."""
REFUSED_BODY = {"error": "refused by mesh.allow"}


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class PeerCaller:
    """A teammate's node, as its certificate and address say."""

    node_id: str
    node_name: str
    address: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class PeerListener:
    """What the agent hands the proxy to open the peer listener (see docs/proxy.md)."""

    host: str
    """Bind address (the mesh node's channel host)."""
    port: int
    """``mesh.port``; 0 picks a free one (tests)."""
    ssl_context: ssl.SSLContext
    """Server side, CERT_REQUIRED against the team CA."""
    authorize: Callable[[dict[str, object] | None, str], PeerCaller | str]
    """(``getpeercert()``, peer IP) -> the caller, or the refusal in words."""
    catalog: Callable[[], bytes]
    """The body of ``GET /mesh/v1/catalog``."""
    max_connections: int = MAX_CONNECTIONS
    max_per_node: int = MAX_PER_NODE
    max_handshakes: int = MAX_HANDSHAKES
    max_handshakes_per_address: int = MAX_HANDSHAKES_PER_ADDRESS
    handshake_timeout_s: float = HANDSHAKE_TIMEOUT_S


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Crowded:
    """A teammate past the listener's cap or its node's: answered 503 and closed."""

    node_name: str
    why: str


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Answer:
    """The peer listener's own answer to a request it does not forward."""

    status: int
    body: bytes
    unavailable: bool = False
    """Adds ``x-devmesh-unavailable: 1``: the caller may try elsewhere."""
    close: bool = False


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Strip:
    """The request head adjustment for a served call: the service header goes."""

    add: headers.Headers = dataclasses.field(default_factory=list)
    host: bytes | None = None
    prefix: bytes = b""
    drop: frozenset[bytes] = frozenset({selection.SERVICE_HEADER})


STRIP = Strip()


def _error(status: int, words: str, *, unavailable: bool = False, close: bool = False) -> Answer:
    body = json.dumps({"error": words}).encode()
    return Answer(status=status, body=body, unavailable=unavailable, close=close)


def authorize(listener: PeerListener, cert: dict[str, object] | None, ip: str) -> PeerCaller | str:
    """The listener's ``authorize``, never raising: a failure in it is a refusal."""
    try:
        return listener.authorize(cert, ip)
    except Exception as exc:  # the mesh node's code: whatever it raises refuses the caller
        return f"authorization failed: {exc}"


def serve(
    routes_table: table.RouteTable,
    listener: PeerListener,
    caller: PeerCaller | Crowded | str,
    *,
    method: bytes,
    target: bytes,
    hdrs: headers.Headers,
    node_name: str,
) -> table.Backend | Answer:
    """What the peer listener does with one request: the local backend to forward it to, or
    its own answer."""
    if isinstance(caller, str):
        return Answer(status=403, body=json.dumps(REFUSED_BODY).encode(), close=True)
    if isinstance(caller, Crowded):
        return _error(503, caller.why, unavailable=True, close=True)
    if target.split(b"?", 1)[0] == CATALOG_PATH:
        if method not in (b"GET", b"HEAD"):
            return _error(405, "method not allowed")
        return Answer(status=200, body=listener.catalog())
    wanted = headers.get(hdrs, selection.SERVICE_HEADER)
    if not wanted:
        return _error(400, "a call over the peer channel names its service in x-devmesh-service")
    name = wanted.decode("latin-1").strip()
    service, _, project = name.partition(".")
    backend = routes_table.backend(project, service)
    where = f" on node {node_name}" if node_name else ""
    if backend is None or not backend.shared:
        return _error(404, f"service {name} is not shared{where}", unavailable=True)
    if backend.state != table.State.RUNNING.value or backend.health != "healthy":
        words = backend.state if backend.state != table.State.RUNNING.value else backend.health
        return _error(503, f"service {name} is {words}{where}", unavailable=True)
    asked = headers.get(hdrs, selection.BRANCH_HEADER)
    branch = asked.decode("latin-1").strip() if asked else None
    if branch != backend.branch:
        return _error(
            404,
            f"service {name} runs in {_namespace(backend.branch)}{where}, "
            f"not in {_namespace(branch)}",
            unavailable=True,
        )
    return backend


def served_name(routes_table: table.RouteTable, hdrs: headers.Headers) -> tuple[str, str] | None:
    """(project, service) a peer's call names in ``x-devmesh-service``, when this node has a
    service of that name (the metrics count a call against it); None otherwise, so a name
    nobody runs never becomes a label."""
    wanted = headers.get(hdrs, selection.SERVICE_HEADER)
    if not wanted:
        return None
    service, _, project = wanted.decode("latin-1").strip().partition(".")
    backend = routes_table.backend(project, service)
    return (backend.project, backend.service) if backend is not None else None


def _namespace(branch: str | None) -> str:
    return f"branch {branch}" if branch else "the default namespace"
