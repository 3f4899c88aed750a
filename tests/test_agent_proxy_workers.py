"""Proxy worker processes: more cores on the same ports, following the agent, never outliving it.

Every test runs real processes on loopback. Which process served a request is read from the
access log, whose JSON lines carry the serving pid; workers are found in /proc as the agent's
children started with --worker-of. Waits are bounded; no timing is asserted.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import proxykit
import pytest
from agentkit import PY, SERVER, Mesh, alive

from devmesh.agent import daemon
from devmesh.proxy import listeners, server, settings, table, workers

SHOP = f"""
version: 1
project: shop
services:
  api:
    version: 1.0.0
    command: {PY} server.py
    health: {{http: /healthz, interval_s: 0.5}}
  web:
    version: 1.0.0
    command: {PY} server.py
    depends_on:
      api: {{version: "^1.0", condition: healthy}}
"""

EXTRA = """
  extra:
    version: 1.0.0
    command: {py} server.py
"""


def worker_pids(agent: int) -> list[int]:
    """The agent's live proxy workers."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if stat[0] != "Z" and int(stat[1]) == agent and workers.WORKER_FLAG.encode() in cmdline:
            out.append(int(entry))
    return sorted(out)


def get(
    port: int, host: str, path: str = "/", *, https: ssl.SSLContext | None = None
) -> tuple[int, bytes]:
    """One request on a connection of its own, so the kernel picks a listener for it."""
    if https is not None:
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(
            "127.0.0.1", port, timeout=10, context=https
        )
    else:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers={"Host": host, "Connection": "close"})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def access_log(mesh: Mesh) -> list[dict]:
    path = mesh.home / "logs" / "proxy.log"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def servers_of(mesh: Mesh, path: str, status: int = 200) -> set[int]:
    """Pids that served requests for ``path`` (every process flushes every 0.25 s)."""
    return {e["pid"] for e in access_log(mesh) if e["path"] == path and e["status"] == status}


def start_with_workers(mesh: Mesh, count: int) -> tuple[int, list[int]]:
    mesh.env["DEVMESH_PROXY_WORKERS"] = str(count)
    mesh.start_agent()
    agent = mesh.agent_pid()
    assert agent is not None
    pids = mesh.wait_for(
        lambda: len(worker_pids(agent)) == count and worker_pids(agent), what="workers"
    )
    return agent, pids


def serve_until_all_answer(
    mesh: Mesh,
    pids: set[int],
    port: int,
    host: str,
    path: str,
    *,
    https: ssl.SSLContext | None = None,
) -> None:
    """Requests on fresh connections until every pid in ``pids`` has served one.

    devmesh.localhost is the agent's dashboard: without its token it answers 401, through
    whichever proxy process took the connection.
    """
    expected = 401 if host.startswith("devmesh.localhost") else 200

    def seen() -> set[int] | None:
        for _ in range(10):
            status, body = get(port, host, path, https=https)
            if status != expected and b"Known services:" in body:
                # A process still on the route table from before (no service yet, or no
                # dashboard): workers poll the routes file every 0.25 s, which a loaded
                # machine can stretch past the moment up returns.
                return None
            assert status == expected, body
        served = servers_of(mesh, path, expected)  # polled: the processes flush every 0.25 s
        return served if pids <= served else None

    mesh.wait_for(seen, timeout=30, what=f"{path} served by each of {sorted(pids)}")


# ------------------------------------------------------------------------------ agent tests


