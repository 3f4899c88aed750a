"""The peer channel: mutual TLS between team members, and the catalog served over it.

Why mutual TLS from the team CA: discovery datagrams only say "a node of this mesh is at
this address"; anybody on the link can read them. What a node shares is fetched over a
channel where both sides present a certificate of the team CA, and where the client checks
that the server's certificate names the node id it announced (``ID.MESH.devmesh.internal``)
and the server reads the caller's node id and name from its certificate. A node with the
right secret but a certificate of another CA is refused here, and counted.

What lives here: the two ``ssl.SSLContext`` factories, ``peer_identity`` (who is on the
other side of a connection), ``handle_catalog`` (a plain function of the request path and
the peer, so the agent's proxy can host it later), a small standalone HTTPS server for it
(h11 over asyncio streams), and ``fetch_catalog``, a client that enforces the size limit
while reading, so a hostile peer cannot make this node buffer more than the limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
import ssl
from collections.abc import Callable
from typing import cast

import h11

from devmesh.core import catalog as catalogs
from devmesh.mesh import identity as ids

CATALOG_PATH = "/mesh/v1/catalog"
MAX_REQUEST_HEAD_BYTES = 16 * 1024
READ_TIMEOUT_S = 10.0
MAX_CONNECTIONS = 64
"""Concurrent connections the standalone server holds; more are closed at once, so slow
clients cannot pile up (each one is also bounded by READ_TIMEOUT_S per read)."""
_NODE_ID = re.compile(r"[0-9a-f]{32}")


def _words(exc: OSError) -> str:
    """An OS or TLS error in words, never empty: a reset raised without arguments says
    nothing in ``str(exc)``, so its kind is named instead."""
    reason = getattr(exc, "reason", None)
    words = str(reason or exc.strerror or exc or "").strip()
    if words:
        return words
    kind = type(exc).__name__
    return {
        "ConnectionResetError": "connection reset by the peer",
        "ConnectionAbortedError": "connection aborted",
        "BrokenPipeError": "connection closed by the peer",
    }.get(kind, kind)


class ChannelError(Exception):
    """A fetch over the peer channel failed.

    ``refused`` is True when the other side failed the TLS checks (another CA, a name
    other than the announced one): a permanent refusal, not a reason to retry soon.
    """

    def __init__(self, peer: str, problem: str, *, refused: bool = False) -> None:
        problem = problem.strip().rstrip(":") or "failed, with no reason given"
        super().__init__(f"peer {peer}: {problem}")
        self.peer = peer
        self.problem = problem
        self.refused = refused


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class PeerIdentity:
    """Who is on the other end, as its certificate (signed by the team CA) says."""

    node_id: str
    node_name: str
    address: str = ""
    """The connection's source address (what ``mesh.allow`` CIDRs are checked against)."""


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Response:
    status: int
    body: bytes
    content_type: str = "application/json"


# -- TLS -------------------------------------------------------------------------------------


def _context(purpose: ssl.Purpose, identity: ids.Identity) -> ssl.SSLContext:
    ctx = ssl.create_default_context(purpose, cafile=str(identity.ca_path))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(identity.node_cert_path), str(identity.node_key_path))
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def server_context(identity: ids.Identity) -> ssl.SSLContext:
    """Server side: present the node certificate, require a client certificate of the team
    CA (and only of it: the team CA is the one trust anchor)."""
    return _context(ssl.Purpose.CLIENT_AUTH, identity)


def client_context(identity: ids.Identity) -> ssl.SSLContext:
    """Client side: present the node certificate, verify the server against the team CA and
    the name of the node it announced (``check_hostname`` with its id name)."""
    ctx = _context(ssl.Purpose.SERVER_AUTH, identity)
    ctx.check_hostname = True
    return ctx


