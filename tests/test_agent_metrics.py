"""The metrics of a real agent: counted by the agent's proxy and its worker processes,
served on /metrics (HTTP and HTTPS) with all of them, kept across a ``kill -9`` of the agent,
never carrying a secret, and off when asked.

Real processes on loopback: the agent, two proxy workers, a service, the CLI. Which process
served a request is read from the access log (its JSON lines carry the pid). Waits are
bounded; nothing is timed.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import sqlite3
import ssl
from pathlib import Path

from agentkit import PY, Mesh
from prometheus_client.parser import text_string_to_metric_families

CODED = """
import http.server, os
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a): pass
    def do_GET(self):
        # /code/N answers status N with N % 100 + 1 bytes; a body is echoed.
        status = int(self.path.split("?")[0].rsplit("/", 1)[1]) if "/code/" in self.path else 200
        body = b"c" * (status % 100 + 1)
        length = int(self.headers.get("content-length") or 0)
        if length:
            body = self.rfile.read(length)
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    do_POST = do_GET
http.server.ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), H).serve_forever()
"""

SHOP = f"""
version: 1
project: shop
services:
  api:
    version: 1.0.0
    command: {PY} coded.py
"""
ROUTE = {"project": "shop", "caller": "", "service": "api", "target": "local", "node": ""}


def request(
    port: int, path: str, *, method: str = "GET", body: bytes = b"", https: bool = False
) -> tuple[int, bytes]:
    """One request on a connection of its own, so the kernel picks a process for it."""
    host = "api.localhost" if path != "/metrics" else "devmesh.localhost"
    if https:
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(
            "127.0.0.1", port, timeout=10, context=ctx
        )
    else:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=body or None, headers={"Host": host})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def scrape(mesh: Mesh, *, https: bool = False) -> dict[tuple[str, tuple], float]:
    port = mesh.https_port if https else mesh.proxy_port
    status, text = request(port, "/metrics", https=https)
    assert status == 200, text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text.decode())
        for s in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def serving_pids(mesh: Mesh) -> set[int]:
    return {e["pid"] for e in mesh.access_entries() if e.get("host") == "api.localhost"}


def stored_requests(home: Path) -> int:
    """Requests in the agent's SQLite history, read as another process would."""
    path = home / "metrics" / "history.db"
    if not path.exists():
        return 0
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        return int(db.execute("SELECT COALESCE(SUM(requests), 0) FROM rollups").fetchone()[0])


def up(mesh: Mesh) -> None:
    mesh.start_agent()
    d = mesh.project("shop", SHOP, {"coded.py": CODED})
    mesh.cli("up", "-d", cwd=d, check=True)


def test_counts_of_every_process_on_metrics_and_in_the_history_after_kill_9(
    mesh: Mesh,
) -> None:
    mesh.env["DEVMESH_PROXY_WORKERS"] = "2"
    up(mesh)
    sent = {"2xx": 0, "4xx": 0, "5xx": 0}
    bytes_in = bytes_out = 0

    def send_round() -> set[int] | None:
        nonlocal bytes_in, bytes_out
        for path, cls, size in (("/code/200", "2xx", 1), ("/code/404", "4xx", 5)):
            assert request(mesh.proxy_port, path)[0] == int(path[-3:])
            sent[cls] += 1
            bytes_out += size
        assert request(mesh.proxy_port, "/code/503")[0] == 503
        sent["5xx"] += 1
        bytes_out += 4
        status, body = request(mesh.proxy_port, "/echo", method="POST", body=b"b" * 300)
        assert status == 200 and body == b"b" * 300
        sent["2xx"] += 1
        bytes_in += 300
        bytes_out += 300
        pids = serving_pids(mesh)
        return pids if len(pids) == 3 else None

    def warm() -> bool:
        """Workers follow the route table a moment later: until 20 calls in a row are
        served (a 404 of the proxy for a host it does not know yet is no route's count)."""
        nonlocal bytes_out
        for _ in range(20):
            if request(mesh.proxy_port, "/code/200")[0] != 200:
                return False
            sent["2xx"] += 1
            bytes_out += 1
        return True

    mesh.wait_for(warm, what="every process to route api.localhost")
    # Until the agent and both workers have served some: then every count is split.
    pids = mesh.wait_for(send_round, timeout=30, what="requests served by three processes")
    assert mesh.agent_pid() in pids
    total = sum(sent.values())

    def counted(samples: dict) -> bool:
        return all(
            value(samples, "devmesh_proxy_requests_total", **ROUTE, code=cls) == n
            for cls, n in sent.items()
        )

    # Any process answers /metrics with everybody's counts (each flushes every 0.25 s).
    for https in (False, True):
        samples = mesh.wait_for(
            lambda https=https: (s := scrape(mesh, https=https)) and counted(s) and s,
            what=f"/metrics {'HTTPS' if https else 'HTTP'} counting {sent}",
        )
        assert value(samples, "devmesh_proxy_request_bytes_total", **ROUTE) == bytes_in
        assert value(samples, "devmesh_proxy_response_bytes_total", **ROUTE) == bytes_out
        hist = "devmesh_proxy_request_duration_seconds"
        assert value(samples, f"{hist}_count", **ROUTE) == total
        assert value(samples, f"{hist}_bucket", **ROUTE, le="+Inf") == total

    # The agent writes its rollups every ten seconds; then kill -9 and start again.
    mesh.wait_for(lambda: stored_requests(mesh.home) == total, timeout=30, what="the history")
    agent = mesh.agent
    assert agent is not None
    os.kill(agent.pid, signal.SIGKILL)
    agent.wait(10)
    new = mesh.start_agent()  # the killed agent's socket file is still there: wait for ours
    mesh.wait_for(lambda: mesh.agent_pid() == new.pid, what="the new agent")
    mesh.wait_for(lambda: '"routes"' in mesh.cli("metrics", "--json").stdout, what="its answer")
    report = json.loads(mesh.cli("metrics", "--json", check=True).stdout)
    (row,) = [r for r in report["routes"] if r["service"] == "api"]
    assert row["requests"] == total
    assert {c: row["codes"][c] for c in sent} == sent
    assert (row["bytes_in"], row["bytes_out"]) == (bytes_in, bytes_out)
    assert row["error_rate"] == round(sent["5xx"] / total, 4)
    assert row["p50_ms"] is not None and row["p99_ms"] >= row["p50_ms"]
    assert (row["project"], row["caller"], row["target"], row["kind"]) == (
        "shop",
        None,
        "local",
        "route",
    )
    text = mesh.cli("metrics", "--since", "10m", "--service", "api", check=True).stdout
    (line,) = [x for x in text.splitlines() if x.startswith("api.shop")]
    assert line.split()[1:4] == ["-", "local", str(total)]
    assert "No calls" in mesh.cli("metrics", "--service", "nothing", check=True).stdout
    # A restarted agent counts from zero on /metrics; the history has the rest.
    assert value(scrape(mesh), "devmesh_proxy_requests_total", **ROUTE, code="2xx") == 0