def test_fresh_connections_are_served_by_the_agent_and_its_worker_on_every_listener(
    mesh: Mesh,
) -> None:
    mesh.env["DEVMESH_PROXY_WORKERS"] = "1"
    d = mesh.project("shop", SHOP, {"server.py": SERVER})
    mesh.cli("up", "-d", cwd=d, check=True)
    agent = mesh.agent_pid()
    assert agent is not None
    (worker,) = mesh.wait_for(lambda: worker_pids(agent), what="a worker")
    both = {agent, worker}
    # Front door by Host, HTTPS with the local CA, and web's edge listener to api.
    serve_until_all_answer(mesh, both, mesh.proxy_port, "api.localhost", "/front")
    tls = ssl.create_default_context(cafile=str(mesh.home / "ca" / "ca.pem"))
    serve_until_all_answer(mesh, both, mesh.https_port, "api.localhost", "/tls", https=tls)
    status, body = get(mesh.proxy_port, "web.localhost")
    assert status == 200, body
    api_url = json.loads(body)["API_URL"]
    edge_port = int(api_url.rsplit(":", 1)[1])
    serve_until_all_answer(mesh, both, edge_port, "whatever", "/edge")
    edge_lines = [e for e in access_log(mesh) if e["path"] == "/edge"]
    assert {e["caller"] for e in edge_lines} == {"web.shop"}
    assert worker_pids(agent) == [worker]  # the same worker all along: nothing crashed


def test_a_service_started_later_reaches_the_workers(mesh: Mesh) -> None:
    mesh.env["DEVMESH_PROXY_WORKERS"] = "1"
    d = mesh.project("shop", SHOP, {"server.py": SERVER})
    mesh.cli("up", "-d", cwd=d, check=True)
    agent = mesh.agent_pid()
    assert agent is not None
    (worker,) = mesh.wait_for(lambda: worker_pids(agent), what="a worker")
    serve_until_all_answer(mesh, {agent, worker}, mesh.proxy_port, "api.localhost", "/before")
    (d / "devmesh.yaml").write_text(SHOP.lstrip() + EXTRA.format(py=PY))
    mesh.cli("up", "-d", cwd=d, check=True)

    def all_forty_reach_extra() -> bool:
        answers = [get(mesh.proxy_port, "extra.localhost", "/after") for _ in range(40)]
        return all(
            status == 200 and json.loads(body)["DEVMESH_SERVICE"] == "extra"
            for status, body in answers
        )

    mesh.wait_for(all_forty_reach_extra, timeout=10, what="40 answers from extra")
    mesh.wait_for(lambda: worker in servers_of(mesh, "/after"), what="the worker's log lines")


def test_workers_exit_when_the_agent_is_killed(mesh: Mesh) -> None:
    agent, pids = start_with_workers(mesh, 2)
    os.kill(agent, signal.SIGKILL)
    mesh.wait_for(lambda: not any(alive(p) for p in pids), timeout=10, what="workers to exit")
    mesh.wait_for(lambda: mesh.leftovers() == [], timeout=10, what="no process left")


def test_a_new_agent_waits_for_an_exiting_worker_of_a_killed_one(mesh: Mesh) -> None:
    agent, (worker,) = start_with_workers(mesh, 1)
    serve_until_all_answer(mesh, {agent, worker}, mesh.proxy_port, "devmesh.localhost", "/a")
    # Stopped, the worker keeps the ports with its death signal pending until SIGCONT: the
    # moment between an agent's death and its workers' exit, made as long as the test needs.
    os.kill(worker, signal.SIGSTOP)
    mesh.wait_for(lambda: state(worker) == "T", what="the worker to stop")
    os.kill(agent, signal.SIGKILL)
    assert mesh.agent is not None
    mesh.agent.wait(10)
    log = mesh.root / "agent-fg.log"
    starting = threading.Thread(target=mesh.start_agent)
    starting.start()
    try:
        mesh.wait_for(
            lambda: f"waiting for pid {worker}, a proxy worker of a dead agent" in log.read_text(),
            what="the new agent to wait for the old worker",
        )
        os.kill(worker, signal.SIGCONT)
        starting.join(30)
        mesh.wait_for(lambda: not alive(worker), what="the old worker to exit")

        def serving() -> bool:
            try:
                return get(mesh.proxy_port, "devmesh.localhost")[0] == 401  # the dashboard
            except OSError:
                return False

        mesh.wait_for(serving, what="the new agent's proxy")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nagent log:\n{log.read_text()[-3000:]}") from None
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker, signal.SIGCONT)
    assert mesh.agent is not None and mesh.agent.poll() is None  # it did not give up
    assert mesh.agent_pid() == mesh.agent.pid


