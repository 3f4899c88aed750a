"""The README's demo, for real: examples/quickstart comes up, answers through the proxy, goes down."""

from __future__ import annotations

import subprocess
from pathlib import Path

from agentkit import Mesh

QUICKSTART = Path(__file__).resolve().parents[1] / "examples" / "quickstart"


def test_quickstart_up_answers_through_the_proxy_and_down_cleans_up(mesh: Mesh) -> None:
    r = mesh.cli("up", "-d", "-f", str(QUICKSTART / "devmesh.yaml"), check=True)
    assert "Project quickstart: 2 service(s) ready" in r.stderr
    page = subprocess.run(
        ["curl", "-sS", "--max-time", "10", f"http://web.localhost:{mesh.proxy_port}/"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "<li>espresso</li><li>flat white</li>" in page
    rows = mesh.services("quickstart")
    assert rows["api"]["version"] == "1.2.0" and rows["web"]["health"] == "healthy"
    mesh.cli("down", "-f", str(QUICKSTART / "devmesh.yaml"), check=True)
    assert mesh.leftovers() == [mesh.agent_pid()]
