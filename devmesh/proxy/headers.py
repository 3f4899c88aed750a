"""Header rewriting between client and service: hop-by-hop removal and forwarding headers.

Why a module of its own: these rules run twice per request on the hot path and are where
proxies quietly get HTTP wrong (a stale ``Connection`` token, a dropped ``Transfer-Encoding``
that h11 needs to frame a request body, an IPv6 ``Forwarded`` value left unquoted). They are
pure functions over h11's header lists, tested without sockets.

h11 gives header names lower-cased as bytes; these functions keep that form.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

Headers = list[tuple[bytes, bytes]]

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authenticate",
        b"proxy-authorization",
    }
)
# Cleared by h11 or by us: forwarding them would contradict the connection we actually run.
VIA = b"1.1 devmesh"


def _connection_tokens(headers: Iterable[tuple[bytes, bytes]]) -> set[bytes]:
    tokens: set[bytes] = set()
    for name, value in headers:
        if name == b"connection":
            tokens.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return tokens


def strip_hop_by_hop(headers: Iterable[tuple[bytes, bytes]]) -> Headers:
    """Drop RFC 9110 hop-by-hop fields and any field named in ``Connection``."""
    headers = headers if type(headers) is list else list(headers)
    drop = HOP_BY_HOP
    if any(name == b"connection" for name, _ in headers):
        drop = HOP_BY_HOP | _connection_tokens(headers)
    return [(n, v) for n, v in headers if n not in drop]


def is_chunked(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    return any(n == b"transfer-encoding" and b"chunked" in v.lower() for n, v in headers)


def get(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for n, v in headers:
        if n == name:
            return v
    return None


def wants_upgrade(headers: Iterable[tuple[bytes, bytes]]) -> bytes | None:
    """The protocol asked for in ``Upgrade`` when ``Connection`` lists upgrade, else None."""
    headers = headers if type(headers) is list else list(headers)
    if b"upgrade" not in _connection_tokens(headers):
        return None
    value = get(headers, b"upgrade")
    return value.strip().lower() if value else None


def _forwarded_node(ip: str) -> str:
    return f'"[{ip}]"' if ":" in ip else ip


def _quote(value: str) -> str:
    safe = all(c.isalnum() or c in "!#$%&'*+-.^_`|~" for c in value)
    return value if safe and value else '"' + value.replace('"', r"\"") + '"'


@functools.lru_cache(maxsize=1024)
def _forwarded_pair(client_ip: str, host: bytes, proto: str) -> tuple[bytes, bytes]:
    """(client ip, Forwarded node) for one client and host: the same few pairs recur on every
    request of a keep-alive connection, and quoting them is a per-character loop."""
    node = f"for={_forwarded_node(client_ip)};host={_quote(host.decode('latin-1'))};proto={proto}"
    return client_ip.encode(), node.encode()


_REPLACED = frozenset(
    {b"x-forwarded-for", b"forwarded", b"via", b"x-forwarded-proto", b"x-forwarded-host"}
)


def request_headers(
    headers: Iterable[tuple[bytes, bytes]], *, client_ip: str, proto: str, host: bytes
) -> Headers:
    """Headers for the upstream request: hop-by-hop gone, forwarding headers set.

    ``Transfer-Encoding: chunked`` is put back when the client used it, because h11 frames a
    request body only from what the headers say. ``X-Forwarded-For``, ``Forwarded`` and ``Via``
    are appended to (a chain of proxies keeps its history); ``-Proto`` and ``-Host`` are set.
    One pass over the headers to find what to drop, one to copy: this runs on every request.
    """
    headers = headers if type(headers) is list else list(headers)
    drop = HOP_BY_HOP
    chunked = False
    for name, value in headers:
        if name == b"connection":
            drop = drop | _connection_tokens(((name, value),))
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
    xff = fwd = via = b""
    kept: Headers = []
    for item in headers:
        name = item[0]
        if name in drop:
            continue
        if name in _REPLACED:
            if name == b"x-forwarded-for":
                xff = item[1]
            elif name == b"forwarded":
                fwd = item[1]
            elif name == b"via":
                via = item[1]
            continue
        kept.append(item)
    ip, node = _forwarded_pair(client_ip, host, proto)
    kept.append((b"x-forwarded-for", xff + b", " + ip if xff else ip))
    kept.append((b"x-forwarded-proto", proto.encode()))
    kept.append((b"x-forwarded-host", host))
    kept.append((b"forwarded", fwd + b", " + node if fwd else node))
    kept.append((b"via", via + b", " + VIA if via else VIA))
    if chunked:
        kept.append((b"transfer-encoding", b"chunked"))
    return kept


def response_headers(headers: Iterable[tuple[bytes, bytes]]) -> Headers:
    """Headers for the client's response: hop-by-hop gone, ``Via`` appended.

    Framing is left to h11: with no Content-Length it chunks for HTTP/1.1 clients and
    closes the connection after the body for HTTP/1.0 ones.
    """
    out = strip_hop_by_hop(headers)
    for i, (name, value) in enumerate(out):
        if name == b"via":
            out[i] = (name, value + b", " + VIA)
            return out
    out.append((b"via", VIA))
    return out
