"""What the dashboard needs from the agent, as an interface: the driver imports no agent code.

Why a Protocol: the dashboard is a driver (DESIGN.md); it serves pages and a feed, and the
agent (``agent.dashboardhost``) hands it the one place its facts come from, the same
snapshot `status` reads. Nothing here knows what a service or a peer is beyond the JSON.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol


class ActionError(Exception):
    """An action the agent refuses (unknown service, stopping already): status and words."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Source(Protocol):
    def state(self) -> dict[str, Any]:
        """The page's whole document now (services, peers, graph, ...), JSON-able.

        Called once per tick while a page is connected, and compared with the last one
        sent: it must hold no value that changes by itself (an uptime), only timestamps.
        """
        ...

    async def tick(self) -> None:
        """Return when the state may have changed: the end of an engine round, or at most
        a quarter second later (peers and routes change between rounds)."""
        ...

    async def restart(self, project: str, service: str) -> dict[str, Any]:
        """Restart a service; answers when its new process runs. Raises ActionError."""
        ...

    def service_log(self, project: str, service: str, tail: int) -> AsyncIterator[dict[str, Any]]:
        """The last ``tail`` lines of a service's log, then new ones as they come:
        ``{"line", "time"}``. Raises ActionError when there is no such service."""
        ...

    def access_log(self, tail: int) -> AsyncIterator[dict[str, Any]]:
        """The proxy's access log entries (the JSON fields, plus ``service`` when known),
        the last ``tail`` first, then new ones as they come."""
        ...