def peer_identity(
    cert: dict[str, object] | None, mesh: str, address: str = ""
) -> PeerIdentity | None:
    """Node id and name from a verified peer certificate (``getpeercert()``), or None."""
    if not cert:
        return None
    suffix = f".{mesh}.{ids.NODE_DOMAIN}"
    labels = []
    for kind, value in cert.get("subjectAltName", ()):  # type: ignore[attr-defined]
        if kind == "DNS" and isinstance(value, str) and value.endswith(suffix):
            label = value[: -len(suffix)]
            if "." not in label:
                labels.append(label)
    node_ids = [label for label in labels if _NODE_ID.fullmatch(label)]
    names = [label for label in labels if not _NODE_ID.fullmatch(label)]
    if len(node_ids) != 1:
        return None
    name = names[0] if names else node_ids[0]
    return PeerIdentity(node_id=node_ids[0], node_name=name, address=address)


# -- the catalog handler ---------------------------------------------------------------------


def handle_catalog(
    method: str,
    path: str,
    peer: PeerIdentity | None,
    *,
    catalog: Callable[[], bytes],
    allowed: Callable[[PeerIdentity], str | None],
) -> Response:
    """Answer one request of the peer channel. ``allowed`` returns why a peer is refused."""
    if peer is None:
        return Response(status=403, body=b'{"error":"no team certificate"}')
    refusal = allowed(peer)
    if refusal:
        return Response(status=403, body=b'{"error":"refused by mesh.allow"}')
    if path.split("?", maxsplit=1)[0] != CATALOG_PATH:
        return Response(status=404, body=b'{"error":"not found"}')
    if method not in ("GET", "HEAD"):
        return Response(status=405, body=b'{"error":"method not allowed"}')
    return Response(status=200, body=catalog())


# -- standalone server -----------------------------------------------------------------------


