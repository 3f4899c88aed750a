"""Ordinary use leaves no traceback in the agent's log."""

from __future__ import annotations

from agentkit import PY, SERVER, Mesh


def test_up_d_status_logs_and_down_log_no_traceback(mesh: Mesh) -> None:
    d = mesh.project(
        "quiet",
        f"""
        version: 1
        services:
          api: {{version: 1.0.0, command: {PY} server.py}}
          web: {{version: 1.0.0, command: {PY} server.py, depends_on: [api]}}
        """,
        {"server.py": SERVER},
    )
    # Each `up -d` ends a streamed answer (the readiness wait) while the agent still watches
    # the connection for a hang-up: that is where a traceback used to be logged.
    for _ in range(4):
        mesh.cli("up", "-d", cwd=d, check=True)
        mesh.cli("status", check=True)
        mesh.cli("logs", cwd=d, check=True)
    mesh.cli("down", cwd=d, check=True)
    log = (mesh.home / "agent.log").read_text()
    assert "quiet/api: started pid" in log
    assert "Traceback" not in log, log
    assert "InvalidStateError" not in log
