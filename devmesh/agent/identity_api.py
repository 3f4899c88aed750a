"""The control API of the team identity: how a running agent hears of `mesh init|join`.

Why so little: `devmesh mesh init|join|export|show` work on ``DEVMESH_HOME/mesh`` directly
(``devmesh.mesh.membership``), with no agent, so that joining a team never starts one on
the default proxy ports. When an agent runs, the command then tells it here, and the agent's
mesh follows the identity now on disk (``MeshHost.reload_identity``): a node that waited
for an identity ("mesh off") starts, a running node whose team or name changed says goodbye
and starts again with the new one, and an unchanged identity (a rejoin of the same team)
leaves it alone. The HTTPS proxy notices a new team CA by itself at its next handshake.

Endpoint (JSON):
  POST /v1/mesh/reload   -> {"started": bool, "restarted": bool, "error": str | None}

The secret is never logged: log lines name the mesh, the node and the CA fingerprint only.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from devmesh.agent.http_server import Request, Response, Router

OnChange = Callable[[], Awaitable[dict[str, Any]]]


def register(router: Router, on_change: OnChange) -> None:
    """Add the reload endpoint; ``on_change`` is the agent's ``MeshHost.reload_identity``."""

    @router.route("POST", "/v1/mesh/reload")
    async def reload(req: Request) -> Response:
        return Response(200, await on_change())
