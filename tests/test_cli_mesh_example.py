"""examples/mesh, for real, as the README runs it: two repositories (shop-api, shop-web), one
committed file each. Ana runs shop-api and, of shop-web, only cart; Ben runs shop-web with
the override that takes cart from a teammate (`remote: true`). Ben's web calls api of
shop-api and cart, and both are answered by Ana's agent on the same machine (two agents,
each with its own DEVMESH_HOME, discovery on lo). `devmesh route`, `status` and the access
log on Ben's side say so.

The example's discovery port is swapped for a free one and each agent's peer channel port
comes from MESH_PORT (as in the README), so the test cannot collide with anything else
running here; the proxy ports come from the agents' environment (agentkit). Everything
else is the example as shipped.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from agentkit import Mesh, free_port
from netkit import free_udp_port

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "mesh"
OVERRIDE = "devmesh.override.yaml.example"


def copy_example(m: Mesh, who: str, udp: str) -> Path:
    """The example's two repositories in ``m``'s folder, discovery on ``udp``."""
    d = m.root / "mesh"
    shutil.copytree(EXAMPLE, d, ignore=shutil.ignore_patterns("__pycache__"))
    for repo in ("shop-api", "shop-web"):
        f = d / repo / "devmesh.yaml"
        text = f.read_text()
        assert "interfaces: [lo]" in text  # the example never leaves the machine
        assert "port: ${MESH_PORT:-7701}" in text
        f.write_text(re.sub(r"(\n    port:) 7702", rf"\1 {udp}", text))
    m.env["MESH_PORT"] = str(free_port())
    m.env["OWNER"] = who
    return d


def _route(m: Mesh, folder: Path, service: str) -> tuple[int, str]:
    r = m.cli("route", service, "--caller", "web", "-p", "shop-web", cwd=folder)
    return r.returncode, r.stdout


@pytest.mark.slow
def test_ben_s_web_calls_ana_s_shop_api_and_the_cart_he_takes_from_her() -> None:
    ana, ben = Mesh(), Mesh()
    try:
        ana.mesh_init("ana", mesh="demo")
        ben.mesh_join(ana, "ben")
        udp = str(free_udp_port())
        a, b = copy_example(ana, "ana", udp), copy_example(ben, "ben", udp)
        ana.cli("up", "-d", cwd=a / "shop-api", timeout=90, check=True)
        ana.cli("up", "-d", "cart", cwd=a / "shop-web", timeout=90, check=True)
        web = b / "shop-web"
        up = ben.cli("up", "-d", "-f", "devmesh.yaml", "-f", OVERRIDE, cwd=web, timeout=90)
        assert up.returncode == 0, up.stderr
        # The override keeps cart off Ben's machine; shop-api is not applied there at all.
        mine = ben.services("shop-web")
        assert mine["web"]["state"] == "running"
        assert (mine["cart"]["state"], mine["cart"]["pid"]) == ("remote", None), mine
        assert ana.services("shop-web")["cart"]["state"] == "running"
        assert "web" not in ana.services("shop-web")

        # Until Ben's agent holds Ana's catalog, api has nowhere to go (exit 1).
        ben.wait_for(lambda: _route(ben, web, "api")[0] == 0, timeout=30, what="a route to api")
        _, text = _route(ben, web, "api")
        assert text.splitlines()[0] == "web → shop-api/api: ana api 1.2.0 (^1.2 ok)", text
        ben.wait_for(lambda: _route(ben, web, "cart")[0] == 0, timeout=30, what="cart")
        assert _route(ben, web, "cart")[1].splitlines()[0] == "web → cart: ana cart 0.4.0 (^0.4 ok)"

        page = subprocess.run(
            ["curl", "-sS", "--max-time", "20", f"http://web.localhost:{ben.proxy_port}/"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
            env={k: v for k, v in os.environ.items() if "proxy" not in k.lower()},
        )
        doc = json.loads(page.stdout)
        assert doc["api"]["served_by"] == "api of ana", doc
        assert doc["cart"]["served_by"] == "cart of ana", doc
        assert doc["version_warning"] is None

        status = ben.cli("status", cwd=web, check=True).stdout.splitlines()
        assert "  web → shop-api/api  ana api 1.2.0  (^1.2 ok)" in status, status
        assert "  web → cart          ana cart 0.4.0  (^0.4 ok)" in status, status
        # The access log names the node that answered and the project of api.
        ben.wait_for(
            lambda: (
                "target=shop-api/api node ana"
                in ben.cli("logs", "--proxy", cwd=web, check=True).stdout
            ),
            what="'target=shop-api/api node ana' in Ben's access log",
        )
    finally:
        ana.close()
        ben.close()
