"""Route selection in the proxy: failover, retries, down marks, versions, branches, explain.

Real services on loopback and real clients; the down marks' clock is injected (a list the
test moves), never slept on.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import proxykit
import pytest

from devmesh.core import model, routes
from devmesh.proxy import routesfile, selection, table

EDGE = table.Edge(caller_project="shop", caller_service="web", target_service="api")


def needs(range_text: str, versions: model.VersionPolicy, **kw: object) -> table.CallerRule:
    return table.CallerRule(
        caller="web",
        requirements=(routes.Requirement(range_text=range_text, declared_by="web"),),
        settings=routes.Settings(versions=versions, **kw),  # type: ignore[arg-type]
    )


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def proxy(tmp_path: Path, clock: Clock) -> Iterator[proxykit.InProcessProxy]:
    p = proxykit.InProcessProxy(
        table.RouteTable(), tmp_path / "proxy", router=selection.Router(clock=clock)
    )
    try:
        yield p
    finally:
        p.close()


def edge_port(proxy: proxykit.InProcessProxy) -> int:
    return proxy.call(proxy.server.set_edges({EDGE: None}))[EDGE]


def get(url: str, method: str = "GET", **kw: object) -> httpx.Response:
    with httpx.Client(trust_env=False, timeout=10) as client:
        return client.request(method, url, **kw)  # type: ignore[arg-type]


def test_refused_connection_fails_over_marks_down_and_the_probe_brings_it_back(proxy, clock):
    with proxykit.upstream() as fallback, proxykit.upstream() as later:
        dead = proxykit.free_port()
        local = table.Backend(project="shop", service="api", port=dead)
        route = table.MeshRoute(
            project="shop", service="api", fallback=f"http://127.0.0.1:{fallback.port}/base"
        )
        proxy.table = table.RouteTable(backends=(local,), mesh=(route,))
        port = edge_port(proxy)
        r = get(f"http://127.0.0.1:{port}/x", "POST", content=b"payload")
        assert r.status_code == 200  # nothing was sent to the dead port: any method moves on
        assert r.json()["path"] == "/base/x"
        assert ["host", f"127.0.0.1:{fallback.port}"] in r.json()["headers"]
        # Marked down: the next call does not even try the local port.
        decision = proxy.on_loop(lambda: proxy.server.explain("shop", "api", caller="web"))
        assert "marked down (service 'api' is not reachable: connection refused" in (
            decision.explanation
        )
        assert decision.chosen.kind is routes.Kind.FALLBACK
        # The local service comes up, but the mark holds until it expires...
        proxy.table = table.RouteTable(
            backends=(table.Backend(project="shop", service="api", port=later.port),),
            mesh=(route,),
        )
        assert get(f"http://127.0.0.1:{port}/y").json()["path"] == "/base/y"
        assert later.connections == 0
        # ...then the next call is the probe, and it stays local.
        clock.now += selection.DOWN_MARK_S + 0.1
        assert get(f"http://127.0.0.1:{port}/z").json()["path"] == "/z"
        assert get(f"http://127.0.0.1:{port}/z").json()["path"] == "/z"
        entries = proxy.wait_entries(4)
        assert [e["route"] for e in entries] == ["fallback"] * 2 + ["local"] * 2
        assert proxy.on_loop(lambda: proxy.server.forwarder.router.down) == {("shop", "api"): {}}


def _dies_before_answering(conn: socket.socket, number: int) -> None:
    proxykit.read_head(conn)  # the request arrives; the service dies without a byte


@pytest.mark.parametrize(("method", "retried"), [("GET", True), ("DELETE", True), ("POST", False)])
def test_idempotent_request_is_retried_once_when_the_upstream_dies(proxy, method, retried):
    with proxykit.RawService(_dies_before_answering) as dying, proxykit.upstream() as fallback:
        proxy.table = table.RouteTable(
            backends=(table.Backend(project="shop", service="api", port=dying.port),),
            mesh=(
                table.MeshRoute(
                    project="shop", service="api", fallback=f"http://127.0.0.1:{fallback.port}"
                ),
            ),
        )
        r = get(f"http://127.0.0.1:{edge_port(proxy)}/once", method)
        if retried:
            assert r.status_code == 200
            assert r.json()["method"] == method
        else:
            assert r.status_code == 502
            assert "closed before a response" in r.text
            assert fallback.connections == 0
        assert dying.accepted == 1


def test_nothing_left_is_a_502_naming_every_target_tried(proxy):
    dead = [proxykit.free_port() for _ in range(2)]
    proxy.table = table.RouteTable(
        backends=(table.Backend(project="shop", service="api", port=dead[0]),),
        mesh=(
            table.MeshRoute(project="shop", service="api", fallback=f"http://127.0.0.1:{dead[1]}"),
        ),
    )
    r = get(f"http://127.0.0.1:{edge_port(proxy)}/")
    assert r.status_code == 502
    assert "no target of 'api' could answer: tried local api: " in r.text
    assert f"connection refused on 127.0.0.1:{dead[0]}" in r.text
    assert f"fallback http://127.0.0.1:{dead[1]}: " in r.text
    assert f"connection refused on 127.0.0.1:{dead[1]}" in r.text
    marks = proxy.on_loop(lambda: proxy.server.forwarder.router.down)[("shop", "api")]
    assert "local" in marks and "fallback" in marks  # a failed answer clears no mark


def test_reject_answers_409_naming_caller_range_and_versions(proxy):
    with proxykit.upstream() as up:
        proxy.table = table.RouteTable(
            backends=(table.Backend(project="shop", service="api", port=up.port, version="1.9.0"),),
            mesh=(
                table.MeshRoute(
                    project="shop",
                    service="api",
                    rules=(
                        needs("^2.1", model.VersionPolicy.REJECT),
                        table.CallerRule(
                            caller=None,
                            requirements=(
                                routes.Requirement(range_text="^2.1", declared_by="web"),
                            ),
                            settings=routes.Settings(versions=model.VersionPolicy.REJECT),
                        ),
                    ),
                ),
            ),
        )
        port = edge_port(proxy)
        r = get(f"http://127.0.0.1:{port}/")
        assert r.status_code == 409
        assert "web needs api ^2.1 and policy.versions is reject" in r.text
        assert "found only local api 1.9.0" in r.text
        r = get(f"http://127.0.0.1:{port}/", headers={"accept": "application/json"})
        assert r.status_code == 409 and "outside ^2.1" in r.json()["error"]
        assert up.connections == 0
        # A browser (no caller) is held to the project's declared ranges too.
        r = get(f"http://127.0.0.1:{proxy.port}/", headers={"host": "api.localhost"})
        assert r.status_code == 409


@pytest.mark.parametrize("with_fallback", [False, True])
def test_warn_routes_and_says_so_in_a_header(proxy, with_fallback):
    with proxykit.upstream() as up:
        proxy.table = table.RouteTable(
            backends=(table.Backend(project="shop", service="api", port=up.port, version="1.9.0"),),
            mesh=(
                table.MeshRoute(
                    project="shop",
                    service="api",
                    rules=(needs("^2.1", model.VersionPolicy.WARN),),
                    fallback="http://127.0.0.1:9" if with_fallback else None,
                ),
            ),
        )
        r = get(f"http://127.0.0.1:{edge_port(proxy)}/")
        assert r.status_code == 200
        assert r.headers["x-devmesh-version-warning"] == (
            "web needs api ^2.1; no compatible instance, so routed to local api 1.9.0"
        )


@pytest.fixture
def branch_nodes(tmp_path: Path) -> Iterator[tuple[proxykit.Node, proxykit.Node]]:
    a = proxykit.Node(tmp_path, "node-a")
    b = proxykit.Node(tmp_path, "node-b", bundle=a.bundle)
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def _hops(r: httpx.Response) -> int:
    """How many devmesh proxies the request went through (2: across the peer hop)."""
    return dict(r.json()["headers"])["via"].count("devmesh")


def test_branch_by_header_baggage_and_host_and_400_for_a_bad_name(branch_nodes):
    a, b = branch_nodes
    with proxykit.upstream() as default, proxykit.upstream() as feature:
        b.set_table(
            backends=(
                table.Backend(
                    project="shop", service="api", port=feature.port, shared=True, branch="feat/x"
                ),
                table.Backend(
                    project="shop", service="ui", port=feature.port, shared=True, branch="feat"
                ),
            )
        )
        a.set_table(
            backends=(table.Backend(project="shop", service="api", port=default.port),),
            mesh=(
                table.MeshRoute(
                    project="shop",
                    service="api",
                    peers=(b.instance("shop", "api", branch="feat/x"),),
                ),
                table.MeshRoute(
                    project="shop", service="ui", peers=(b.instance("shop", "ui", branch="feat"),)
                ),
            ),
        )
        url = f"http://127.0.0.1:{a.proxy.port}/"
        plain = get(url, headers={"host": "api.localhost"})
        assert _hops(plain) == 1 and "x-devmesh-branch" not in dict(plain.json()["headers"])
        by_header = get(url, headers={"host": "api.localhost", "x-devmesh-branch": "feat/x"})
        assert _hops(by_header) == 2
        assert ["x-devmesh-branch", "feat/x"] in by_header.json()["headers"]
        by_baggage = get(
            url, headers={"host": "api.localhost", "baggage": "k=v, devmesh-branch=feat%2Fx"}
        )
        assert _hops(by_baggage) == 2
        # By host (a service with no local backend, in a branch): ui.feat.localhost.
        by_host = get(url, headers={"host": "ui.feat.localhost"})
        assert _hops(by_host) == 2
        assert ["x-devmesh-branch", "feat"] in by_host.json()["headers"]
        assert get(url, headers={"host": "ui.feat.shop.localhost"}).status_code == 200
        bad = get(url, headers={"host": "api.localhost", "x-devmesh-branch": "feat..x"})
        assert bad.status_code == 400
        assert "branch name 'feat..x' cannot contain '..' (from the header)" in bad.text
        missing = get(url, headers={"host": "api.localhost", "x-devmesh-branch": "nope"})
        assert missing.status_code == 502 and "no route to api in branch nope" in missing.text
        assert default.connections == 1


def test_a_caller_under_a_branch_routes_there_and_propagates_the_header(branch_nodes):
    a, b = branch_nodes
    with proxykit.upstream() as default, proxykit.upstream() as feature:
        b.set_table(
            backends=(
                table.Backend(
                    project="shop", service="api", port=feature.port, shared=True, branch="feat"
                ),
            )
        )
        a.set_table(
            backends=(table.Backend(project="shop", service="api", port=default.port),),
            mesh=(
                table.MeshRoute(
                    project="shop",
                    service="api",
                    peers=(b.instance("shop", "api", branch="feat"),),
                    caller_branches=(("web", "feat"),),
                ),
            ),
        )
        port = a.proxy.call(a.proxy.server.set_edges({EDGE: None}))[EDGE]
        r = get(f"http://127.0.0.1:{port}/")
        assert _hops(r) == 2
        assert ["x-devmesh-branch", "feat"] in r.json()["headers"]
        decision = a.proxy.on_loop(lambda: a.proxy.server.explain("shop", "api", caller="web"))
        assert decision.request.branch == "feat"
        # The caller's branch, on a local instance: the header is added all the same.
        a.set_table(
            backends=(
                table.Backend(project="shop", service="api", port=default.port, branch="feat"),
            ),
            mesh=(
                table.MeshRoute(project="shop", service="api", caller_branches=(("web", "feat"),)),
            ),
        )
        r = get(f"http://127.0.0.1:{port}/")
        assert _hops(r) == 1
        assert ["x-devmesh-branch", "feat"] in r.json()["headers"]


def test_round_robin_across_peers_and_explain_does_not_advance(tmp_path):
    a = proxykit.Node(tmp_path, "node-a")
    b = proxykit.Node(tmp_path, "node-b", bundle=a.bundle)
    c = proxykit.Node(tmp_path, "node-c", bundle=a.bundle)
    try:
        with proxykit.upstream() as up:
            for node in (b, c):
                node.set_table(
                    backends=(
                        table.Backend(project="shop", service="api", port=up.port, shared=True),
                    )
                )
            a.set_table(
                mesh=(
                    table.MeshRoute(
                        project="shop",
                        service="api",
                        peers=(b.instance("shop", "api"), c.instance("shop", "api")),
                    ),
                )
            )
            explain = lambda: a.proxy.server.explain("shop", "api")  # noqa: E731
            first = a.proxy.on_loop(explain).chosen.node_name
            assert a.proxy.on_loop(explain).chosen.node_name == first  # no cursor moved
            for _ in range(10):
                assert (
                    get(
                        f"http://127.0.0.1:{a.proxy.port}/", headers={"host": "api.localhost"}
                    ).status_code
                    == 200
                )
            nodes = [e["node"] for e in a.proxy.wait_entries(10)]
            assert nodes[0] == first
            assert nodes.count("node-b") == nodes.count("node-c") == 5
            assert nodes[:2] in (["node-b", "node-c"], ["node-c", "node-b"])
            assert a.proxy.on_loop(lambda: a.proxy.server.explain("shop", "nope")) is None
    finally:
        for node in (a, b, c):
            node.close()


def test_a_peer_without_the_instance_counts_as_a_failed_connection(tmp_path, clock):
    a = proxykit.Node(tmp_path, "node-a", router=selection.Router(clock=clock))
    b = proxykit.Node(tmp_path, "node-b", bundle=a.bundle)
    try:
        with proxykit.upstream() as fallback, proxykit.upstream() as up:
            b.set_table(
                backends=(table.Backend(project="shop", service="api", port=up.port, shared=True),)
            )
            a.set_table(
                mesh=(
                    table.MeshRoute(
                        project="shop",
                        service="api",
                        peers=(b.instance("shop", "api"),),
                        fallback=f"http://127.0.0.1:{fallback.port}",
                    ),
                )
            )
            url = f"http://127.0.0.1:{a.proxy.port}/"
            with httpx.Client(trust_env=False, timeout=10) as client:
                assert client.get(url, headers={"host": "api.localhost"}).status_code == 200
                b.set_table()  # B shares nothing any more: it answers x-devmesh-unavailable
                # On A's pooled connection to B (the callback execution), then, once the
                # down mark expired, with a body (a task): both move on to the fallback.
                r = client.get(url, headers={"host": "api.localhost"})
                assert r.status_code == 200 and r.json()["method"] == "GET"
                clock.now += selection.DOWN_MARK_S
                r = client.post(url, headers={"host": "api.localhost"}, content=b"body")
                assert r.status_code == 200 and r.json()["body_length"] == 4
            entries = a.proxy.wait_entries(3)
            assert [e["route"] for e in entries] == ["peer", "fallback", "fallback"]
            assert b.proxy.wait_entries(3)[-1]["status"] == 404
            marks = a.proxy.on_loop(lambda: a.proxy.server.forwarder.router.down)
            assert f"peer:{b.identity.node_id}" in marks[("shop", "api")]
    finally:
        a.close()
        b.close()


def test_routesfile_carries_the_mesh_and_peer_tls(tmp_path):
    route = table.MeshRoute(
        project="shop",
        service="api",
        peers=(
            table.PeerInstance(
                node_id="ab" * 16,
                node_name="node-b",
                server_name="node-b.team.devmesh.internal",
                host="10.0.0.2",
                port=7946,
                project="shop",
                service="api",
                version="2.3.0",
                branch="feat",
                health="starting",
            ),
        ),
        fallback="https://api.example",
        rules=(
            needs(
                "^2.1",
                model.VersionPolicy.REJECT,
                prefer=model.Prefer.PEER,
                balance=routes.Balance.LEAST_OUTSTANDING,
            ),
            table.CallerRule(caller=None),
        ),
        caller_branches=(("web", "feat"),),
    )
    tls = table.PeerTLS(
        ca_file="/m/team-ca.pem",
        cert_file="/m/node.pem",
        key_file="/m/k.pem",
        node_id="x",
        node_name="node-a",
    )
    original = table.RouteTable(
        backends=(table.Backend(project="shop", service="web", port=1, shared=True),),
        mesh=(route,),
        peer_tls=tls,
    )
    path = tmp_path / "routes.json"
    routesfile.write(path, original, {EDGE: 4000})
    decoded, edges = routesfile.read(path)
    assert decoded == original and edges == {EDGE: 4000}
    assert decoded.mesh_route("shop", "api") == route


def test_a_standalone_proxy_routes_by_the_mesh_in_its_routes_file(tmp_path):
    """Worker processes and the standalone proxy read the same file: a service with only a
    fallback answers by host there too."""
    with proxykit.upstream() as fallback:
        doc = routesfile.encode(
            table.RouteTable(
                mesh=(
                    table.MeshRoute(
                        project="shop", service="api", fallback=f"http://127.0.0.1:{fallback.port}"
                    ),
                )
            ),
            {},
        )
        import json

        p = proxykit.ProxyProcess(json.loads(doc))
        try:
            r = get(f"http://127.0.0.1:{p.port}/far", headers={"host": "api.localhost"})
            assert r.status_code == 200 and r.json()["path"] == "/far"
            lines = p.wait_log(lambda ls: len(ls) >= 1, "the access log line")
            assert "route=fallback" in lines[0]
        finally:
            assert p.stop() == ""


def test_head_gets_the_proxys_own_answers_without_a_body(proxy):
    """A HEAD for a page the proxy answers itself (404, 409) gets the head alone: h11 frames
    it with the page's Content-Length and no body, and the connection stays usable."""
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as conn:
        for _ in range(2):
            conn.sendall(b"HEAD / HTTP/1.1\r\nHost: nothing.localhost\r\n\r\n")
            head = proxykit.read_head(conn)
            assert head.startswith(b"HTTP/1.1 404 ") and head.endswith(b"\r\n\r\n")


