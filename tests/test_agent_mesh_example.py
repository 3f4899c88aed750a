"""examples/mesh, for real: two agents on one machine (discovery on lo) see each other's
shared services. Ana runs the shop-api repository, Ben the shop-web one with its committed
file alone (he runs cart himself and shares it). The discovery port is swapped for a free
one and the peer channel port comes from MESH_PORT, as in the README, so the test cannot
collide with anything else running here; everything else is the example as shipped."""

from __future__ import annotations

import pytest
from agentkit import Mesh
from netkit import free_udp_port
from test_cli_mesh_example import copy_example


@pytest.mark.slow
def test_the_mesh_example_shows_each_agent_the_others_service() -> None:
    ana, ben = Mesh(), Mesh()
    try:
        ana.mesh_init("ana", mesh="demo")
        ben.mesh_join(ana, "ben")
        udp = str(free_udp_port())
        a, b = copy_example(ana, "ana", udp), copy_example(ben, "ben", udp)
        ana.cli("up", "-d", cwd=a / "shop-api", timeout=90, check=True)
        ben.cli("up", "-d", cwd=b / "shop-web", timeout=90, check=True)

        def shared(m: Mesh, peer: str) -> list[tuple[str, str]]:
            rows = [p for p in m.status()["peers"] if p["name"] == peer and p["state"] == "alive"]
            return [(s["project"], s["name"]) for p in rows for s in p["services"]]

        got = ben.wait_for(lambda: shared(ben, "ana"), what="ana's api on ben")
        assert got == [("shop-api", "api")]
        got = ana.wait_for(lambda: shared(ana, "ben"), what="ben's cart on ana")
        assert got == [("shop-web", "cart")]
        assert "SHARED BY PEERS" in ben.cli("status", check=True).stdout
        # Ben runs cart himself (no override): web's calls to it stay on his machine.
        route = next(r for r in ben.status()["routes"] if r["service"] == "cart")
        assert (route["target"], route["target_project"]) == ("local", "shop-web")
    finally:
        ana.close()
        ben.close()
