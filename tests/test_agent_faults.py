"""Bad input and faults around `up`: a message naming the problem, nothing half-applied."""

from __future__ import annotations

import socket
import subprocess

from agentkit import PY, SERVER, Mesh, alive


def test_port_in_use_names_the_port_and_process_and_applies_nothing(mesh: Mesh) -> None:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        d = mesh.project(
            "busy",
            f"""
            version: 1
            services:
              ok: {{version: 1.0.0, command: {PY} server.py}}
              api: {{version: 1.0.0, command: {PY} server.py, port: {port}}}
            """,
            {"server.py": SERVER},
        )
        r = mesh.cli("up", "-d", cwd=d)
        assert r.returncode == 1
        assert "nothing was applied" in r.stderr
        assert f"service api: port {port} is already in use by pid " in r.stderr
        assert "(python" in r.stderr  # the holder is this test's python process
        assert mesh.status()["services"] == []
    finally:
        holder.close()


def test_command_not_found_applies_nothing(mesh: Mesh) -> None:
    d = mesh.project(
        "nf",
        """
        version: 1
        services:
          api: {version: 1.0.0, command: no-such-binary-xyz --serve}
        """,
    )
    r = mesh.cli("up", "-d", cwd=d)
    assert r.returncode == 1
    assert "service api: cannot start 'no-such-binary-xyz': not found on PATH (PATH=" in r.stderr
    assert mesh.status()["services"] == []


def test_missing_working_folder_applies_nothing(mesh: Mesh) -> None:
    d = mesh.project(
        "cwd",
        f"""
        version: 1
        services:
          api: {{version: 1.0.0, command: {PY} x.py, cwd: ./nowhere}}
        """,
    )
    r = mesh.cli("up", "-d", cwd=d)
    assert r.returncode == 1
    assert f"service api: working folder {d / 'nowhere'} does not exist" in r.stderr


def test_invalid_config_prints_validate_messages_and_applies_nothing(mesh: Mesh) -> None:
    d = mesh.project(
        "bad",
        """
        version: 1
        services:
          api:
            version: 1.0.0
            command: run
            prot: 8000
        """,
    )
    r = mesh.cli("up", "-d", cwd=d)
    assert r.returncode == 1
    assert "devmesh.yaml:7:5: services.api.prot:" in r.stderr
    assert "did you mean 'port'?" in r.stderr
    assert not (mesh.home / "agent.sock").exists(), "an invalid file does not even start the agent"


def test_unknown_service_argument(mesh: Mesh) -> None:
    d = mesh.project(
        "arg",
        f"""
        version: 1
        services:
          api: {{version: 1.0.0, command: {PY} server.py}}
        """,
        {"server.py": SERVER},
    )
    r = mesh.cli("up", "-d", "apii", cwd=d)
    assert r.returncode == 1
    assert "no such service 'apii' in project arg (services: api); nothing was applied" in r.stderr


def test_health_never_passing_says_which_check_failed(mesh: Mesh) -> None:
    d = mesh.project(
        "sick",
        f"""
        version: 1
        services:
          api:
            version: 1.0.0
            command: {PY} server.py
            health: {{http: /healthz, interval_s: 0.1, retries: 2, start_period_s: 0}}
          web:
            version: 1.0.0
            command: {PY} server.py
            depends_on: {{api: {{condition: healthy}}}}
        """,
        {"server.py": SERVER.replace("self.send_response(200)", "self.send_response(503)")},
    )
    r = mesh.cli("up", "-d", cwd=d)
    assert r.returncode == 1
    assert "x api: unhealthy: GET /healthz on 127.0.0.1:" in r.stderr
    assert "x web: not started: dependency api failed" in r.stderr
    # The check's last answer is the reason: 503 once the server listens (on a loaded
    # machine it may not listen yet when the retries run out: then "connection refused").
    api = mesh.wait_for(
        lambda: (
            (s := mesh.services()["api"]) and (s["reason"] or "").endswith("answered 503") and s
        ),
        what="api's reason: its check answered 503",
    )
    assert api["state"] == "unhealthy"
    assert mesh.services()["web"]["state"] == "waiting"


