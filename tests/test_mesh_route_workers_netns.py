"""Proxy worker processes route across machines as the agent's own proxy does: alpha's agent
runs two workers sharing its proxy port (they read the routes file, which carries the mesh
routes and the paths of the node's peer-channel files), beta shares ``api``.

Each call opens a new connection, so the kernel spreads them over the agent and its workers;
a worker that did not know the mesh would answer them as an unknown service.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from agentkit import PY, ROUTE_SERVICE, Machines
from netkit import NETNS, NsHTTP

pytestmark = [
    pytest.mark.slow,
    NETNS,
]

ALPHA, BETA = 0, 1
MESH = (
    "version: 1\nproject: shop\n"
    "mesh:\n  name: team\n  discovery:\n    interval_s: 0.3\n    interfaces: [eth0]\n"
)
CALLS = 30


@pytest.fixture
def machines() -> Iterator[Machines]:
    m = Machines(["alpha", "beta"], proxy_workers=2)
    try:
        yield m
    finally:
        m.close()


def test_worker_processes_route_calls_to_a_peer(machines: Machines) -> None:
    beta_yaml = MESH + (
        f"services:\n  api:\n    version: 2.3.0\n    command: {PY} svc.py\n    share: true\n"
        "    env: {NODE: beta}\n"
    )
    machines.up(BETA, "shop", beta_yaml, {"svc.py": ROUTE_SERVICE})
    machines.up(ALPHA, "shop", MESH + "services:\n  api: {}\n", {})
    alpha = machines.agents[ALPHA]
    port = alpha.proxy_port
    host = {"Host": f"api.localhost:{port}"}

    streak = [0]

    def routed_by_all() -> bool:
        # Workers poll the routes file (every quarter second), so each process learns the
        # mesh route on its own: wait until ten new connections in a row were served, which
        # a process that never learns it would not allow (the kernel spreads connections).
        with NsHTTP(machines.net.hosts[ALPHA], "127.0.0.1", port) as c:
            ok = c.request("GET", "/", headers=host).status == 200
        streak[0] = streak[0] + 1 if ok else 0
        return streak[0] >= 10

    alpha.wait_for(routed_by_all, what="api routed to beta by alpha's proxy and its workers")
    # the routes file the workers read carries the mesh (their routing is only visible there)
    routes = json.loads((alpha.home / "proxy-routes.json").read_text())
    assert "beta" in json.dumps(routes.get("mesh")) and routes.get("peer_tls"), routes.keys()
    nodes = []
    for _ in range(CALLS):
        with NsHTTP(machines.net.hosts[ALPHA], "127.0.0.1", port) as c:
            status, doc = c.get_json("/w", host)
        assert status == 200, doc
        nodes.append(doc["node"])
    assert nodes == ["beta"] * CALLS
