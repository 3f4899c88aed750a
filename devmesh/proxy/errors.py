"""The proxy's errors: each one names a condition a developer can act on.

Why one base with a status: every failure on the way to an upstream ends as an HTTP answer
to the client, translated at one place (``forward.Forwarder.fail``). The status hint lives on
the class, the message (service, address, timeout) is built in ``__init__``, so the page, the
access log and the tests all see the same words.
"""

from __future__ import annotations


class ProxyError(Exception):
    """Base of the proxy's errors; ``status`` is the HTTP answer the client gets."""

    status: int = 502

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ServiceNotRunningError(ProxyError):
    """The route table says the service is stopped, restarting or crash-looping: no connect
    attempted. ``state`` is the state in words (``table.state_words``)."""

    status = 502

    def __init__(self, service: str, project: str, state: str, reason: str | None) -> None:
        detail = f": {reason}" if reason else ""
        super().__init__(f"service {service!r} of project {project!r} is {state}{detail}")


class NoRouteError(ProxyError):
    """An edge listener whose target service is not in the caller's project (any more)."""

    status = 502

    def __init__(self, target: str, project: str, caller: str) -> None:
        super().__init__(
            f"service {target!r} is not running in project {project!r} (called by {caller!r})"
        )


class BadRequestError(ProxyError):
    """The client's bytes are not an HTTP/1.1 request (h11 said where), or its head is too
    large. The message names the line and the byte at fault in plain words."""

    status = 400

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


class UpstreamConnectError(ProxyError):
    """Connecting to the service's port failed (refused, unreachable, TLS handshake)."""

    status = 502

    def __init__(self, service: str, host: str, port: int, reason: str, state: str) -> None:
        hint = " (the service is still starting)" if state == "starting" else ""
        super().__init__(f"service {service!r} is not reachable: {reason} on {host}:{port}{hint}")


class UpstreamTimeoutError(ProxyError):
    """The service accepted nothing, or said nothing, within the configured timeout."""

    status = 504

    def __init__(self, service: str, host: str, port: int, phase: str, timeout_s: float) -> None:
        super().__init__(
            f"service {service!r} on {host}:{port} timed out: no {phase} within {timeout_s:g} s"
        )
        self.phase = phase
        """``connection`` (nothing was sent: another target may be tried) or ``response``."""


class UpstreamProtocolError(ProxyError):
    """The service answered something that is not HTTP/1.1, or closed mid-answer."""

    status = 502

    def __init__(self, service: str, host: str, port: int, reason: str) -> None:
        super().__init__(f"service {service!r} on {host}:{port} sent a bad response: {reason}")


class UpstreamClosedEarlyError(UpstreamProtocolError):
    """The service closed the connection after the request went out, before a byte of its
    answer: an idempotent request may be tried once on another target."""


class PeerUnavailableError(ProxyError):
    """A peer answered ``x-devmesh-unavailable: 1``: it forwarded nothing, so the call moves
    on as after a failed connection."""

    status = 502

    def __init__(self, node: str, status: int) -> None:
        super().__init__(f"peer {node} has no instance to serve it (answered {status})")


class NotRetriedError(ProxyError):
    """A failure after which a routed request would have gone to its next target, but its
    body had left and is not held whole (over the bound the proxy keeps a copy within)."""

    def __init__(self, cause: ProxyError, reason: str) -> None:
        super().__init__(f"{cause.message}; not tried elsewhere: {reason}")
        self.status = cause.status


class AllTargetsFailedError(ProxyError):
    """Every target of a routed call failed; the message names each and why."""

    status = 502

    def __init__(self, service: str, tried: list[str]) -> None:
        super().__init__(f"no target of {service!r} could answer: tried " + "; ".join(tried))


class BodyTooLargeError(ProxyError):
    status = 413

    def __init__(self, limit: int) -> None:
        super().__init__(f"request body exceeds the proxy's limit of {limit} bytes")


class BadUpgradeError(ProxyError):
    """A WebSocket handshake that wsproto's rules reject, from either side."""

    status = 400

    def __init__(self, side: str, reason: str) -> None:
        super().__init__(f"invalid WebSocket handshake from the {side}: {reason}")
        if side == "service":
            self.status = 502


class CAError(ProxyError):
    """The local CA's files are unusable (unreadable, wrong permissions, corrupt)."""

    status = 500

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason
