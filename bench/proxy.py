"""Benchmark the devmesh proxy against direct, nginx and Caddy, all on 127.0.0.1.

Run: python bench/proxy.py [--duration 5] [--rounds 3]
Needs the Debian packages nginx-light (or nginx) and wrk; caddy is measured when installed.
Every server gets a temporary config bound to 127.0.0.1 only; every load run is bounded by
--duration seconds.

Besides the standalone proxy (one process, and two sharing the port), it measures a real
agent: ``devmesh up -d`` of a project whose service ``api`` is an nginx the agent supervises,
so the figures include the access log and the agent's proxy worker processes.

Prints requests/s and latency for wrk -t1 -c32 and -c1, the ratios against nginx and Caddy,
1 GiB streamed (direct vs devmesh, with the proxy's peak RSS), and WebSocket echo
messages/s (direct vs devmesh). Not a test: nothing asserts.

``--metrics`` measures only what the proxy's metrics cost: the same proxy with them on and
off (``--no-metrics``, as ``DEVMESH_METRICS=off`` does for the agent), one process and two,
in interleaved rounds of one run, and prints the on/off ratios (the bar is 0.95x) of the
throughput and of the requests served per CPU-second of the proxy's processes (the steadier
figure on a machine shared with other load).

``--compare DIR`` also runs the proxy from another source tree (for a before/after table in
one run, on one machine state), e.g. ``git archive OLD devmesh | tar -x -C /tmp/old``;
``--no-uvloop`` passes the same flag to every devmesh process.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GIB = 1 << 30


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listening on 127.0.0.1:{port}")


def nginx_conf(tmp: Path, name: str, body: str) -> tuple[Path, Path]:
    """A one-worker foreground nginx config in tmp/name around an ``http`` body;
    (config file, its folder)."""
    d = tmp / name
    d.mkdir()
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
    return conf, d


def start_nginx(tmp: Path, name: str, body: str) -> subprocess.Popen:
    conf, d = nginx_conf(tmp, name, body)
    return subprocess.Popen(
        ["nginx", "-c", str(conf), "-p", str(d)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def start_caddy(tmp: Path, port: int, upstream: int) -> subprocess.Popen:
    d = tmp / "caddy"
    d.mkdir()
    (d / "Caddyfile").write_text(
        textwrap.dedent(f"""
        {{
            admin off
            auto_https off
        }}
        http://127.0.0.1:{port} {{
            reverse_proxy 127.0.0.1:{upstream}
        }}
    """)
    )
    env = {**os.environ, "HOME": str(d), "XDG_DATA_HOME": str(d), "XDG_CONFIG_HOME": str(d)}
    return subprocess.Popen(
        ["caddy", "run", "--config", str(d / "Caddyfile"), "--adapter", "caddyfile"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def start_devmesh(
    tmp: Path,
    upstream: int,
    ws_upstream: int,
    workers: int = 1,
    src: Path = ROOT,
    extra: tuple[str, ...] = (),
) -> tuple[subprocess.Popen, int]:
    routes = tmp / f"routes-{workers}-{abs(hash(str(src)))}.json"
    routes.write_text(
        json.dumps(
            {
                "backends": [
                    {"project": "bench", "service": "api", "port": upstream},
                    {"project": "bench", "service": "ws", "port": ws_upstream},
                ]
            }
        )
    )
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "devmesh.proxy",
            "--routes",
            str(routes),
            "--port",
            "0",
            "--no-ipv6",
            "--workers",
            str(workers),
            *extra,
        ],
        cwd=src,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    info = json.loads(proc.stdout.readline())
    return proc, info["http_port"]


def start_agent(tmp: Path, body: str) -> tuple[dict[str, str], int, Path]:
    """A real agent (``devmesh up -d``) in a private DEVMESH_HOME, supervising its own nginx
    as service ``api``: what a user gets, access log and proxy workers included.

    Returns the environment, the proxy port and the home (stop with stop_agent).
    """
    home = tmp / "agent-home"
    svc_port, proxy_port = free_port(), free_port()
    conf, d = nginx_conf(tmp, "agent-nginx", f"server {{ listen 127.0.0.1:{svc_port}; {body} }}")
    project = tmp / "agent-project"
    project.mkdir()
    (project / "devmesh.yaml").write_text(
        textwrap.dedent(f"""
        version: 1
        project: bench
        proxy: {{port: {proxy_port}, https_port: {free_port()}}}
        services:
          api:
            version: 1.0.0
            command: [nginx, -c, "{conf}", -p, "{d}"]
            port: {svc_port}
            health: {{tcp: true}}
    """)
    )
    env = {
        **os.environ,
        "DEVMESH_HOME": str(home),
        "NO_COLOR": "1",
    }
    subprocess.run(
        [sys.executable, "-m", "devmesh", "up", "-d", "-f", str(project / "devmesh.yaml")],
        env=env,
        check=True,
        timeout=60,
        stdout=subprocess.DEVNULL,
    )
    return env, proxy_port, home


def stop_agent(home: Path) -> None:
    pid_file = home / "agent.pid"
    if not pid_file.exists():
        return
    pid = int(pid_file.read_text().split()[0])
    try:
        os.kill(pid, 15)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
        time.sleep(0.1)


def agent_pids(home: Path) -> list[int]:
    """The agent and its proxy workers (processes whose environment names this home)."""
    mark = f"DEVMESH_HOME={home}".encode()
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = (proc / "environ").read_bytes()
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if mark in environ.split(b"\0") and b"devmesh" in cmdline and b"nginx" not in cmdline:
            pids.append(int(proc.name))
    return pids


def wrk(port: int, conns: int, duration: float, host: str | None = None) -> dict[str, float]:
    cmd = ["wrk", "-t1", f"-c{conns}", f"-d{duration:g}s", "--latency"]
    if host:
        cmd += ["-H", f"Host: {host}"]
    out = subprocess.run(
        [*cmd, f"http://127.0.0.1:{port}/"],
        capture_output=True,
        text=True,
        timeout=duration + 30,
        check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))

    def pct(p: str) -> float:
        m = re.search(rf"\s{p}%\s+([\d.]+)(us|ms|s)\b", out)
        if m is None:
            return float("nan")
        scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]
        return float(m.group(1)) * scale

    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "rps": rps,
        "p50": pct("50"),
        "p99": pct("99"),
        "non2xx": float(errors.group(1)) if errors else 0.0,
    }


def median_run(runs: list[dict[str, float]]) -> dict[str, float]:
    """Each measure's median across runs (a noisy run moves no figure)."""
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def stream_gib(port: int, host: str | None, pid: int | None) -> tuple[float, int]:
    """Seconds to download 1 GiB with curl, and the peak RSS (KiB) of pid meanwhile."""
    peak = [rss_kib(pid) if pid else 0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            if pid:
                peak[0] = max(peak[0], rss_kib(pid))
            time.sleep(0.05)

    t = threading.Thread(target=sample)
    t.start()
    cmd = ["curl", "-sSf", "-o", "/dev/null", "--noproxy", "*", "-w", "%{size_download}"]
    if host:
        cmd += ["-H", f"Host: {host}"]
    start = time.perf_counter()
    out = subprocess.run(
        [*cmd, f"http://127.0.0.1:{port}/big"],
        check=True,
        timeout=120,
        capture_output=True,
        text=True,
    ).stdout
    elapsed = time.perf_counter() - start
    if int(out) != GIB:
        raise RuntimeError(f"downloaded {out} bytes, expected {GIB}")
    done.set()
    t.join()
    return elapsed, peak[0]


WS_SERVER = """
import asyncio, sys
from websockets.asyncio.server import serve
async def echo(ws):
    async for m in ws:
        await ws.send(m)
async def main():
    async with serve(echo, "127.0.0.1", int(sys.argv[1]), compression=None):
        print("ready", flush=True)
        await asyncio.Future()
asyncio.run(main())
"""


def ws_rate(port: int, host: str, duration: float) -> float:
    from websockets.sync.client import connect

    sock = socket.create_connection(("127.0.0.1", port))
    count = 0
    with connect(f"ws://{host}:{port}/", sock=sock, proxy=None, compression=None) as ws:
        deadline = time.perf_counter() + duration
        start = time.perf_counter()
        while time.perf_counter() < deadline:
            ws.send(b"x" * 64)
            ws.recv()
            count += 1
        return count / (time.perf_counter() - start)


def stop_all(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its children (a proxy's workers)."""
    import psutil

    proc = psutil.Process(pid)
    total = 0.0
    for p in (proc, *proc.children(recursive=True)):
        try:
            t = p.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += t.user + t.system
    return total


def metrics_cost(args: argparse.Namespace) -> int:
    """The proxy's throughput with its metrics on and off, in one run (``--metrics``)."""
    procs: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory(prefix="devmesh-bench-") as tmpdir:
        tmp = Path(tmpdir)
        tmp.chmod(0o755)
        up, wsp = free_port(), free_port()
        try:
            procs.append(
                start_nginx(
                    tmp,
                    "upstream",
                    f"""
                server {{
                    listen 127.0.0.1:{up};
                    location = / {{ return 200 "hello from nginx\\n"; }}
                }}""",
                )
            )
            extra = ("--no-uvloop",) if args.no_uvloop else ()
            targets = []
            for workers in (1, 2):
                for label, flags in (("on", ()), ("off", ("--no-metrics",))):
                    proc, port = start_devmesh(tmp, up, wsp, workers, extra=(*extra, *flags))
                    procs.append(proc)
                    targets.append((f"{workers}p metrics {label}", port, proc))
            for port in (up, *(port for _, port, _ in targets)):
                wait_port(port)
            for _, port, _ in targets:
                wrk(port, 32, 1, "api.localhost")  # warm up
            # On a shared machine the wall-clock rate of one run moves with the neighbours'
            # load; the proxy's own CPU time per request does much less. Both are reported,
            # each the median of its runs; rounds alternate the order (on/off, off/on).
            runs: dict[str, list[dict[str, float]]] = {name: [] for name, _, _ in targets}
            for round_ in range(args.rounds):
                order = targets if round_ % 2 == 0 else targets[::-1]
                for name, port, proc in order:
                    before = cpu_seconds(proc.pid)
                    r = wrk(port, 32, args.duration, "api.localhost")
                    spent = cpu_seconds(proc.pid) - before
                    r["cpu_us"] = spent / (r["rps"] * args.duration) * 1e6
                    runs[name].append(r)
            results = {name: median_run(r) for name, r in runs.items()}
            print(f"{'target':18} {'c32 req/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'CPU us/req':>10}")
            for name, r in results.items():
                print(
                    f"{name:18} {r['rps']:10.0f} {r['p50']:8.3f} {r['p99']:8.3f}"
                    f" {r['cpu_us']:10.1f}"
                )
            print()
            for workers in (1, 2):
                on, off = results[f"{workers}p metrics on"], results[f"{workers}p metrics off"]
                print(
                    f"{workers} process(es), metrics on/off:"
                    f" throughput {on['rps'] / off['rps']:.3f}x,"
                    f" requests per proxy CPU-second {off['cpu_us'] / on['cpu_us']:.3f}x"
                )
        finally:
            stop_all(procs)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per wrk run")
    parser.add_argument(
        "--compare",
        type=Path,
        default=None,
        metavar="DIR",
        help="also measure the proxy of this source tree, as 'base'",
    )
    parser.add_argument("--rounds", type=int, default=3, help="median of this many runs")
    parser.add_argument("--no-uvloop", action="store_true", help="devmesh without uvloop")
    parser.add_argument(
        "--metrics",
        action="store_true",
        help="only the proxy with its metrics on vs off (same run), and their ratio",
    )
    args = parser.parse_args()
    for tool in ("wrk", "nginx", "curl"):
        if shutil.which(tool) is None:
            print(f"missing {tool}: apt-get install -y wrk nginx-light curl (caddy optional)")
            return 2
    if args.metrics:
        return metrics_cost(args)
    have_caddy = shutil.which("caddy") is not None
    procs: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory(prefix="devmesh-bench-") as tmpdir:
        tmp = Path(tmpdir)
        tmp.chmod(0o755)  # nginx workers run as an unprivileged user and must read /big
        with open(tmp / "big", "wb") as f:
            f.truncate(GIB)  # sparse: nginx sends it with sendfile, no disk I/O
        up, np_, cp, wsp = free_port(), free_port(), free_port(), free_port()
        try:
            procs.append(
                start_nginx(
                    tmp,
                    "upstream",
                    f"""
                server {{
                    listen 127.0.0.1:{up};
                    location = / {{ return 200 "hello from nginx\\n"; }}
                    location = /big {{ alias {tmp}/big; }}
                }}""",
                )
            )
            procs.append(
                start_nginx(
                    tmp,
                    "proxy",
                    f"""
                upstream app {{ server 127.0.0.1:{up}; keepalive 64; }}
                server {{
                    listen 127.0.0.1:{np_};
                    location / {{
                        proxy_pass http://app;
                        proxy_http_version 1.1;
                        proxy_set_header Connection "";
                    }}
                }}""",
                )
            )
            if have_caddy:
                procs.append(start_caddy(tmp, cp, up))
            ws = subprocess.Popen(
                [sys.executable, "-c", WS_SERVER, str(wsp)],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
            )
            procs.append(ws)
            assert ws.stdout is not None
            ws.stdout.readline()
            extra = ("--no-uvloop",) if args.no_uvloop else ()
            dm, dp = start_devmesh(tmp, up, wsp, extra=extra)
            procs.append(dm)
            dm2, dp2 = start_devmesh(tmp, up, wsp, workers=2, extra=extra)
            procs.append(dm2)
            big = (
                "location = / { return 200 'hello from nginx\\n'; }"
                f" location = /big {{ alias {tmp}/big; }}"
            )
            _, ap, agent_home = start_agent(tmp, big)
            for port in (up, np_, dp, dp2, ap) + ((cp,) if have_caddy else ()):
                wait_port(port)

            targets = [
                ("direct", up, None),
                ("nginx", np_, None),
                *([("caddy", cp, None)] if have_caddy else []),
                ("devmesh", dp, "api.localhost"),
                ("devmesh-2w", dp2, "api.localhost"),
                ("agent", ap, "api.localhost"),
            ]
            baselines = ("nginx", "caddy") if have_caddy else ("nginx",)
            base = None
            if args.compare is not None:
                base, bp = start_devmesh(tmp, up, wsp, src=args.compare.resolve())
                procs.append(base)
                wait_port(bp)
                targets.append(("base", bp, "api.localhost"))
            results: dict[str, dict[int, dict[str, float]]] = {}
            for _, port, host in targets:
                wrk(port, 32, 1, host)  # warm up
            # Rounds interleave the targets, and each figure is the median of its rounds: on a
            # shared 2-core machine one run of a target can land on a noisy moment.
            runs: dict[str, dict[int, list[dict[str, float]]]] = {
                name: {32: [], 1: []} for name, _, _ in targets
            }
            for _ in range(args.rounds):
                for name, port, host in targets:
                    for c in (32, 1):
                        runs[name][c].append(wrk(port, c, args.duration, host))
            for name, by_conns in runs.items():
                results[name] = {c: median_run(r) for c, r in by_conns.items()}
            print(
                f"{'target':10} {'c32 req/s':>10} {'p50 ms':>8} {'p99 ms':>8}"
                f" {'c1 req/s':>9} {'p50 ms':>8} {'p99 ms':>8}"
            )
            for name, r in results.items():
                print(
                    f"{name:10} {r[32]['rps']:10.0f} {r[32]['p50']:8.3f} {r[32]['p99']:8.3f}"
                    f" {r[1]['rps']:9.0f} {r[1]['p50']:8.3f} {r[1]['p99']:8.3f}"
                    + (f"  non-2xx={r[32]['non2xx']:.0f}" if r[32]["non2xx"] else "")
                )
            ngr, dir_ = results["nginx"], results["direct"]
            print()
            names = [n for n, _, _ in targets[1 + len(baselines) :]]
            for name in names:
                r = results[name]
                print(
                    f"{name}/nginx throughput (c32): {r[32]['rps'] / ngr[32]['rps']:.2f}x"
                    + (
                        f"   {name}/caddy: {r[32]['rps'] / results['caddy'][32]['rps']:.2f}x"
                        if have_caddy
                        else ""
                    )
                )
            for name in (*baselines, *names):
                r = results[name][1]
                print(
                    f"added latency at c1, {name:10}: p50 {r['p50'] - dir_[1]['p50']:+.3f} ms"
                    f"  p99 {r['p99'] - dir_[1]['p99']:+.3f} ms"
                )
            print(
                "goals: c32 at least 0.35x nginx and 0.9x Caddy; c1 added p50 at most 0.1 ms"
                f" (load average now {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)"
            )

            # Best of two runs each: the first one also warms page cache and socket buffers.
            direct_s = min(stream_gib(up, None, None)[0] for _ in range(2))
            print(f"\n1 GiB download: direct {GIB / direct_s / 1e6:.0f} MB/s")
            streamed = [("devmesh", dp, dm.pid)] + ([("base", bp, base.pid)] if base else [])
            pids = agent_pids(agent_home)
            print(f"  (the agent runs its proxy in {len(pids)} processes: {pids})")
            agent_pid = int((agent_home / "agent.pid").read_text().split()[0])
            for name, port, pid in [*streamed, ("agent", ap, agent_pid)]:
                runs = [stream_gib(port, "api.localhost", pid) for _ in range(2)]
                dm_s, peak = min(r[0] for r in runs), max(r[1] for r in runs)
                print(
                    f"  {name:8} {GIB / dm_s / 1e6:.0f} MB/s ({direct_s / dm_s:.2f}x direct),"
                    f" peak RSS {peak / 1024:.1f} MiB"
                )

            wd = ws_rate(wsp, "127.0.0.1", min(args.duration, 3))
            print(f"WebSocket echo (64 B, one connection): direct {wd:.0f} msg/s")
            for name, port, _ in streamed:
                wp = ws_rate(port, "ws.localhost", min(args.duration, 3))
                print(f"  {name:8} {wp:.0f} msg/s ({wp / wd:.2f}x direct)")
        finally:
            stop_agent(tmp / "agent-home")
            stop_all(procs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
