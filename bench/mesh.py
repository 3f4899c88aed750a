"""Benchmark of discovery: ten nodes in network namespaces (not a test; run as root).

    .venv/bin/python bench/mesh.py [--nodes 10] [--interval 2] [--idle 10] [--agents]
        [--backend broadcast|serf]

``--agents`` runs real devmesh agents instead of standalone nodes: one agent per namespace,
each applied a project with a ``mesh:`` section (discovery on the host's eth0) and one
shared service, read through each agent's control socket. It prints the time from the last
apply until every agent sees every other, from an agent's SIGKILL until all others expired
it, and the idle CPU of the agent processes (their services excluded). ``--backend serf``
turns broadcast off and has every agent join agent 0's Serf: the idle CPU then counts each
agent's ``serf`` child and its ``serf members`` polls, and a machine's death is its agent and
its ``serf`` killed together.

Prints:
- convergence: from the moment every node listens (and from the first launch) until every
  node sees every other alive (goal: under 1 s);
- death: from SIGKILL of one node until every other marks it expired (goal: TTL + 1 s,
  TTL = 3 x interval), and from SIGTERM (goodbye) until every other has dropped it;
- idle cost of the mesh: CPU of all node processes and bytes per second on the bridge;
- datagram size with 1 and with 200 shared services (services are not in the datagram).

Everything runs inside namespaces the benchmark creates (tests/netkit.py); nothing is sent
on the machine's real interfaces.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from netkit import Net, NodeProc, init_team, join_team

from devmesh.core import catalog, wire


def wait(check, timeout_s: float = 60.0) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if check():
            return time.monotonic()
        time.sleep(0.005)
    raise SystemExit("timed out")


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


def bridge_bytes(net: Net) -> int:
    out = subprocess.run(["ip", "-n", net.switch, "-j", "-s", "link", "show"], capture_output=True,
                         text=True, check=True).stdout  # fmt: skip
    return sum(
        link["stats64"]["rx"]["bytes"] for link in json.loads(out) if link["ifname"].startswith("v")
    )


def datagram_size(services: int) -> tuple[int, int]:
    cat = catalog.Catalog(
        node_id="ab" * 16,
        services=tuple(
            catalog.SharedService(
                name=f"service-{i}", project="project", version="1.2.3", health="healthy"
            )
            for i in range(services)
        ),
    )
    keys = wire.derive_keys("team", b"s" * 32)
    now_ms = int(time.time() * 1000)
    msg = wire.Announcement(
        kind=wire.Kind.HEARTBEAT,
        node_id="ab" * 16,
        node_name="n" * 20,
        address="10.250.7.10",
        port=7701,
        revision=cat.revision,
        sent_ms=now_ms,
        boot_ms=now_ms,
        seq=12345,
    )
    return len(wire.encode(msg, keys)), len(catalog.encode(cat))


AGENT_PROJECT = """\
version: 1
project: bench{i}
mesh:
  name: team
  discovery:
{discovery}    interval_s: {interval}
services:
  idle:
    version: 1.0.0
    command: {py} -c "import time; time.sleep(3600)"
    health: {{tcp: false}}
    share: true