SECRET = "s3cr3t"


def test_labels_never_carry_a_secret_and_a_corrupt_history_is_moved_aside(mesh: Mesh) -> None:
    history = mesh.home / "metrics" / "history.db"
    history.parent.mkdir(parents=True)
    history.write_bytes(b"garbage, not SQLite\n" * 200)
    up(mesh)
    (aside,) = history.parent.glob("history.db.corrupt-*")
    assert aside.read_bytes().startswith(b"garbage")
    assert "metrics history" in mesh.agent_log() and "moved aside" in mesh.agent_log()
    raw = (
        f"GET http://alice:{SECRET}-userinfo@api.localhost/code/200?token={SECRET}-query "
        f"HTTP/1.1\r\nHost: api.localhost\r\nAuthorization: Bearer {SECRET}-header\r\n"
        f"Cookie: session={SECRET}-cookie\r\nx-devmesh-service: {SECRET}.svc\r\n"
        f"User-Agent: {SECRET}-agent\r\nConnection: close\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", mesh.proxy_port), timeout=10) as sock:
        sock.sendall(raw)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200")

    def requests(samples: dict) -> float:  # whatever the labels
        return sum(v for (name, _), v in samples.items() if name == "devmesh_proxy_requests_total")

    samples = mesh.wait_for(
        lambda: (s := scrape(mesh)) and requests(s) == 1 and s, what="the request counted"
    )
    exposition = request(mesh.proxy_port, "/metrics")[1].decode()
    mesh.wait_for(lambda: stored_requests(mesh.home) == 1, timeout=30, what="the history")
    report = mesh.cli("metrics", "--json", check=True).stdout
    stored = b"".join(p.read_bytes() for p in history.parent.glob("history.db*"))
    stored += b"".join(p.read_bytes() for p in (history.parent / "counts").iterdir())
    for where, text in (("/metrics", exposition), ("metrics --json", report)):
        assert SECRET not in text, f"{where} shows a secret:\n{text}"
    assert SECRET.encode() not in stored.replace(aside.read_bytes(), b"")
    assert all(SECRET not in str(labels) for _, labels in samples)


def test_metrics_off_for_benchmarking(mesh: Mesh) -> None:
    mesh.env["DEVMESH_METRICS"] = "off"
    up(mesh)
    assert request(mesh.proxy_port, "/code/200")[0] == 200
    status, body = request(mesh.proxy_port, "/metrics")
    assert status == 404 and b"DEVMESH_METRICS=off" in body
    out = mesh.cli("metrics", check=True).stdout
    assert "metrics are off" in out
    assert not (mesh.home / "metrics" / "counts").exists()


def test_retention_days_from_the_project_that_starts_the_agent(mesh: Mesh) -> None:
    d = mesh.project("shop", SHOP + "metrics:\n  retention_days: 2.5\n", {"coded.py": CODED})
    mesh.cli("up", "-d", cwd=d, check=True)  # starts the agent with the project's settings
    report = json.loads(mesh.cli("metrics", "--json", check=True).stdout)
    assert report["retention_days"] == 2.5
    other = mesh.project(
        "other",
        SHOP.replace("project: shop", "project: other") + "metrics: {retention_days: 30}\n",
        {"coded.py": CODED},
    )
    up_other = mesh.cli("up", "-d", cwd=other, check=True)
    assert "asks for metrics.retention_days 30 but this agent keeps 2.5 days" in up_other.stderr
    bad = mesh.project("bad", SHOP + "metrics:\n  retention_days: 0\n", {"coded.py": CODED})
    checked = mesh.cli("validate", cwd=bad)
    assert checked.returncode != 0
    assert "devmesh.yaml:9" in checked.stderr and "retention_days" in checked.stderr


def test_a_clean_stop_writes_what_the_history_did_not_have_yet(mesh: Mesh) -> None:
    up(mesh)
    for _ in range(5):
        assert request(mesh.proxy_port, "/code/200")[0] == 200
    agent = mesh.agent
    assert agent is not None
    agent.send_signal(signal.SIGTERM)
    assert agent.wait(30) == 0
    assert stored_requests(mesh.home) == 5
