"""Health checks at the pace the user set, through a real agent and a service answering 503."""

from __future__ import annotations

from agentkit import PY, SERVER, Mesh

SICK = SERVER.replace("self.send_response(200)", "self.send_response(503)")


def test_failures_count_once_per_interval_not_per_fast_probe(mesh: Mesh) -> None:
    d = mesh.project(
        "pace",
        f"""
        version: 1
        services:
          api:
            version: 1.0.0
            command: {PY} server.py
            health: {{http: /healthz, interval_s: 2, retries: 3, start_period_s: 0}}
        """,
        {"server.py": SICK},
    )
    mesh.cli("up", "-d", "--wait-timeout", "0", cwd=d)
    # The agent probes a starting service fast (to notice readiness early): several probes
    # have run, each answered 503, and the service is still starting.
    api = mesh.wait_for(
        lambda: (s := mesh.services("pace").get("api")) and s["health_probes"] >= 4 and s,
        what="four health probes",
    )
    assert api["state"] == "starting", api
    assert api["health_failures"] < api["health_probes"]
    assert "answered 503" in api["reason"]
    # Only `retries` counted failures, one per interval, make it unhealthy.
    api = mesh.wait_for(
        lambda: (s := mesh.services("pace")["api"])["state"] == "unhealthy" and s,
        timeout=60,
        what="api unhealthy",
    )
    assert api["health_failures"] == 3
    assert api["health_probes"] > 3
    log = (mesh.home / "agent.log").read_text()
    counted = [line for line in log.splitlines() if "pace/api: health check failed" in line]
    assert [line.split("failed ")[1].split(")")[0] for line in counted] == [
        "(1 of 3 counted",
        "(2 of 3 counted",
        "(3 of 3 counted",
    ]
    assert sum(": unhealthy (" in line for line in log.splitlines()) == 1