class CatalogServer:
    """An HTTPS (mutual TLS) listener that serves ``handle_catalog``.

    TLS runs over memory BIOs in the connection's own protocol (``_TlsConnection``) rather
    than through the event loop's TLS (``ssl=`` or ``start_tls``): a refused handshake is
    then ours to count in ``refused_handshakes`` (asyncio only logs it), and the handshake
    behaves the same on every loop (uvloop's server-side ``start_tls`` sometimes stalls a
    mutual-TLS handshake until the client gives up; the agent runs on uvloop).
    """

    def __init__(
        self,
        identity: ids.Identity,
        *,
        catalog: Callable[[], bytes],
        allowed: Callable[[PeerIdentity], str | None] = lambda _peer: None,
        on_refused: Callable[[str, str], None] = lambda _where, _why: None,
    ) -> None:
        self.identity = identity
        self.catalog = catalog
        self.allowed = allowed
        self.on_refused = on_refused
        self.refused_handshakes = 0
        self.served = 0
        self._server: asyncio.Server | None = None
        self._ctx = server_context(identity)
        self.connections: set[_TlsConnection] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, host: str, port: int) -> int:
        """Listen; returns the bound port (``port=0`` picks one)."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _TlsConnection(self), host, port)
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for conn in list(self.connections):
                conn.abort()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._server.wait_closed()

    def _refused(self, where: str, why: str) -> None:
        self.refused_handshakes += 1
        self.on_refused(where, why)

    def _spawn(self, conn: _TlsConnection) -> None:
        task = asyncio.get_running_loop().create_task(self._serve_connection(conn))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve_connection(self, conn: _TlsConnection) -> None:
        try:
            peer = peer_identity(conn.peercert(), self.identity.team.mesh, conn.where)
            await self._serve(conn, peer)
        except (OSError, ssl.SSLError, TimeoutError, h11.ProtocolError):
            pass
        finally:
            conn.close()

    async def _serve(self, conn: _TlsConnection, peer: PeerIdentity | None) -> None:
        h = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD_BYTES)
        while True:
            event = h.next_event()
            if event is h11.NEED_DATA:
                async with asyncio.timeout(READ_TIMEOUT_S):
                    data = await conn.reader.read(65536)
                h.receive_data(data)
                continue
            if isinstance(event, h11.Request):
                response = handle_catalog(
                    event.method.decode(),
                    event.target.decode("ascii", "replace"),
                    peer,
                    catalog=self.catalog,
                    allowed=self.allowed,
                )
                if response.status == 403 and peer is not None:
                    self.on_refused(peer.node_name, "refused by mesh.allow")
                self.served += 1
                headers = [
                    ("content-type", response.content_type),
                    ("content-length", str(len(response.body))),
                ]
                out = h.send(h11.Response(status_code=response.status, headers=headers))
                if event.method != b"HEAD":
                    out += h.send(h11.Data(data=response.body))
                conn.write(out + h.send(h11.EndOfMessage()))
                continue
            if isinstance(event, h11.EndOfMessage | h11.Data):
                continue
            if h.our_state is h11.DONE and h.their_state is h11.DONE:
                h.start_next_cycle()
                continue
            return  # ConnectionClosed, PAUSED or an error state


class _TlsConnection(asyncio.Protocol):
    """One accepted connection: TLS over memory BIOs, plaintext into a StreamReader.

    The handshake must end within READ_TIMEOUT_S; a failed or abandoned one is counted as
    refused (a connection refused for being over MAX_CONNECTIONS is not: that is load, not
    a verdict on the peer).
    """

    def __init__(self, server: CatalogServer) -> None:
        self.server = server
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.tls = server._ctx.wrap_bio(self.incoming, self.outgoing, server_side=True)
        self.reader = asyncio.StreamReader(limit=4 * MAX_REQUEST_HEAD_BYTES)
        self.transport: asyncio.Transport | None = None
        self.where = "?"
        self.handshaken = False
        self.done = False
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no asyncio.Transport
        peername = transport.get_extra_info("peername")
        self.where = str(peername[0]) if peername else "?"
        if len(self.server.connections) >= MAX_CONNECTIONS:
            self.server.on_refused("server", f"over {MAX_CONNECTIONS} connections")
            self.done = True
            transport.close()
            return
        self.server.connections.add(self)
        self._timer = asyncio.get_running_loop().call_later(READ_TIMEOUT_S, self._too_slow)

    def _too_slow(self) -> None:
        if not self.handshaken:
            self._fail(f"TLS handshake: not finished within {READ_TIMEOUT_S:.0f} s")

    def _fail(self, why: str) -> None:
        if not self.done:
            self.server._refused(self.where, why)
        self.abort()

    def data_received(self, data: bytes) -> None:
        if self.done:
            return
        self.incoming.write(data)
        if not self.handshaken:
            try:
                self.tls.do_handshake()
            except ssl.SSLWantReadError:
                self._flush()
                return
            except ssl.SSLError as exc:
                self._flush()  # the alert, so the client learns why
                detail = getattr(exc, "verify_message", None)
                why = f"certificate verify failed: {detail}" if detail else exc.reason or exc
                self._fail(f"TLS handshake: {why}")
                return
            self.handshaken = True
            if self._timer is not None:
                self._timer.cancel()
            self.server._spawn(self)
        while True:
            try:
                chunk = self.tls.read(65536)
            except ssl.SSLWantReadError:
                break
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                self.reader.feed_eof()
                break
            except ssl.SSLError:
                self.abort()
                return
            if not chunk:
                self.reader.feed_eof()
                break
            self.reader.feed_data(chunk)
        self._flush()

    def _flush(self) -> None:
        out = self.outgoing.read()
        if out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(out)

    def write(self, data: bytes) -> None:
        """Send plaintext (a catalog is small: no flow control needed beyond the kernel's)."""
        if self.done:
            raise ConnectionResetError("the peer channel connection is closed")
        self.tls.write(data)
        self._flush()

    def peercert(self) -> dict[str, object] | None:
        cert: dict[str, object] | None = dict(self.tls.getpeercert() or {})
        return cert or None

    def eof_received(self) -> bool:
        if not self.handshaken:
            self._fail("TLS handshake: closed by the caller")
        self.reader.feed_eof()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.handshaken and not self.done:
            self._fail(f"TLS handshake: {exc or 'connection closed'}")
        self.done = True
        if self._timer is not None:
            self._timer.cancel()
        self.reader.feed_eof()
        self.server.connections.discard(self)

    def close(self) -> None:
        """Close after sending what is queued (TLS close_notify included)."""
        if self.transport is not None and not self.transport.is_closing():
            if self.handshaken and not self.done:
                with contextlib.suppress(ssl.SSLError):
                    self.tls.unwrap()
                self._flush()
            self.transport.close()
        self.done = True

    def abort(self) -> None:
        self.done = True
        if self.transport is not None:
            self.transport.close()


# -- client ----------------------------------------------------------------------------------


async def fetch_catalog(
    identity: ids.Identity,
    *,
    node_id: str,
    node_name: str,
    address: str,
    port: int,
    timeout_s: float = 5.0,
    max_bytes: int = catalogs.MAX_CATALOG_BYTES,
    context: ssl.SSLContext | None = None,
) -> catalogs.Catalog:
    """Fetch and check a peer's catalog.

    Raises ChannelError: ``refused=True`` when the peer fails the TLS checks (certificate
    not of the team CA, or not for the node id it announced, or another name), otherwise
    for I/O errors, timeouts, an HTTP error, a body over ``max_bytes`` (stopped while
    reading) or a catalog that fails ``catalog.decode``.
    """
    ctx = context or client_context(identity)
    server_name = ids.node_dns_name(node_id, identity.team.mesh)
    who = f"{node_name} ({address}:{port})"
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout_s):
            try:
                reader, writer = await asyncio.open_connection(
                    address, port, ssl=ctx, server_hostname=server_name
                )
            except ssl.SSLEOFError:
                raise ChannelError(who, "closed during the TLS handshake (busy?)") from None
            except ssl.SSLError as exc:
                raise ChannelError(who, f"TLS: {_words(exc)}", refused=True) from None
            seen = peer_identity(writer.get_extra_info("peercert"), identity.team.mesh)
            if seen is None or seen.node_id != node_id or seen.node_name != node_name:
                raise ChannelError(
                    who, f"certificate names {seen} rather than the announced node", refused=True
                )
            return await _exchange(reader, writer, who, node_id, max_bytes)
    except TimeoutError:
        raise ChannelError(who, f"no answer within {timeout_s} s") from None
    except ssl.SSLError as exc:
        raise ChannelError(who, f"TLS: {_words(exc)}", refused=True) from None
    except OSError as exc:
        raise ChannelError(who, f"connection failed: {_words(exc)}") from None
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError):
                async with asyncio.timeout(1):
                    await writer.wait_closed()