def state(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def test_a_killed_worker_is_started_again(mesh: Mesh) -> None:
    agent, (first,) = start_with_workers(mesh, 1)
    os.kill(first, signal.SIGKILL)
    (second,) = mesh.wait_for(
        lambda: [p for p in worker_pids(agent) if p != first], timeout=15, what="a new worker"
    )
    assert not Path(f"/proc/{first}").exists()  # reaped, not left a zombie
    serve_until_all_answer(mesh, {second}, mesh.proxy_port, "devmesh.localhost", "/again")
    log = (mesh.root / "agent-fg.log").read_text()
    assert f"proxy worker pid {first} was killed by SIGKILL" in log


def test_a_bad_worker_count_is_named(mesh: Mesh) -> None:
    mesh.env["DEVMESH_PROXY_WORKERS"] = "abc"
    d = mesh.project("shop", SHOP, {"server.py": SERVER})
    r = mesh.cli("up", "-d", cwd=d)
    assert r.returncode == 1
    assert (
        "cannot start the proxy: DEVMESH_PROXY_WORKERS='abc' is not a whole number >= 0" in r.stderr
    )


def test_a_second_agent_cannot_share_the_port_of_one_with_workers(mesh: Mesh) -> None:
    agent, (worker,) = start_with_workers(mesh, 1)
    serve_until_all_answer(mesh, {agent, worker}, mesh.proxy_port, "devmesh.localhost", "/a")
    other = Mesh()
    try:
        other.env["DEVMESH_PROXY_PORT"] = str(mesh.proxy_port)
        other.env["DEVMESH_PROXY_WORKERS"] = "1"
        d = other.project("shop", SHOP, {"server.py": SERVER})
        r = other.cli("up", "-d", cwd=d)
        assert r.returncode == 1
        assert f"port {mesh.proxy_port} on 127.0.0.1 is already in use" in r.stderr
        assert other.leftovers() == []
    finally:
        other.close()
    assert worker_pids(agent) == [worker]


def test_agent_shutdown_stops_its_workers(mesh: Mesh) -> None:
    agent, pids = start_with_workers(mesh, 2)
    assert mesh.agent is not None
    os.kill(agent, signal.SIGTERM)
    assert mesh.agent.wait(20) == 0
    assert not any(alive(p) for p in pids)
    assert not (mesh.home / "proxy-routes.json").exists()


# ------------------------------------------------------------------------------ worker side


def test_worker_joins_each_edge_on_its_exact_port_or_skips_it(tmp_path: Path) -> None:
    edges = [
        table.Edge(caller_project="p", caller_service=f"c{i}", target_service="t") for i in range(3)
    ]
    held = [listeners.bind("127.0.0.1", 0, shared=True) for _ in range(2)]  # "the agent's"
    plain = listeners.bind("127.0.0.1", 0)  # somebody else's, not shared
    shared_a, shared_b = (s.getsockname()[1] for s in held)
    blocked = plain.getsockname()[1]
    proxy = server.ProxyServer(
        settings.Settings(port=0, https_port=None, ipv6=False, join_ports=True),
        table.RouteTable,
    )

    async def main() -> None:
        try:
            want: dict[table.Edge, int | None] = {
                edges[0]: shared_a,
                edges[1]: blocked,
                edges[2]: None,
            }
            assert await workers.join_edges(proxy, want) == {edges[0]: shared_a}
            # The edge moved to another port: the worker follows; the blocked one is retried.
            want[edges[0]] = shared_b
            assert await workers.join_edges(proxy, want) == {edges[0]: shared_b}
            assert await workers.join_edges(proxy, {}) == {}
        finally:
            proxy.close()

    try:
        anyio.run(main)
    finally:
        for s in (*held, plain):
            s.close()


def test_standalone_workers_share_ports_and_follow_the_routes_file(tmp_path: Path) -> None:
    with proxykit.upstream() as up:
        edge = {"caller_project": "p", "caller_service": "web", "target_service": "api"}
        routes = {"backends": [], "edges": [{**edge, "port": None}]}
        proc = proxykit.ProxyProcess(routes, args=("--workers", "2", "--json"))
        try:
            (edge_port,) = proc.edges.values()
            workers_now = _children_with_flag(proc.pid)
            assert len(workers_now) == 1
            proc.update_routes(
                {
                    "backends": [{"project": "p", "service": "api", "port": up.port}],
                    "edges": [{**edge, "port": None}],
                }
            )

            def served() -> set[int] | None:
                for port, host in ((proc.port, "api.localhost"), (edge_port, "x")):
                    for _ in range(10):
                        status, _ = get(port, host, "/both")
                        if status != 200:  # the processes read the new table within a second
                            return None
                lines = [json.loads(x) for x in proc.log_lines()]
                pids = {e["pid"] for e in lines if e["caller"] == "web.p"}
                pids &= {e["pid"] for e in lines if e["caller"] is None}
                return pids if pids == {proc.pid, *workers_now} else None

            wait_for(served, timeout=30, what="both processes on both ports")
        finally:
            assert proc.stop() == ""
        assert not any(alive(p) for p in workers_now)


def _children_with_flag(parent: int) -> list[int]:
    return wait_for(lambda: worker_pids(parent), timeout=10, what="a worker")


def wait_for(predicate: Callable[[], Any], *, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}")


# ------------------------------------------------------------------------------ worker count


@pytest.mark.parametrize(
    ("env", "cpus", "expected"),
    [
        ({}, 1, 0),
        ({}, 2, 1),
        ({}, 4, 3),
        ({}, 64, 3),
        ({"DEVMESH_PROXY_WORKERS": ""}, 2, 1),
        ({"DEVMESH_PROXY_WORKERS": "0"}, 8, 0),
        ({"DEVMESH_PROXY_WORKERS": "6"}, 2, 6),
    ],
)
def test_worker_count_defaults_to_one_per_extra_core_up_to_three(env, cpus, expected) -> None:
    assert daemon.proxy_workers(env, cpus=cpus) == expected


def test_listeners_are_shared_only_when_there_are_workers() -> None:
    assert daemon.proxy_settings({"DEVMESH_PROXY_WORKERS": "0"}).reuse_port is False
    assert daemon.proxy_settings({"DEVMESH_PROXY_WORKERS": "2"}).reuse_port is True


@pytest.mark.parametrize("raw", ["abc", "-1", "1.5"])
def test_a_bad_worker_count_is_a_value_error_naming_the_variable(raw) -> None:
    with pytest.raises(ValueError, match=f"DEVMESH_PROXY_WORKERS='{raw}' is not a whole number"):
        daemon.proxy_workers({"DEVMESH_PROXY_WORKERS": raw})


def test_up_returns_once_every_proxy_process_accepts(mesh: Mesh) -> None:
    """``up -d`` starts the agent and returns: by then each worker already listens on the
    proxy's ports, and ``status --json`` says the proxy is ready with every worker."""
    import psutil

    mesh.env["DEVMESH_PROXY_WORKERS"] = "2"
    quick = "version: 1\nproject: quick\nservices:\n  idle:\n    version: 1.0.0\n    command: sleep 600\n    health: {command: 'true', interval_s: 0.1}\n"
    d = mesh.project("quick", quick)  # ready at once: `up -d` waits for nothing else
    mesh.cli("up", "-d", cwd=d, check=True)
    agent = mesh.agent_pid()
    assert agent is not None
    pids = worker_pids(agent)
    assert len(pids) == 2
    for pid in pids:
        listening = {
            c.laddr.port
            for c in psutil.Process(pid).net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN
        }
        assert {mesh.proxy_port, mesh.https_port} <= listening, (pid, listening)
    proxy = mesh.status()["proxy"]
    assert (proxy["workers"], proxy["workers_ready"], proxy["ready"]) == (2, 2, True)