def test_a_peer_that_refuses_connections_is_skipped_and_marked_down(tmp_path):
    a = proxykit.Node(tmp_path, "node-a")
    b = proxykit.Node(tmp_path, "node-b", bundle=a.bundle)
    try:
        with proxykit.upstream() as up:
            b.set_table(
                backends=(table.Backend(project="shop", service="api", port=up.port, shared=True),)
            )
            gone = table.PeerInstance(
                node_id="0" * 32,
                node_name="node-0",  # first in the order of a stable balance
                server_name="node-0.team.devmesh.internal",
                host="127.0.0.1",
                port=proxykit.free_port(),
                project="shop",
                service="api",
            )
            a.set_table(
                mesh=(
                    table.MeshRoute(
                        project="shop",
                        service="api",
                        peers=(gone, b.instance("shop", "api")),
                        rules=(
                            table.CallerRule(
                                caller=None, settings=routes.Settings(balance=routes.Balance.FIRST)
                            ),
                        ),
                    ),
                )
            )
            url = f"http://127.0.0.1:{a.proxy.port}/"
            for method in ("PUT", "GET"):
                r = get(url, method, headers={"host": "api.localhost"}, content=b"data")
                assert r.status_code == 200 and r.json()["body_length"] == 4
            assert [e["node"] for e in a.proxy.wait_entries(2)] == ["node-b", "node-b"]
            decision = a.proxy.on_loop(lambda: a.proxy.server.explain("shop", "api"))
            assert decision.chosen.node_name == "node-b"
            assert "node-0 api is marked down (service 'api' is not reachable: connection" in (
                decision.explanation
            )
    finally:
        a.close()
        b.close()


def test_a_409_ends_when_the_table_swaps_in_a_compatible_version(proxy):
    """The proxy remembers the decision for a lone local backend per table: a new table
    (here: api 2.3.0 started in place of 1.9.0) must be decided again, never answered
    from what the old one said."""
    with proxykit.upstream() as up:

        def api(version: str) -> table.RouteTable:
            return table.RouteTable(
                backends=(
                    table.Backend(project="shop", service="api", port=up.port, version=version),
                ),
                mesh=(
                    table.MeshRoute(
                        project="shop",
                        service="api",
                        rules=(needs("^2.1", model.VersionPolicy.REJECT),),
                    ),
                ),
            )

        proxy.table = api("1.9.0")
        port = edge_port(proxy)
        r = get(f"http://127.0.0.1:{port}/")
        assert r.status_code == 409 and "found only local api 1.9.0" in r.text
        proxy.table = api("2.3.0")
        r = get(f"http://127.0.0.1:{port}/")
        assert r.status_code == 200, r.text
        assert up.connections == 1
        proxy.table = api("1.9.0")  # and back: refused again
        assert get(f"http://127.0.0.1:{port}/").status_code == 409
