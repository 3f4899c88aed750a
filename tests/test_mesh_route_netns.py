"""Calls that cross machines: four network-namespace "machines" of one team, one agent each on
three of them, all running project ``shop``.

    alpha  web, webfeat (branch feat), strict: callers; declares api, legacy, pool, loop
           without a command (they run elsewhere)
    beta   api 2.3.0, legacy 1.9.0, pool, loop, x, sick (unhealthy once
           COUNT_DIR/sick exists) (all shared),
           private (not shared); declares y; mesh.allow is alpha and gamma only
    gamma  api 2.3.0 under branch feat, pool, loop, y (all shared); declares x
    delta  a team member's identity and no agent: the peer outside beta's mesh.allow

``loop`` is shared by beta and gamma, passes its health check (a command) and listens on
nothing, so no instance can serve it: the case where an owner that forwarded again would
send the call around between beta and gamma.

One set of machines serves every test of the module (starting four namespaces and three
agents costs seconds); no test changes what runs. Requests are made from inside alpha's
namespace with real clients (``netkit.NsHTTP``, websockets) over sockets made there.
Discovery runs on each machine's ``eth0``, whose subnet exists only inside these namespaces.
"""

from __future__ import annotations

import json
import ssl
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from agentkit import PY, ROUTE_SERVICE, Machines
from netkit import NETNS, NsHTTP, ns_socket, wait_for

from devmesh.mesh import channel
from devmesh.mesh import identity as ids

pytestmark = [
    pytest.mark.slow,
    NETNS,
]

ALPHA, BETA, GAMMA, DELTA = 0, 1, 2, 3
NAMES = ["alpha", "beta", "gamma", "delta"]
MESH_PORT = 7701
PROJECT = "shop"


def mesh_yaml(allow: str = "", policy: str = "") -> str:
    return (
        "version: 1\n"
        f"project: {PROJECT}\n"
        "mesh:\n"
        "  name: team\n"
        f"  port: {MESH_PORT}\n"
        f"{allow}"
        "  discovery:\n    interval_s: 0.3\n    interfaces: [eth0]\n"
        f"{policy}"
        "services:\n"
    )


def svc(name: str, version: str, node: str, count_dir: Path, extra: str = "") -> str:
    """A ROUTE_SERVICE instance, shared."""
    return (
        f"  {name}:\n    version: {version}\n    command: {PY} svc.py\n    share: true\n"
        f"    health: {{http: /healthz, interval_s: 0.5}}\n"
        f"    env: {{NODE: {node}, COUNT_DIR: '{count_dir}'}}\n{extra}"
    )


def dead(name: str) -> str:
    """Shared and healthy by its check, yet listening on nothing: no call to it can succeed."""
    return (
        f"  {name}:\n    version: 1.0.0\n    command: sleep 3600\n    share: true\n"
        "    port: auto\n    health: {command: 'true', interval_s: 0.5}\n"
    )


def alpha_yaml(count: Path) -> str:
    caller = f"    command: {PY} svc.py\n    env: {{NODE: alpha, COUNT_DIR: '{count}'}}\n"
    return (
        mesh_yaml(policy="policy:\n  versions: warn\n  balance: round_robin\n")
        + "  web:\n    version: 1.0.0\n"
        + caller
        + "    depends_on:\n      api: ^2.1\n      legacy: ^2.0\n      pool: ^1.0\n"
        + "  webfeat:\n    version: 1.0.0\n    branch: feat\n"
        + caller
        + "    depends_on:\n      api: ^2.1\n"
        + "  strict:\n    version: 1.0.0\n"
        + caller
        + "    depends_on:\n      legacy: {version: ^2.0, versions: reject}\n"
        + "  api: {}\n  legacy: {}\n  pool: {}\n  loop: {}\n"
    )


def beta_yaml(count: Path, allow: str) -> str:
    return (
        mesh_yaml(allow)
        + svc("api", "2.3.0", "beta", count)
        + svc("legacy", "1.9.0", "beta", count)
        + svc("pool", "1.0.0", "beta", count)
        + svc("x", "1.0.0", "beta", count)
        + dead("loop")
        + "  y: {}\n"
        + f"  private:\n    version: 1.0.0\n    command: {PY} svc.py\n"
        + f"    env: {{NODE: beta, COUNT_DIR: '{count}'}}\n"
        + f"  sick:\n    version: 1.0.0\n    command: {PY} svc.py\n    share: true\n    port: auto\n"
        + f"    health: {{command: 'test ! -e {count}/sick', interval_s: 0.3, retries: 1}}\n"
        + f"    env: {{NODE: beta, COUNT_DIR: '{count}'}}\n"
    )


