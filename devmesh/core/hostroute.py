"""Host header matching for the local proxy: which service a request names.

Why it is pure: the proxy calls this on every request and the rules have corner cases (ports,
IPv6 literals, trailing dots, upper case, reserved names) that are cheaper to pin down with
unit tests over strings than through sockets. It knows nothing of what is running; the proxy's
route table turns a ``HostMatch`` into a backend.

The rules:

- ``NAME.localhost`` names service NAME in whichever project the route table prefers.
- ``NAME.PROJECT.localhost`` names service NAME of project PROJECT.
- ``devmesh.localhost`` is reserved for the agent's own pages.
- Any port is accepted and ignored: the listener already decided HTTP or HTTPS.
- Anything else (IP literals, other domains, deeper names) matches nothing.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

RESERVED_NAME = "devmesh"
SUFFIX = "localhost"


class HostKind(enum.Enum):
    SERVICE = "service"
    RESERVED = "reserved"
    NONE = "none"


@dataclass(frozen=True, slots=True, kw_only=True)
class HostMatch:
    kind: HostKind
    service: str | None = None
    """Service name for SERVICE matches."""
    project: str | None = None
    """Project name when the host named one (NAME.PROJECT.localhost), else None."""


NO_MATCH = HostMatch(kind=HostKind.NONE)
RESERVED = HostMatch(kind=HostKind.RESERVED)


def hostname(host_header: str) -> str:
    """Strip the port and a trailing dot, lower-case; keep IPv6 literals bracket-free.

    Why not urllib: it raises on some malformed ports, and a proxy must classify every byte
    string a client can send without raising.
    """
    host = host_header.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        return host[1:end] if end > 0 else host
    if host.count(":") == 1:
        host = host.split(":", 1)[0]
    return host.rstrip(".")


def match(host_header: str) -> HostMatch:
    """Classify a Host header value. Never raises."""
    labels = hostname(host_header).split(".")
    if len(labels) < 2 or labels[-1] != SUFFIX or not all(labels):
        return NO_MATCH
    if len(labels) == 2:
        if labels[0] == RESERVED_NAME:
            return RESERVED
        return HostMatch(kind=HostKind.SERVICE, service=labels[0])
    if len(labels) == 3:
        return HostMatch(kind=HostKind.SERVICE, service=labels[0], project=labels[1])
    return NO_MATCH


def service_url(service: str, project: str | None, *, scheme: str, port: int) -> str:
    """The URL a browser uses for a service; the project-qualified form when project is set."""
    name = f"{service}.{project}.{SUFFIX}" if project else f"{service}.{SUFFIX}"
    default = 80 if scheme == "http" else 443
    return f"{scheme}://{name}" + ("" if port == default else f":{port}")