"""


DISCOVERY = {
    "broadcast": "    interfaces: [eth0]\n",
    "serf": (
        "    broadcast: false\n    interfaces: [eth0]\n    serf:\n      join: ['{first}:7946']\n"
    ),
}


def agent_cpu(p: psutil.Process) -> float:
    """CPU seconds of an agent, its reaped children (``serf members``) and its live ``serf``."""
    t = p.cpu_times()
    total = t.user + t.system + t.children_user + t.children_system
    for child in p.children():
        with contextlib.suppress(psutil.Error):
            if child.name() == "serf":
                c = child.cpu_times()
                total += c.user + c.system
    return total


def run_agents(n: int, interval: float, idle_s: float, backend: str = "broadcast") -> None:
    """Ten real agents, one per namespace (see the module docstring)."""
    import threading

    from agentkit import Mesh

    from devmesh.agent.client import Client

    with Net(n) as net:
        agents = [Mesh(netns=net.hosts[i]) for i in range(n)]
        try:
            agents[0].mesh_init("agent0")
            for i in range(1, n):
                agents[i].mesh_join(agents[0], f"agent{i}")
            threads = [threading.Thread(target=m.start_agent) for m in agents]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            clients = [Client(m.home / "agent.sock", timeout_s=10) for m in agents]
            bare = [psutil.Process(m.agent_pid()) for m in agents]
            cpu0, t0 = sum(sum(q.cpu_times()[:2]) for q in bare), time.monotonic()
            time.sleep(idle_s)  # measuring a duration, not synchronising
            cpu1, t1 = sum(sum(q.cpu_times()[:2]) for q in bare), time.monotonic()
            print(
                f"agents: idle, {n} agents with nothing applied: CPU "
                f"{100 * (cpu1 - cpu0) / (t1 - t0):.2f}% of one core (the baseline)"
            )

            def alive(c: Client) -> set[str]:
                peers = c.request("GET", "/v1/status")["peers"]
                return {p["name"] for p in peers if p["state"] == "alive"}

            def up(i: int) -> None:
                m = agents[i]
                discovery = DISCOVERY[backend].format(first=net.address(0))
                text = AGENT_PROJECT.format(
                    i=i, interval=interval, py=sys.executable, discovery=discovery
                )
                m.cli("up", "-d", cwd=m.project(f"bench{i}", text), timeout=120, check=True)

            launched = time.monotonic()
            threads = [threading.Thread(target=up, args=(i,)) for i in range(n)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            applied = time.monotonic()
            done = wait(lambda: all(len(alive(c)) == n - 1 for c in clients))
            print(
                f"agents: every agent sees every other {ms(done - applied)} after the last "
                f"apply returned ({ms(done - launched)} after the first `up -d` began)"
            )
            catalogs = wait(
                lambda: all(
                    all(p["services"] for p in c.request("GET", "/v1/status")["peers"])
                    for c in clients
                )
            )
            print(f"agents: every agent holds every catalog {ms(catalogs - applied)} after it")

            ps = [psutil.Process(m.agent_pid()) for m in agents]
            cpu0 = sum(agent_cpu(q) for q in ps)
            b0, t0 = bridge_bytes(net), time.monotonic()
            time.sleep(idle_s)  # measuring a duration, not synchronising
            cpu1 = sum(agent_cpu(q) for q in ps)
            b1, t1 = bridge_bytes(net), time.monotonic()
            share = 100 * (cpu1 - cpu0) / (t1 - t0)
            print(
                f"agents ({backend}): idle, {n} agents together: CPU {share:.2f}% of one core "
                f"({share / n:.2f}% per agent, serf included); "
                f"{(b1 - b0) / (t1 - t0):.0f} bytes/s on the bridge"
            )

            ttl = 3 * interval
            victim = agents[-1]
            pid = victim.agent_pid()
            assert pid is not None
            killed = time.monotonic()
            net.kill_all(n - 1)  # the machine loses power: the agent and its serf at once

            def expired(c: Client) -> bool:
                peers = c.request("GET", "/v1/status")["peers"]
                return not any(
                    p["name"] == f"agent{n - 1}" and p["state"] == "alive" for p in peers
                )

            gone = wait(lambda: all(expired(c) for c in clients[:-1]))
            print(
                f"agents ({backend}): power loss of a machine: all {n - 1} others dropped it after "
                f"{ms(gone - killed)} (TTL {ttl:.1f} s, goal under {ttl + 1:.1f} s)"
            )
        finally:
            for m in agents:
                m.close()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--nodes", type=int, default=10)
    p.add_argument("--interval", type=float, default=2.0)
    p.add_argument("--idle", type=float, default=10.0)
    p.add_argument("--agents", action="store_true", help="real agents instead of nodes")
    p.add_argument(
        "--backend",
        choices=sorted(DISCOVERY),
        default="broadcast",
        help="with --agents: broadcast, or serf (broadcast off, all join agent 0)",
    )
    args = p.parse_args()
    n = args.nodes
    if args.agents:
        run_agents(n, args.interval, args.idle, args.backend)
        return
    names = [f"node{i}" for i in range(n)]
    with tempfile.TemporaryDirectory() as tmp_s, Net(n) as net:
        tmp = Path(tmp_s)
        init_team(tmp / names[0], names[0])
        for name in names[1:]:
            join_team(tmp / name, tmp / names[0], name)
        launched = time.monotonic()
        procs: list[NodeProc] = []
        try:
            # Start all processes first, then wait for each "ready" line.
            nodes = []
            import threading

            def launch(i: int) -> None:
                api = {"name": "api", "project": "p", "version": "1.0.0", "health": "healthy"}
                argv = ["--interfaces", "eth0", "--interval", str(args.interval)]
                nodes.append(NodeProc(tmp / names[i], argv, net=net, host=i, services=[api]))

            threads = [threading.Thread(target=launch, args=(i,)) for i in range(n)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            procs = nodes
            all_ready = time.monotonic()
            done = wait(lambda: all(len(x.alive_peers()) == n - 1 for x in procs))
            print(
                f"convergence: {ms(done - all_ready)} after the last node listened "
                f"({ms(done - launched)} after the first launch, Python start-up included)"
            )
            catalogs = wait(
                lambda: all(all(p["services"] for p in x.status()["peers"]) for x in procs)
            )
            print(
                f"catalogs: every node holds every catalog {ms(catalogs - all_ready)} "
                "after the last listened"
            )

            # Idle cost.
            ps = [psutil.Process(x.proc.pid) for x in procs]
            cpu0 = sum(sum(q.cpu_times()[:2]) for q in ps)
            b0, t0 = bridge_bytes(net), time.monotonic()
            time.sleep(args.idle)  # measuring a duration, not synchronising
            cpu1 = sum(sum(q.cpu_times()[:2]) for q in ps)
            b1, t1 = bridge_bytes(net), time.monotonic()
            cpu = 100 * (cpu1 - cpu0) / (t1 - t0)
            print(
                f"idle mesh of {n}, interval {args.interval} s: CPU {cpu:.2f}% of one core for "
                f"all nodes together; {(b1 - b0) / (t1 - t0):.0f} bytes/s on the bridge"
            )

            ttl = 3 * args.interval
            victim = procs[-1]
            others = procs[:-1]
            killed = time.monotonic()
            victim.stop(signal.SIGKILL)
            gone = wait(
                lambda: all(
                    (x.peer(victim.home.name) or {}).get("state") == "expired" for x in others
                )
            )
            print(
                f"death (SIGKILL): all {n - 1} others expired it after {ms(gone - killed)} "
                f"(TTL {ttl:.1f} s, goal under {ttl + 1:.1f} s)"
            )
            leaver = procs[-2]
            rest = procs[:-2]
            left = time.monotonic()
            leaver.stop(signal.SIGTERM)
            dropped = wait(lambda: all(x.peer(leaver.home.name) is None for x in rest))
            print(f"clean stop (goodbye): all {n - 2} others dropped it after {ms(dropped - left)}")
        finally:
            for x in procs:
                x.stop(signal.SIGKILL)
    for count in (1, 200):
        size, cat_size = datagram_size(count)
        print(
            f"{count} services: datagram {size} bytes (limit {wire.MAX_DATAGRAM_BYTES}); "
            f"catalog {cat_size} bytes"
        )


if __name__ == "__main__":
    main()