async def _exchange(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    who: str,
    node_id: str,
    max_bytes: int,
) -> catalogs.Catalog:
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_REQUEST_HEAD_BYTES)
    request = h11.Request(
        method="GET",
        target=CATALOG_PATH,
        headers=[("host", "devmesh-peer"), ("accept", "application/json")],
    )
    writer.write(conn.send(request) + conn.send(h11.EndOfMessage()))
    await writer.drain()
    body = bytearray()
    status = 0
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await reader.read(65536)
                if not data and status == 0:
                    raise ChannelError(
                        who, "connection closed before any answer (our certificate refused?)"
                    )
                conn.receive_data(data)
            elif isinstance(event, h11.Response):
                status = event.status_code
                length = dict(event.headers).get(b"content-length")
                if length is not None and length.isdigit() and int(length) > max_bytes:
                    raise ChannelError(who, f"catalog of {int(length)} bytes, over {max_bytes}")
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > max_bytes:
                    raise ChannelError(who, f"catalog over {max_bytes} bytes")
            elif isinstance(event, h11.EndOfMessage):
                break
            else:
                raise ChannelError(who, "connection closed before the catalog was complete")
    except h11.ProtocolError as exc:
        raise ChannelError(who, f"bad HTTP answer: {exc}") from None
    if status != 200:
        raise ChannelError(who, f"HTTP {status}: {bytes(body[:200]).decode('utf-8', 'replace')}")
    try:
        return catalogs.decode(bytes(body), node_id=node_id)
    except catalogs.CatalogError as exc:
        raise ChannelError(who, f"invalid catalog: {exc}") from None
