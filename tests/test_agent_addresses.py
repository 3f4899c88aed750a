"""Who gets an address: services without a port, two projects with one service name, and
what a service that is being restarted is called. Real agent, real proxy, real curl."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from agentkit import PY, SERVER, Mesh


def curl(url: str, host: str | None = None) -> tuple[int, str]:
    args = ["curl", "-sS", "--max-time", "10", "-w", "\n%{http_code}", url]
    if host is not None:
        args += ["-H", f"Host: {host}"]
    r = subprocess.run(args, capture_output=True, text=True, check=False)
    body, _, code = r.stdout.rpartition("\n")
    return int(code or 0), body


# A worker: listens on nothing, records the environment it was given, runs until stopped.
WORKER = """
import json, os, time
with open("worker-env.tmp", "w") as f:
    json.dump({k: v for k, v in os.environ.items() if k == "PORT" or k.endswith("_URL")}, f)
os.replace("worker-env.tmp", "worker-env.json")
print("worker running", flush=True)
while True:
    time.sleep(60)
"""


def _worker_env(mesh: Mesh, d: Path) -> dict[str, str]:
    path = d / "worker-env.json"
    mesh.wait_for(path.exists, what="the worker's environment")
    return dict(json.loads(path.read_text()))


def test_a_worker_without_a_port_gets_no_port_url_edge_or_tcp_check(mesh: Mesh) -> None:
    d = mesh.project(
        "jobs",
        f"""
        version: 1
        services:
          worker:
            version: 1.0.0
            command: {PY} worker.py
            health: {{tcp: false}}
          api:
            version: 1.0.0
            command: {PY} server.py
            depends_on: [worker]
        """,
        {"server.py": SERVER, "worker.py": WORKER},
    )
    r = mesh.cli("up", "-d", cwd=d)
    assert r.returncode == 0, r.stderr
    rows = mesh.services("jobs")
    worker, api = rows["worker"], rows["api"]
    assert worker["state"] == "running"
    assert (worker["port"], worker["url"], worker["address"]) == (None, None, None)
    assert worker["health"] == "none"  # no TCP check on a port it does not have
    assert api["url"] == f"http://api.localhost:{mesh.proxy_port}"
    env = _worker_env(mesh, d)
    assert "PORT" not in env
    # The caller gets no WORKER_URL and no edge listener for it.
    code, body = curl(f"http://127.0.0.1:{mesh.proxy_port}/", host="api.localhost")
    assert code == 200, body
    assert "WORKER_URL" not in json.loads(body)
    [route] = [r for r in mesh.status("jobs")["routes"] if r["service"] == "worker"]
    assert (route["url"], route["listener"], route["via"]) == (None, None, "none")
    # Nothing answers at the worker's would-be name.
    code, body = curl(f"http://127.0.0.1:{mesh.proxy_port}/", host="worker.localhost")
    assert code == 404 and "worker" in body
    text = mesh.cli("status", "-p", "jobs", check=True).stdout
    worker_line = next(line for line in text.splitlines() if line.split()[1:2] == ["worker"])
    assert "localhost" not in worker_line


def test_explicit_port_auto_gives_a_worker_a_port(mesh: Mesh) -> None:
    d = mesh.project(
        "jobs2",
        f"""
        version: 1
        services:
          worker: {{version: 1.0.0, command: {PY} worker.py, port: auto, health: {{tcp: false}}}}
        """,
        {"worker.py": WORKER},
    )
    mesh.cli("up", "-d", cwd=d, check=True)
    worker = mesh.services("jobs2")["worker"]
    assert isinstance(worker["port"], int)
    assert worker["url"] == f"http://worker.localhost:{mesh.proxy_port}"
    env = _worker_env(mesh, d)
    assert env["PORT"] == str(worker["port"])


def _api_project(mesh: Mesh, name: str) -> Path:
    return mesh.project(
        name,
        f"""
        version: 1
        project: {name}
        services:
          api: {{version: 1.0.0, command: {PY} server.py}}
        """,
        {"server.py": SERVER},
    )


def _urls(mesh: Mesh) -> dict[str, str]:
    return {r["project"]: r["url"] for r in mesh.status()["services"] if r["name"] == "api"}


def _answering_project(mesh: Mesh, host: str) -> str:
    code, body = curl(f"http://127.0.0.1:{mesh.proxy_port}/", host=host)
    assert code == 200, body
    return str(json.loads(body)["DEVMESH_PROJECT"])


def test_two_projects_with_one_service_name_keep_the_order_they_were_applied(
    mesh: Mesh,
) -> None:
    port = mesh.proxy_port
    one, two = _api_project(mesh, "one"), _api_project(mesh, "two")
    r = mesh.cli("up", "-d", cwd=one, check=True)
    assert "+ api: ready" in r.stderr and f": http://api.localhost:{port}" in r.stderr
    assert "stays with" not in r.stderr
    r = mesh.cli("up", "-d", cwd=two, check=True)
    assert f": http://api.two.localhost:{port}" in r.stderr, r.stderr
    # `up` says who keeps the short name, and where this project's service answers instead.
    assert (
        f"api.localhost stays with project one, applied first; api of two answers at "
        f"http://api.two.localhost:{port}" in r.stderr
    ), r.stderr
    assert _urls(mesh) == {
        "one": f"http://api.localhost:{port}",
        "two": f"http://api.two.localhost:{port}",
    }
    text = mesh.cli("status", check=True).stdout
    assert f"http://api.two.localhost:{port}" in text
    assert _answering_project(mesh, "api.localhost") == "one"
    assert _answering_project(mesh, "api.two.localhost") == "two"
    assert _answering_project(mesh, "api.one.localhost") == "one"

    # `up` again keeps a project's place.
    mesh.cli("up", "-d", cwd=one, check=True)
    assert _urls(mesh)["one"] == f"http://api.localhost:{port}"
    assert _answering_project(mesh, "api.localhost") == "one"

    # `down` then `up` sends it to the back: the other project now has the short name.
    mesh.cli("down", cwd=one, check=True)
    r = mesh.cli("up", "-d", cwd=one, check=True)
    assert f": http://api.one.localhost:{port}" in r.stderr, r.stderr
    assert "api.localhost stays with project two, applied first" in r.stderr, r.stderr
    assert _urls(mesh) == {
        "one": f"http://api.one.localhost:{port}",
        "two": f"http://api.localhost:{port}",
    }
    assert _answering_project(mesh, "api.localhost") == "two"
    assert mesh.status()["agent"]["projects"] == ["two", "one"]


def test_a_crashing_service_with_unlimited_retries_is_restarting_not_crash_looping(
    mesh: Mesh,
) -> None:
    d = mesh.project(
        "flaky",
        f"""
        version: 1
        services:
          api:
            version: 1.0.0
            command: [{PY}, -c, "import sys; sys.exit(3)"]
            restart: {{policy: on-failure, backoff_s: 0.2}}
        """,
    )
    mesh.cli("up", "-d", cwd=d)  # exits 1: the first exit before readiness is a failure
    seen_states: set[str] = set()

    def restarting_again() -> dict[str, object] | None:
        row = mesh.services("flaky")["api"]
        seen_states.add(row["state"])
        ok = row["state"] == "restarting" and row.get("attempt", 0) >= 4
        return row if ok else None

    row = mesh.wait_for(restarting_again, timeout=60, what="api restarting, attempt 4 or more")
    assert "crash-looping" not in seen_states
    assert str(row["reason"]).startswith(f"attempt {row['attempt']}, ")
    assert "(it exited with code 3)" in str(row["reason"])
    assert row["last_exit"] == "exited with code 3"
    text = mesh.cli("status", "-p", "flaky", check=True).stdout
    assert "crash-looping" not in text
    # The proxy says so too (between two attempts; while one runs it says "starting").
    bodies: list[str] = []

    def proxy_says_restarting() -> bool:
        code, body = curl(f"http://127.0.0.1:{mesh.proxy_port}/", host="api.localhost")
        bodies.append(body)
        return code == 502 and "is restarting" in body

    mesh.wait_for(proxy_says_restarting, timeout=60, what="a 502 saying restarting")
    assert not [b for b in bodies if "crash-looping" in b]