def gamma_yaml(count: Path) -> str:
    return (
        mesh_yaml()
        + svc("api", "2.3.0", "gamma", count, "    branch: feat\n")
        + svc("pool", "1.0.0", "gamma", count)
        + svc("y", "1.0.0", "gamma", count)
        + dead("loop")
        + "  x: {}\n"
    )


class World:
    def __init__(self, machines: Machines, count_dir: Path) -> None:
        self.m = machines
        self.count_dir = count_dir
        self.alpha, self.beta, self.gamma = machines.agents[:3]

    # ------------------------------------------------------------------ clients in alpha

    def proxy(self) -> NsHTTP:
        """A client of alpha's proxy (Host decides the service; no caller)."""
        return NsHTTP(self.m.net.hosts[ALPHA], "127.0.0.1", self.alpha.proxy_port)

    def service(self, name: str) -> NsHTTP:
        """A client of one of alpha's own services (its port, inside alpha)."""
        port = self.alpha.services(PROJECT)[name]["port"]
        return NsHTTP(self.m.net.hosts[ALPHA], "127.0.0.1", int(port))

    def env(self, caller: str) -> dict[str, str]:
        with self.service(caller) as c:
            status, doc = c.get_json("/env")
        assert status == 200, doc
        return doc

    def call(self, caller: str, dep: str, path: str = "/") -> dict[str, Any]:
        """What ``caller`` got when it called its ``DEP_URL`` + path."""
        with self.service(caller) as c:
            status, doc = c.get_json(f"/call?dep={dep}&path={path}")
        assert status == 200, doc
        return doc

    def host_get(self, host: str, path: str = "/", headers: dict[str, str] | None = None) -> Any:
        with self.proxy() as c:
            return c.request(
                "GET", path, headers={"Host": f"{host}:{self.alpha.proxy_port}", **(headers or {})}
            )

    # ------------------------------------------------------------------ observations

    def served(self, service: str, node: str) -> int:
        """Requests the instance of ``service`` on ``node`` answered so far."""
        try:
            return len((self.count_dir / f"{service}-{node}.log").read_text().splitlines())
        except FileNotFoundError:
            return 0

    def route(self, caller: str, service: str) -> dict[str, Any] | None:
        rows = self.alpha.status(PROJECT).get("routes") or []
        return next((r for r in rows if r["caller"] == caller and r["service"] == service), None)

    def flushed(self, i: int) -> list[dict[str, Any]]:
        """Machine i's access log once everything its proxy answered so far is in it: a marker
        request is made there and waited for (entries are written in the order answered)."""
        mark = f"/flush-mark-{uuid.uuid4().hex}"
        agent = self.m.agents[i]
        with NsHTTP(self.m.net.hosts[i], "127.0.0.1", agent.proxy_port) as c:
            c.request("GET", mark, headers={"Host": f"nothing.localhost:{agent.proxy_port}"})
        return wait_for(
            f"the marker in {NAMES[i]}'s access log",
            lambda: (e := agent.access_entries()) and any(x.get("path") == mark for x in e) and e,
        )

    def peer_tls(self, i: int, to: int) -> ssl.SSLSocket:
        """A TLS connection from machine i (its node certificate) to machine ``to``'s peer
        listener, made inside machine i's namespace."""
        identity = ids.load(self.m.agents[i].home)
        ctx = channel.client_context(identity)
        ctx.check_hostname = False  # the server's name is checked by the team CA chain only
        raw = ns_socket(self.m.net.hosts[i], self.m.net.address(to), MESH_PORT)
        return ctx.wrap_socket(raw)


