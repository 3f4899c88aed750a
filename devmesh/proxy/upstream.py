"""The service side of an exchange, the same whichever way the exchange runs.

Why a module: the two executions of an exchange (a task in ``exchange``, callbacks in
``callbacks``) must send the same request head, pass back the same response head, retry a
stale connection by the same rule and name a service's failures in the same words. Each of
those exists here once.
"""

from __future__ import annotations

from typing import Protocol

import h11

from devmesh.proxy import errors, headers, pool, settings, table

UNAVAILABLE = b"x-devmesh-unavailable"


class Adjust(Protocol):
    """How a hop changes the request head (``selection.Hop``)."""

    @property
    def add(self) -> headers.Headers: ...
    @property
    def host(self) -> bytes | None: ...
    @property
    def prefix(self) -> bytes: ...
    @property
    def drop(self) -> frozenset[bytes]: ...


def request_head(
    request: h11.Request,
    hdrs: headers.Headers,
    *,
    client_ip: str,
    proto: str,
    host: bytes,
    ws_key: bytes | None,
    hop: Adjust | None = None,
) -> h11.Request:
    """The request head for the service: forwarding headers set, hop-by-hop ones gone (an
    ``Expect`` stays: the service answers it), the upgrade asked again for a WebSocket.

    ``hop`` adjusts the head for a target that is not the local service (a peer hop's
    service header, the branch, a fallback's Host and path); None for the fast path."""
    out = headers.request_headers(hdrs, client_ip=client_ip, proto=proto, host=host)
    target = request.target
    if hop is not None:
        drop = set(hop.drop) | {name for name, _ in hop.add}
        if hop.host is not None:
            drop.add(b"host")
        out = [item for item in out if item[0] not in drop]
        if hop.host is not None:
            out.insert(0, (b"host", hop.host))
        out += hop.add
        target = hop.prefix + target if hop.prefix else target
    if ws_key is not None:
        out += [(b"connection", b"Upgrade"), (b"upgrade", b"websocket")]
    # _parsed=True skips h11's per-header regex checks (a third of h11's cost per request):
    # every name and value here came out of h11's own parser, or is ASCII we built above.
    # Framing (Content-Length, Transfer-Encoding) is still normalised and checked. It is a
    # private argument: pyproject.toml bounds h11's version, and
    # tests/test_proxy_h11_contract.py fails when h11 changes what the flag does.
    return h11.Request(method=request.method, target=target, headers=out, _parsed=True)


def may_retry(up: pool.Upstream, *, has_body: bool, attempt: int) -> bool:
    """Whether a request whose connection closed before a byte of the answer goes out once
    more on a new connection: only a first attempt, on a connection taken idle from the pool
    (the service may have closed it meanwhile), for a request without a body (nothing of it
    is lost, and a body already streamed cannot be sent again)."""
    return attempt == 0 and up.reused and not has_body


def closed_early(backend: table.Backend) -> errors.ProxyError:
    return errors.UpstreamClosedEarlyError(
        backend.service, backend.host, backend.port, "connection closed before a response"
    )


def response_timeout(backend: table.Backend, config: settings.Settings) -> errors.ProxyError:
    return errors.UpstreamTimeoutError(
        backend.service, backend.host, backend.port, "response", config.idle_timeout_s
    )


def idle_mid_answer(backend: table.Backend, config: settings.Settings) -> str:
    """The access log's error for a service that went quiet after its answer began."""
    return f"service {backend.service!r} idle for {config.idle_timeout_s:g} s mid-answer"


def broke_off(backend: table.Backend, reason: str) -> str:
    """The access log's error for an answer that stopped being HTTP after its head."""
    return f"service {backend.service!r} broke off its answer: {reason}"


def unavailable(backend: table.Backend, status: int, up_hdrs: headers.Headers) -> bool:
    """Whether a peer's answer says it forwarded nothing (``x-devmesh-unavailable: 1``)."""
    return (
        backend.scheme == table.MESH_SCHEME
        and status >= 400
        and headers.get(up_hdrs, UNAVAILABLE) == b"1"
    )


def peer_unavailable(backend: table.Backend, status: int) -> errors.ProxyError:
    node = backend.node_name if isinstance(backend, table.Dial) else backend.host
    return errors.PeerUnavailableError(node, status)


def response_head(
    event: h11.Response, up_hdrs: headers.Headers, extra: headers.Headers | None = None
) -> h11.Response:
    """The client's response head for the service's: hop-by-hop headers gone, Via added,
    ``extra`` (a version warning) appended."""
    out = headers.response_headers(up_hdrs)
    if extra:
        out += extra
    return h11.Response(
        status_code=event.status_code,
        headers=out,
        reason=event.reason,
        _parsed=True,  # parsed by h11 from the service's bytes; see request_head()
    )
