"""Benchmark of the peer hop: calls that cross machines (not a test; run as root).

    .venv/bin/python bench/hop.py [--duration 5] [--conns 32] [--rounds 3]

Three network-namespace "machines" of one team (tests/netkit.py), one devmesh agent each:
beta and gamma run ``api``, an nginx answering ``200 <node>`` that their agents supervise
and share (bound to their eth0 address too, so it can be called directly); alpha declares
``api`` without a command, so alpha's proxy routes calls to it over the peer channel
(``policy.balance: first``: beta while it lives). Needs wrk and nginx (nginx-light or nginx).

Paths measured, all with wrk running inside a namespace:

- direct:      alpha -> beta's nginx (eth0, no proxy): the baseline
- nginx:       alpha -> nginx reverse proxy in alpha (keep-alive upstream) -> beta's nginx
- two agents:  alpha -> alpha's proxy (Host api.localhost) -> mTLS peer hop -> beta's peer
               listener -> beta's nginx
- one agent:   beta -> beta's proxy (Host api.localhost) -> beta's nginx (a local call)

Prints, per path, p50 and p99 latency with one connection (sequential keep-alive requests),
and requests/s with --conns connections; the added latency of the hop over direct (goal: p50
at most 0.3 ms); throughput ratios (two agents / one agent, two agents / nginx, against direct).
Then failover under load: four keep-alive clients in alpha send GETs back to back, beta is
killed (agent and nginx, SIGKILL); it prints the time from the kill to the first answer from
gamma, the GETs that failed (goal: none), and the slowest GET across the kill. Every load
run is bounded in time (wrk -d) and in count (the failover clients).

Agents run with no proxy worker processes (the in-process proxy only), as in the tests.
Everything runs inside namespaces the benchmark creates; nothing is sent on the machine's
real interfaces.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from agentkit import Machines
from netkit import NsHTTP, wait_for

ALPHA, BETA, GAMMA = 0, 1, 2
API_PORT = 18100
NGINX_PORT = 18200
MESH = (
    "version: 1\nproject: shop\n"
    "mesh:\n  name: team\n  discovery:\n    interval_s: 0.3\n    interfaces: [eth0]\n"
)


def nginx_conf(d: Path, node: str, body: str) -> Path:
    """A one-worker foreground nginx config in ``d`` around a ``server`` body."""
    d.mkdir(parents=True, exist_ok=True)
    conf = d / "nginx.conf"
    conf.write_text(
        textwrap.dedent(f"""
        worker_processes 1;
        daemon off;
        pid {d}/nginx.pid;
        error_log {d}/error.log warn;
        events {{ worker_connections 4096; }}
        http {{
            access_log off;
            client_body_temp_path {d}/body;
            proxy_temp_path {d}/proxy;
            fastcgi_temp_path {d}/fastcgi;
            uwsgi_temp_path {d}/uwsgi;
            scgi_temp_path {d}/scgi;
            keepalive_requests 1000000;
            {body}
        }}
        """)
    )
    return conf


def owner_yaml(conf: Path) -> str:
    return MESH + (
        "services:\n"
        "  api:\n    version: 2.3.0\n    share: true\n"
        f"    port: {API_PORT}\n"
        f"    command: nginx -c {conf}\n"
    )


def alpha_yaml() -> str:
    return MESH + "policy:\n  balance: first\nservices:\n  api: {}\n"


def wrk(netns: str, url: str, conns: int, duration_s: float, host: str | None) -> dict[str, float]:
    cmd = ["ip", "netns", "exec", netns, "wrk", "-t1", f"-c{conns}", f"-d{duration_s:g}s"]
    cmd += ["--latency", *(["-H", f"Host: {host}"] if host else []), url]
    out = subprocess.run(
        cmd, capture_output=True, text=True, timeout=duration_s + 30, check=True
    ).stdout
    found = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if found is None:
        raise RuntimeError(f"wrk said: {out}")

    def pct(p: str) -> float:
        m = re.search(rf"\s{p}%\s+([\d.]+)(us|ms|s)\b", out)
        if m is None:
            return float("nan")
        return float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]

    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: (.*)", out)
    return {
        "rps": float(found.group(1)),
        "p50": pct("50"),
        "p99": pct("99"),
        "errors": float(errors.group(1)) if errors else 0.0,
        "socket_errors": 1.0 if sock else 0.0,
    }


def failover(m: Machines) -> dict[str, Any]:
    """Four clients on alpha's proxy; beta killed after 200 answers from it."""
    alpha = m.agents[ALPHA]
    answers: list[tuple[float, float, str]] = []  # (sent, done, node or error)
    lock = threading.Lock()
    stop = threading.Event()

    def client() -> None:
        with NsHTTP(m.net.hosts[ALPHA], "127.0.0.1", alpha.proxy_port, timeout_s=15) as c:
            for _ in range(3000):  # bounded
                if stop.is_set():
                    return
                sent = time.monotonic()
                try:
                    r = c.request("GET", "/", headers={"Host": f"api.localhost:{alpha.proxy_port}"})
                    what = r.body.decode().strip() if r.status == 200 else f"status {r.status}"
                except OSError as exc:
                    what = f"error {exc!r}"
                with lock:
                    answers.append((sent, time.monotonic(), what))

    threads = [threading.Thread(target=client, daemon=True) for _ in range(4)]
    for t in threads:
        t.start()

    def count(node: str, after: float = 0.0) -> list[tuple[float, float, str]]:
        with lock:
            return [a for a in answers if a[2] == node and a[1] > after]

    try:
        wait_for("200 answers from beta", lambda: len(count("beta")) >= 200, timeout_s=60)
        killed = time.monotonic()
        m.kill(BETA)
        first = wait_for("an answer from gamma", lambda: count("gamma", killed), timeout_s=30)
        wait_for("200 answers from gamma", lambda: len(count("gamma", killed)) >= 200, 60)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    failed = [a for a in answers if a[2] not in ("beta", "gamma")]
    across = [a for a in answers if a[0] <= killed <= a[1]]
    return {
        "moved_ms": (min(a[1] for a in first) - killed) * 1000,
        "requests": len(answers),
        "failed": len(failed),
        "failed_examples": [a[2] for a in failed[:3]],
        "slowest_across_kill_ms": max(((a[1] - a[0]) * 1000 for a in across), default=0.0),
        "in_flight_at_kill": len(across),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--duration", type=float, default=5.0, help="seconds per wrk run")
    p.add_argument("--conns", type=int, default=32, help="connections for throughput")
    p.add_argument("--rounds", type=int, default=3, help="runs per path (median reported)")
    args = p.parse_args()
    for tool in ("wrk", "nginx"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed (apt-get install wrk nginx-light)")

    tmp = Path(tempfile.mkdtemp(prefix="dmh-", dir="/tmp"))
    m = Machines(["alpha", "beta", "gamma"])
    proxy_nginx: subprocess.Popen[str] | None = None
    try:
        for i, node in ((BETA, "beta"), (GAMMA, "gamma")):
            # Loopback for its agent, and the namespace's own test-subnet address for the
            # direct baseline: nothing else exists inside the namespace, and nothing is bound
            # on the machine's real interfaces.
            serve = (
                f"server {{ listen 127.0.0.1:{API_PORT}; listen {m.net.address(i)}:{API_PORT}; "
                f'location / {{ return 200 "{node}\\n"; }} }}'
            )
            m.up(i, "shop", owner_yaml(nginx_conf(tmp / node, node, serve)), {})
        m.up(ALPHA, "shop", alpha_yaml(), {})
        beta_addr = m.net.address(BETA)
        upstream = (
            f"upstream beta {{ server {beta_addr}:{API_PORT}; keepalive 64; }}\n"
            f"server {{ listen 127.0.0.1:{NGINX_PORT}; location / {{ proxy_pass http://beta; "
            'proxy_http_version 1.1; proxy_set_header Connection ""; } }'
        )
        conf = nginx_conf(tmp / "proxy", "proxy", upstream)
        proxy_nginx = m.net.run(ALPHA, ["nginx", "-c", str(conf)], stderr=subprocess.DEVNULL)
        alpha, beta = m.agents[ALPHA], m.agents[BETA]
        a_ns, b_ns = m.net.hosts[ALPHA], m.net.hosts[BETA]

        def routed() -> bool:
            try:
                with NsHTTP(a_ns, "127.0.0.1", alpha.proxy_port) as c:
                    r = c.request("GET", "/", headers={"Host": f"api.localhost:{alpha.proxy_port}"})
                    return r.status == 200 and r.body.strip() == b"beta"
            except OSError:
                return False

        wait_for("alpha's proxy to route api to beta", routed, timeout_s=60)
        paths = {
            "direct": (a_ns, f"http://{beta_addr}:{API_PORT}/", None),
            "nginx": (a_ns, f"http://127.0.0.1:{NGINX_PORT}/", None),
            "two agents": (a_ns, f"http://127.0.0.1:{alpha.proxy_port}/", "api.localhost"),
            "one agent": (b_ns, f"http://127.0.0.1:{beta.proxy_port}/", "api.localhost"),
        }
        results: dict[str, dict[str, float]] = {}
        for name, (ns, url, host) in paths.items():
            wrk(ns, url, 1, 1, host)  # warm: pools, TLS sessions
            lat = [wrk(ns, url, 1, args.duration, host) for _ in range(args.rounds)]
            thr = [wrk(ns, url, args.conns, args.duration, host) for _ in range(args.rounds)]
            results[name] = {
                "p50_ms": statistics.median(r["p50"] for r in lat),
                "p99_ms": statistics.median(r["p99"] for r in lat),
                "rps_1": statistics.median(r["rps"] for r in lat),
                f"rps_{args.conns}": statistics.median(r["rps"] for r in thr),
                "errors": sum(r["errors"] + r["socket_errors"] for r in lat + thr),
            }
            print(name, json.dumps(results[name]), flush=True)
        d, two, one, ng = (results[k] for k in ("direct", "two agents", "one agent", "nginx"))
        rps = f"rps_{args.conns}"
        print(
            f"\nadded by the peer hop over direct: p50 {two['p50_ms'] - d['p50_ms']:.3f} ms "
            f"(goal <= 0.3), p99 {two['p99_ms'] - d['p99_ms']:.3f} ms"
        )
        print(f"added by nginx over direct: p50 {ng['p50_ms'] - d['p50_ms']:.3f} ms")
        print(
            f"throughput at {args.conns} connections: two agents {two[rps]:.0f}/s, one agent "
            f"{one[rps]:.0f}/s (ratio {two[rps] / one[rps]:.2f}), nginx {ng[rps]:.0f}/s "
            f"(two agents / nginx {two[rps] / ng[rps]:.2f}), direct {d[rps]:.0f}/s"
        )
        fo = failover(m)
        print("\nfailover under load:", json.dumps(fo))
    finally:
        if proxy_nginx is not None and proxy_nginx.poll() is None:
            proxy_nginx.send_signal(15)  # nginx stops its workers on SIGTERM
            proxy_nginx.wait(15)
        m.close()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