def raw_request(sock: ssl.SSLSocket, head: str) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 request over ``sock`` (closed after); (status, headers, body)."""
    import http.client

    try:
        sock.sendall(head.encode())
        resp = http.client.HTTPResponse(sock)
        try:
            resp.begin()
            body = resp.read()
        finally:
            resp.close()
    finally:
        sock.close()
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    count = tmp_path_factory.mktemp("counts")
    count.chmod(0o777)
    machines = Machines(NAMES)
    try:
        files = {"svc.py": ROUTE_SERVICE}
        allow = (
            f"  allow: ['{machines.net.address(ALPHA)}/32', '{machines.net.address(GAMMA)}/32']\n"
        )
        machines.up(BETA, PROJECT, beta_yaml(count, allow), files)
        machines.up(GAMMA, PROJECT, gamma_yaml(count), files)
        machines.up(ALPHA, PROJECT, alpha_yaml(count), files)
        w = World(machines, count)

        def shared_seen() -> bool:
            peers = {p["name"]: p for p in w.alpha.peers()["peers"]}
            want = {"beta": {"api", "legacy", "pool", "x", "loop"}, "gamma": {"api", "pool", "y"}}
            for node, names in want.items():
                p = peers.get(node) or {}
                healthy = {s["name"] for s in p.get("services", []) if s["health"] == "healthy"}
                if p.get("state") != "alive" or not names <= healthy:
                    return False
            return True

        w.alpha.wait_for(shared_seen, timeout=60, what="beta's and gamma's services on alpha")
        yield w
    finally:
        machines.close()


def test_web_on_alpha_calls_api_that_runs_only_on_beta(world: World) -> None:
    env = world.env("web")
    assert env["API_URL"].startswith("http://127.0.0.1:")  # its edge listener, never a peer
    before = world.served("api", "beta")
    got = world.call("web", "API", "/hello")
    assert got["status"] == 200, got
    assert got["body"]["node"] == "beta" and got["body"]["path"] == "/hello"
    seen = got["body"]["headers"]
    assert "x-devmesh-service" not in seen  # removed before the service sees the request
    assert "x-devmesh-branch" not in seen  # web runs under no branch
    assert world.served("api", "beta") == before + 1
    route = world.route("web", "api")
    assert route is not None and route["target"] == "peer" and route["node"] == "beta", route
    assert route["version"] == "2.3.0" and route["warning"] is None
    a_log = [e for e in world.flushed(ALPHA) if e.get("path") == "/hello"]
    assert a_log and a_log[-1]["route"] == "peer" and a_log[-1]["node"] == "beta", a_log
    b_log = [e for e in world.flushed(BETA) if e.get("path") == "/hello"]
    assert b_log and b_log[-1]["caller"] == "peer alpha" and b_log[-1]["status"] == 200, b_log


@pytest.mark.parametrize(
    ("host", "headers"),
    [
        ("api.localhost", {"X-Devmesh-Branch": "feat"}),
        ("api.localhost", {"baggage": "userid=7,devmesh-branch=feat;p=1"}),
        ("api.feat.localhost", {}),
    ],
    ids=["header", "baggage", "host"],
)
def test_a_branch_is_routed_to_its_instance_wherever_it_runs(
    world: World, host: str, headers: dict[str, str]
) -> None:
    resp = world.host_get(host, "/branch", headers)
    assert resp.status == 200, resp.body
    doc = json.loads(resp.body)
    assert doc["node"] == "gamma" and doc["branch"] == "feat", doc
    assert doc["headers"].get("x-devmesh-branch") == "feat"  # the owner is told the branch
    default = world.host_get("api.localhost", "/branch")
    assert default.status == 200 and json.loads(default.body)["node"] == "beta"


def test_an_invalid_branch_name_is_a_400_naming_it(world: World) -> None:
    resp = world.host_get("api.localhost", "/", {"X-Devmesh-Branch": "bad..name"})
    assert resp.status == 400
    assert b"bad..name" in resp.body


def test_a_caller_started_under_a_branch_calls_that_branch_and_passes_it_on(world: World) -> None:
    assert world.env("webfeat").get("DEVMESH_BRANCH") == "feat"
    assert "DEVMESH_BRANCH" not in world.env("web")
    got = world.call("webfeat", "API", "/from-feat")
    assert got["status"] == 200, got
    assert got["body"]["node"] == "gamma" and got["body"]["branch"] == "feat"
    assert got["body"]["headers"].get("x-devmesh-branch") == "feat"  # added by alpha's proxy
    route = world.route("webfeat", "api")
    assert route is not None and route["node"] == "gamma" and route["branch"] == "feat", route


def test_a_version_outside_the_range_is_routed_with_a_warning_under_warn(world: World) -> None:
    got = world.call("web", "LEGACY", "/old")
    assert got["status"] == 200, got
    assert got["body"]["node"] == "beta"
    warning = got["headers"].get("x-devmesh-version-warning")
    assert warning and "1.9.0" in warning and "^2.0" in warning, got["headers"]
    route = world.route("web", "legacy")
    assert route is not None and route["node"] == "beta" and route["warning"], route
    world.alpha.wait_for(
        lambda: any(
            "legacy" in line and "1.9.0" in line for line in world.alpha.agent_log().splitlines()
        ),
        what="the warning in alpha's agent log",
    )


def test_reject_answers_409_naming_caller_range_versions_and_where(world: World) -> None:
    before = world.served("legacy", "beta")
    got = world.call("strict", "LEGACY", "/old")
    assert got["status"] == 409, got
    text = json.dumps(got["body"])
    for word in ("strict", "^2.0", "1.9.0", "beta"):
        assert word in text, (word, text)
    assert world.served("legacy", "beta") == before  # nothing was forwarded
    route = world.route("strict", "legacy")
    assert route is not None and route["target"] is None, route


def test_round_robin_spreads_calls_evenly_over_beta_and_gamma(world: World) -> None:
    calls = 40
    nodes: list[str] = []
    with world.proxy() as c:
        for _ in range(calls):
            status, doc = c.get_json("/rr", {"Host": f"pool.localhost:{world.alpha.proxy_port}"})
            assert status == 200, doc
            nodes.append(doc["node"])
    assert set(nodes) == {"beta", "gamma"}
    for node in ("beta", "gamma"):
        assert abs(nodes.count(node) - calls / 2) <= 0.2 * calls / 2, nodes


def test_websocket_crosses_the_hop(world: World) -> None:
    from websockets.sync.client import connect

    port = world.alpha.proxy_port
    sock = ns_socket(world.m.net.hosts[ALPHA], "127.0.0.1", port)
    with connect(f"ws://api.localhost:{port}/ws", sock=sock, open_timeout=10) as ws:
        for text in ("one", "two", "x" * 300):
            ws.send(text)
            assert ws.recv(timeout=10) == f"beta: {text}"


def test_sse_crosses_the_hop_event_by_event(world: World) -> None:
    url = world.env("web")["API_URL"]  # web's own edge: the caller's range applies
    port = int(url.rsplit(":", 1)[1].strip("/"))
    with NsHTTP(world.m.net.hosts[ALPHA], "127.0.0.1", port) as c:
        resp = c.request("GET", "/sse?n=5&interval=0.05", stream=True)
        assert resp.status == 200
        assert resp.getheader("Content-Type", "").startswith("text/event-stream")
        events: list[str] = []
        while len(events) < 5:
            line = resp.fp.readline()
            assert line, f"stream ended after {events}"
            if line.startswith(b"data: "):
                events.append(line[6:].strip().decode())
        assert events == [f"beta {i}" for i in range(5)]


def test_a_peer_outside_mesh_allow_is_refused_and_counted(world: World) -> None:
    def refused() -> int:
        return int(world.beta.peers()["drops"].get("channel-refused", 0))

    before, served = refused(), world.served("api", "beta")
    sock = world.peer_tls(DELTA, BETA)  # delta holds a team certificate
    status, _, body = raw_request(
        sock,
        "GET /from-delta HTTP/1.1\r\nHost: api.localhost\r\n"
        f"x-devmesh-service: api.{PROJECT}\r\nConnection: close\r\n\r\n",
    )
    assert status == 403
    assert json.loads(body) == {"error": "refused by mesh.allow"}
    world.beta.wait_for(lambda: refused() > before, what="the refusal counted on beta")
    assert world.served("api", "beta") == served
    # alpha, inside mesh.allow, is served on the same listener
    status, _, body = raw_request(
        world.peer_tls(ALPHA, BETA),
        "GET /from-alpha HTTP/1.1\r\nHost: api.localhost\r\n"
        f"x-devmesh-service: api.{PROJECT}\r\nConnection: close\r\n\r\n",
    )
    assert status == 200 and json.loads(body)["node"] == "beta"


def test_peers_announcing_each_others_services_make_no_loop(world: World) -> None:
    # beta and gamma both announce `loop`, healthy, and neither can serve it.
    resp = world.host_get("loop.localhost", "/around")
    assert resp.status == 502, resp.body
    assert b"loop" in resp.body  # the 502 names the service
    on_beta = [e for e in world.flushed(BETA) if e.get("path") == "/around"]
    on_gamma = [e for e in world.flushed(GAMMA) if e.get("path") == "/around"]
    # each owner got the call at most once (alpha may try both, the GET once elsewhere), and
    # only from alpha: neither forwarded it to the other
    assert len(on_beta) <= 1 and len(on_gamma) <= 1, (on_beta, on_gamma)
    assert {e["caller"] for e in on_beta + on_gamma} <= {"peer alpha"}, (on_beta, on_gamma)
    assert on_beta or on_gamma

    # beta shares x and declares y (gamma's); gamma the other way round. Asked for what it
    # only declares, an owner answers "unavailable" and never forwards.
    x_beta, y_gamma = world.served("x", "beta"), world.served("y", "gamma")
    for to, service in ((BETA, "y"), (GAMMA, "x")):
        status, headers, _ = raw_request(
            world.peer_tls(ALPHA, to),
            f"GET /declared-only HTTP/1.1\r\nHost: {service}.localhost\r\n"
            f"x-devmesh-service: {service}.{PROJECT}\r\nConnection: close\r\n\r\n",
        )
        assert status == 404 and headers.get("x-devmesh-unavailable") == "1", (service, status)
    assert world.served("x", "beta") == x_beta and world.served("y", "gamma") == y_gamma
    for i in (BETA, GAMMA):
        callers = {e.get("caller") for e in world.flushed(i) if e.get("path") == "/declared-only"}
        assert callers <= {"peer alpha"}, callers


def test_the_peer_listener_serves_team_members_their_shared_running_services_only(
    world: World,
) -> None:
    status, headers, body = raw_request(
        world.peer_tls(ALPHA, BETA),
        "GET /mesh/v1/catalog HTTP/1.1\r\nHost: beta\r\nConnection: close\r\n\r\n",
    )
    assert status == 200 and headers["content-type"].startswith("application/json")
    assert "api" in body.decode() and "private" not in body.decode()
    status, _, _ = raw_request(
        world.peer_tls(ALPHA, BETA),
        "POST /mesh/v1/catalog HTTP/1.1\r\nHost: beta\r\nContent-Length: 0\r\n"
        "Connection: close\r\n\r\n",
    )
    assert status == 405
    (world.count_dir / "sick").touch()  # its health check fails from now on
    world.beta.wait_for(
        lambda: world.beta.services(PROJECT)["sick"].get("health") == "unhealthy",
        what="sick unhealthy on beta",
    )
    private, sick = world.served("private", "beta"), world.served("sick", "beta")
    for service, want in (("private", 404), ("nothing", 404), ("sick", 503)):
        status, headers, _ = raw_request(
            world.peer_tls(ALPHA, BETA),
            f"GET /not-for-peers HTTP/1.1\r\nHost: {service}.localhost\r\n"
            f"x-devmesh-service: {service}.{PROJECT}\r\nConnection: close\r\n\r\n",
        )
        assert (status, headers.get("x-devmesh-unavailable")) == (want, "1"), service
    assert world.served("private", "beta") == private and world.served("sick", "beta") == sick
    # without a team certificate there is no TLS session at all
    ctx = ssl.create_default_context(cafile=str(ids.load(world.alpha.home).ca_path))
    ctx.check_hostname = False
    raw = ns_socket(world.m.net.hosts[ALPHA], world.m.net.address(BETA), MESH_PORT)
    try:
        with pytest.raises((ssl.SSLError, ConnectionError)):
            tls = ctx.wrap_socket(raw)
            raw_request(tls, "GET /mesh/v1/catalog HTTP/1.1\r\nHost: beta\r\n\r\n")
    finally:
        raw.close()


def test_devmesh_route_and_status_explain_where_calls_cross_to(world: World) -> None:
    folder = world.alpha.root / PROJECT
    out = world.alpha.cli("route", "api", "--caller", "web", cwd=folder)
    assert out.returncode == 0, out.stderr
    first = out.stdout.splitlines()[0]
    assert "web" in first and "beta" in first and "2.3.0" in first, out.stdout
    doc = json.loads(
        world.alpha.cli("route", "api", "--caller", "web", "--json", cwd=folder).stdout
    )
    assert (doc["outcome"], doc["target"], doc["node"], doc["version"]) == (
        "route",
        "peer",
        "beta",
        "2.3.0",
    ), doc
    feat = json.loads(
        world.alpha.cli("route", "api", "--branch", "feat", "--json", cwd=folder).stdout
    )
    assert (feat["target"], feat["node"], feat["branch"]) == ("peer", "gamma", "feat"), feat
    rejected = world.alpha.cli("route", "legacy", "--caller", "strict", cwd=folder)
    assert rejected.returncode == 1 and "409" in rejected.stdout, rejected.stdout
    text = world.alpha.cli("status", cwd=folder, check=True).stdout
    assert any("web" in line and "api" in line and "beta" in line for line in text.splitlines())


def test_a_large_body_crosses_the_hop(world: World) -> None:
    body = bytes(range(256)) * (16 * 1024)  # 4 MiB
    with world.proxy() as c:
        resp = c.request(
            "POST",
            "/upload",
            body=body,
            headers={"Host": f"api.localhost:{world.alpha.proxy_port}"},
        )
    assert resp.status == 200, resp.body[:300]
    doc = json.loads(resp.body)
    assert (doc["node"], doc["method"], doc["body_length"]) == ("beta", "POST", len(body))
