"""examples/mesh, for real: Ben's `web` calls `api` through its API_URL, and the call is
answered by Ana's agent on the same machine (two agents, each with its own DEVMESH_HOME,
discovery on lo). `devmesh route` and `devmesh status` on Ben's side say so.

The example's fixed ports are swapped for free ones so the test cannot collide with anything
else running here; the proxy ports come from the agents' environment (agentkit), which wins
over the file's `proxy:`. Everything else is the example as shipped.
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


def _copy(m: Mesh, who: str, udp: str) -> Path:
    d = m.root / who
    shutil.copytree(EXAMPLE / who, d)
    text = (d / "devmesh.yaml").read_text()
    assert "interfaces: [lo]" in text  # the example never leaves the machine
    text = re.sub(r"(\nmesh:\n  name: demo\n  port:) \d+", rf"\1 {free_port()}", text)
    text = re.sub(r"(\n    port:) 7702", rf"\1 {udp}", text)
    (d / "devmesh.yaml").write_text(text)
    return d


def _route(m: Mesh, folder: Path) -> tuple[int, dict[str, object]]:
    r = m.cli("route", "api", "--caller", "web", "--json", cwd=folder)
    return r.returncode, json.loads(r.stdout) if r.stdout else {}


@pytest.mark.slow
def test_ben_s_web_calls_ana_s_api_through_both_agents() -> None:
    ana, ben = Mesh(), Mesh()
    try:
        ana.mesh_init("ana", mesh="demo")
        ben.mesh_join(ana, "ben")
        udp = str(free_udp_port())
        ana_dir, ben_dir = _copy(ana, "ana", udp), _copy(ben, "ben", udp)
        ana.cli("up", "-d", cwd=ana_dir, timeout=90, check=True)
        ben.cli("up", "-d", cwd=ben_dir, timeout=90, check=True)

        # Until Ben's agent holds Ana's catalog, api has nowhere to go (exit 1).
        ben.wait_for(lambda: _route(ben, ben_dir)[0] == 0, timeout=30, what="a route to api")
        code, decision = _route(ben, ben_dir)
        assert (code, decision["target"], decision["node"], decision["version"]) == (
            0,
            "peer",
            "ana",
            "1.2.0",
        )
        text = ben.cli("route", "api", "--caller", "web", cwd=ben_dir, check=True).stdout
        assert text.splitlines()[0] == "web → api: ana api 1.2.0 (^1.2 ok)"

        web = subprocess.run(
            ["curl", "-sS", "--max-time", "20", f"http://web.localhost:{ben.proxy_port}/"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
            env={k: v for k, v in os.environ.items() if "proxy" not in k.lower()},
        )
        page = json.loads(web.stdout)
        assert page["api"]["served_by"] == "api of ana", page
        assert page["version_warning"] is None

        status = ben.cli("status", cwd=ben_dir, check=True).stdout
        assert "  web → api  ana api 1.2.0  (^1.2 ok)" in status.splitlines(), status
        # The access log names the node that answered (written once the answer is sent).
        ben.wait_for(
            lambda: "node ana" in ben.cli("logs", "--proxy", cwd=ben_dir, check=True).stdout,
            what="'node ana' in Ben's access log",
        )
    finally:
        ana.close()
        ben.close()