def test_wait_timeout_ends_a_wait_that_would_never_end(mesh: Mesh) -> None:
    d = mesh.project(
        "slow",
        f"""
        version: 1
        services:
          api:
            version: 1.0.0
            command: [{PY}, -c, "import time; time.sleep(600)"]
            health: {{http: /x, start_period_s: 600}}
        """,
    )
    r = mesh.cli("up", "-d", "--wait-timeout", "2", cwd=d)
    assert r.returncode == 1
    assert "still not ready after 2 s" in r.stderr


def test_status_and_down_when_no_agent_runs(mesh: Mesh) -> None:
    r = mesh.cli("status")
    assert r.returncode == 0
    assert f"The devmesh agent is not running (no answer on {mesh.home}/agent.sock)." in r.stdout
    r = mesh.cli("down", "-p", "shop")
    assert r.returncode == 0
    assert "The devmesh agent is not running: nothing to stop for shop." in r.stderr
    r = mesh.cli("logs", "-p", "shop")
    assert r.returncode == 3
    assert f"cannot reach the devmesh agent at {mesh.home}/agent.sock" in r.stderr


def test_stale_socket_and_pid_file_are_replaced(mesh: Mesh) -> None:
    mesh.home.mkdir(mode=0o700)
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(mesh.home / "agent.sock"))
    dead.close()  # the file stays, nobody answers: what a kill -9 leaves behind
    (mesh.home / "agent.pid").write_text("999999\n")
    d = mesh.project(
        "stale",
        f"""
        version: 1
        services:
          api: {{version: 1.0.0, command: {PY} server.py}}
        """,
        {"server.py": SERVER},
    )
    r = mesh.cli("up", "-d", cwd=d)
    assert r.returncode == 0, r.stderr
    assert "Started the devmesh agent" in r.stderr
    assert mesh.agent_pid() != 999999


def test_second_agent_on_one_home_is_refused(mesh: Mesh) -> None:
    mesh.start_agent()
    r = mesh.cli("agent", timeout=20)
    assert r.returncode == 1
    assert (
        f"another devmesh agent (pid {mesh.agent_pid()}) already runs for {mesh.home}" in r.stderr
    )


def test_two_ups_at_once_on_one_project_serialise(mesh: Mesh) -> None:
    d = mesh.project(
        "race",
        f"""
        version: 1
        services:
          api:
            version: 1.0.0
            command: {PY} server.py
            env: {{DELAY: "1.5"}}
            health: {{http: /, interval_s: 0.1}}
        """,
        {"server.py": SERVER},
    )
    mesh.start_agent()
    first = subprocess.Popen(
        [PY, "-m", "devmesh", "up", "-d"], cwd=d, env=mesh.env, stderr=subprocess.PIPE, text=True
    )
    try:
        # The first `up` prints its actions once it holds the lock and has applied; it then
        # waits (DELAY) for readiness, still holding the lock.
        assert first.stderr is not None
        for line in first.stderr:
            if "api: start" in line:
                break
        second = mesh.cli("up", "-d", cwd=d)
        assert first.wait(30) == 0
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
        first.stderr.close()
    assert second.returncode == 0
    assert "is changing project race; waiting for it to finish..." in second.stderr
    assert "everything is up to date" in second.stderr
    pids = [s["pid"] for s in mesh.status()["services"]]
    assert len(pids) == 1 and alive(pids[0])


def test_unreadable_state_file_is_kept_aside(mesh: Mesh) -> None:
    mesh.home.mkdir(mode=0o700)
    (mesh.home / "state.json").write_text("{not json")
    mesh.start_agent()
    kept = list(mesh.home.glob("state.json.unreadable-*"))
    assert len(kept) == 1 and kept[0].read_text() == "{not json"
    log = (mesh.root / "agent-fg.log").read_text()
    assert "unreadable state" in log and str(kept[0]) in log


def test_adhoc_run_usage_errors_exit_2_before_anything_starts(mesh: Mesh) -> None:
    r = mesh.cli("run", "--", PY, "-V")
    assert r.returncode == 2
    assert "usage: devmesh run NAME [--port P] [--version V] -- CMD [ARGS...]" in r.stderr
    r = mesh.cli("run", "echo", "--port", "http", "--", PY, "-V")
    assert r.returncode == 2
    assert "--port: expected a port number, got 'http'" in r.stderr
    assert not (mesh.home / "agent.sock").exists()
