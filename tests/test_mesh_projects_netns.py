"""Two repositories, two projects, across machines: network-namespace "machines" of one team.

    alpha  shop-api (api 2.3.0, shared) and shop-web (web, whose ``api`` names
           ``project: shop-api``), each applied from its own folder
    beta   shop-web only, the same committed file

Alpha's web calls the api of shop-api on alpha (local, across projects); beta's web calls
alpha's shop-api/api over the peer channel. Requests are made from inside each namespace by
the callers themselves (``/call``), with discovery on each machine's ``eth0``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from agentkit import PY, ROUTE_SERVICE, Machines
from netkit import NETNS, NsHTTP, wait_for

pytestmark = [
    pytest.mark.slow,
    NETNS,
]

ALPHA, BETA = 0, 1
NAMES = ["alpha", "beta"]
MESH = (
    "mesh:\n  name: team\n  port: 7701\n  discovery:\n    interval_s: 0.3\n    interfaces: [eth0]\n"
)


def shop_api(count: Path) -> str:
    return (
        f"version: 1\nproject: shop-api\n{MESH}services:\n"
        f"  api:\n    version: 2.3.0\n    command: {PY} svc.py\n    share: true\n"
        "    health: {http: /healthz, interval_s: 0.5}\n"
        f"    env: {{NODE: alpha, COUNT_DIR: '{count}'}}\n"
    )


def shop_web(count: Path) -> str:
    """One committed file for both machines."""
    return (
        f"version: 1\nproject: shop-web\n{MESH}services:\n"
        f"  web:\n    version: 1.0.0\n    command: {PY} svc.py\n"
        f"    env: {{COUNT_DIR: '{count}'}}\n"
        "    depends_on:\n      api: ^2\n"
        "  api:\n    project: shop-api\n"
    )


class World:
    def __init__(self, machines: Machines, count: Path) -> None:
        self.m = machines
        self.count = count

    def call(self, i: int, path: str) -> dict[str, Any]:
        """What web on machine i got when it called its API_URL + path."""
        port = self.m.agents[i].services("shop-web")["web"]["port"]
        with NsHTTP(self.m.net.hosts[i], "127.0.0.1", int(port)) as c:
            status, doc = c.get_json(f"/call?dep=API&path={path}")
        assert status == 200, doc
        return doc

    def route(self, i: int) -> dict[str, Any]:
        rows = self.m.agents[i].status("shop-web")["routes"]
        return next(r for r in rows if (r["caller"], r["service"]) == ("web", "api"))

    def served(self) -> int:
        try:
            return len((self.count / "api-alpha.log").read_text().splitlines())
        except FileNotFoundError:
            return 0


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    count = tmp_path_factory.mktemp("counts")
    count.chmod(0o777)
    machines = Machines(NAMES)
    try:
        files = {"svc.py": ROUTE_SERVICE}
        machines.up(ALPHA, "shop-api", shop_api(count), files)
        machines.up(ALPHA, "shop-web", shop_web(count), files)
        machines.up(BETA, "shop-web", shop_web(count), files)
        w = World(machines, count)
        wait_for(
            "alpha's shop-api/api in beta's route",
            lambda: w.route(BETA)["target"] == "peer",
            timeout_s=60,
        )
        yield w
    finally:
        machines.close()


def test_alpha_web_calls_shop_api_on_alpha_across_projects(world: World) -> None:
    before = world.served()
    got = world.call(ALPHA, "/from-alpha")
    assert got["status"] == 200, got
    assert got["body"]["service"] == "api" and got["body"]["node"] == "alpha"
    assert world.served() == before + 1
    r = world.route(ALPHA)
    assert (r["project"], r["target_project"], r["target"], r["node"]) == (
        "shop-web",
        "shop-api",
        "local",
        "alpha",
    )
    log = wait_for(
        "alpha's access log entry",
        lambda: [e for e in world.m.agents[ALPHA].access_entries() if e["path"] == "/from-alpha"],
    )
    assert (log[-1]["route"], log[-1]["target"], log[-1]["caller"]) == (
        "local",
        "shop-api/api",
        "web.shop-web",
    )


def test_beta_web_calls_alphas_shop_api_over_the_peer_channel(world: World) -> None:
    before = world.served()
    got = world.call(BETA, "/from-beta")
    assert got["status"] == 200, got
    assert got["body"]["node"] == "alpha" and got["body"]["path"] == "/from-beta"
    assert "x-devmesh-service" not in got["body"]["headers"]
    assert world.served() == before + 1
    r = world.route(BETA)
    assert (r["target_project"], r["target"], r["node"], r["version"]) == (
        "shop-api",
        "peer",
        "alpha",
        "2.3.0",
    )
    beta = world.m.agents[BETA]
    log = wait_for(
        "beta's access log entry",
        lambda: [e for e in beta.access_entries() if e["path"] == "/from-beta"],
    )
    assert (log[-1]["route"], log[-1]["node"], log[-1]["target"]) == (
        "peer",
        "alpha",
        "shop-api/api",
    )
    text = beta.cli("status", "-p", "shop-web", check=True).stdout
    assert "web → shop-api/api  alpha api 2.3.0  (^2 ok)" in text, text
    # On alpha, the hop was served by shop-api's api, for peer beta.
    served = wait_for(
        "alpha's entry for beta's call",
        lambda: [e for e in world.m.agents[ALPHA].access_entries() if e["path"] == "/from-beta"],
    )
    assert served[-1]["caller"] == "peer beta" and served[-1]["status"] == 200
