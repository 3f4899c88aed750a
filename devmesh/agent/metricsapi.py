"""``GET /v1/metrics``: the proxy's per-route numbers over a period, for ``devmesh metrics``.

Query: ``since`` (``90s``, ``5m``, ``1h``, ``7d``; default ``1h``), ``service`` (``NAME`` or
``NAME.PROJECT``). Answers ``History.report``'s JSON (docs/cli.md, ``devmesh metrics
--json``); 400 naming the parameter when ``since`` is not a duration.
"""

from __future__ import annotations

from collections.abc import Callable

from devmesh.agent import metrics
from devmesh.agent.http_server import ApiError, Request, Response, Router
from devmesh.core import metrics as core

DEFAULT_SINCE = "1h"


def register(router: Router, history: Callable[[], metrics.History | None]) -> None:
    """Add the endpoint; ``history`` gives the agent's History (None with metrics off)."""

    @router.route("GET", "/v1/metrics")
    async def get_metrics(req: Request) -> Response:
        raw = req.query.get("since") or DEFAULT_SINCE
        try:
            since_s = core.parse_since(raw)
        except ValueError as exc:
            raise ApiError(400, f"since: {exc}") from None
        service = req.query.get("service") or None
        found = history()
        if found is None:
            return Response(200, metrics.disabled_report(since_s, service))
        return Response(200, found.report(since_s, service=service))
