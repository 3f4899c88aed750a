"""examples/mesh, for real: two agents on one machine (discovery on lo) see each other's
shared services. The example's fixed ports are swapped for free ones so the test cannot
collide with anything else running here; everything else is the example as shipped."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from agentkit import Mesh, free_port
from netkit import free_udp_port

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "mesh"


@pytest.mark.slow
def test_the_mesh_example_shows_each_agent_the_others_service() -> None:
    ana, ben = Mesh(), Mesh()
    try:
        ana.mesh_init("ana", mesh="demo")
        ben.mesh_join(ana, "ben")
        udp = str(free_udp_port())
        for m, who in ((ana, "ana"), (ben, "ben")):
            d = m.root / who
            shutil.copytree(EXAMPLE / who, d)
            text = (d / "devmesh.yaml").read_text()
            assert "interfaces: [lo]" in text  # the example never leaves the machine
            text = re.sub(r"(\n  port:) \d+", rf"\1 {free_port()}", text)  # peer channel
            text = re.sub(r"(\n    port:) 7702", rf"\1 {udp}", text)  # discovery
            text = re.sub(r"(\n  (https_)?port:) 78\d\d", rf"\1 {free_port()}", text)  # proxy
            (d / "devmesh.yaml").write_text(text)
            m.cli("up", "-d", cwd=d, timeout=90, check=True)

        def shared(m: Mesh, peer: str) -> list[str]:
            rows = [p for p in m.status()["peers"] if p["name"] == peer and p["state"] == "alive"]
            return [s["name"] for p in rows for s in p["services"]]

        assert ben.wait_for(lambda: shared(ben, "ana"), what="ana's api on ben") == ["api"]
        assert ana.wait_for(lambda: shared(ana, "ben"), what="ben's orders on ana") == ["orders"]
        assert "SHARED BY PEERS" in ben.cli("status", check=True).stdout
    finally:
        ana.close()
        ben.close()
