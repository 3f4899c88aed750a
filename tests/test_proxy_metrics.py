"""The proxy's metrics in one process: what a route's counts say, a WebSocket open then
closed, the owner's side of a peer call, and the batch that feeds the latency histogram.

The proxies are real (in-process ProxyServers, proxykit) with real services and clients;
``/metrics`` is read through the proxy on devmesh.localhost and parsed with
prometheus-client's own parser. Several processes sharing the counts are tested with a real
agent and its workers (tests/test_agent_metrics.py).
"""

from __future__ import annotations

import contextlib
import http.server
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import proxykit
import pytest
from prometheus_client import Histogram
from prometheus_client.parser import text_string_to_metric_families
from websockets.sync.client import connect
from websockets.sync.server import ServerConnection, serve

from devmesh.core import routes
from devmesh.proxy import metrics, table

EDGE = table.Edge(caller_project="shop", caller_service="web", target_service="api")
ROUTE = {"project": "shop", "caller": "", "service": "api", "target": "local", "node": ""}


class _Coded(http.server.BaseHTTPRequestHandler):
    """``/code/N`` answers status N with a body of N % 100 + 1 bytes; POST echoes the body."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        status = int(self.path.rsplit("/", 1)[1]) if self.path.startswith("/code/") else 200
        body = b"c" * (status % 100 + 1)
        length = int(self.headers.get("content-length") or 0)
        if length:
            body = self.rfile.read(length)
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_GET


@contextlib.contextmanager
def coded() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Coded)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def scrape(port: int, **kw: object) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    r = httpx.get(
        f"http://127.0.0.1:{port}/metrics",
        headers={"host": "devmesh.localhost"},
        trust_env=False,
        **kw,  # type: ignore[arg-type]
    )
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain; version=")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture
def proxy(tmp_path: Path) -> Iterator[proxykit.InProcessProxy]:
    p = proxykit.InProcessProxy(table.RouteTable(), tmp_path / "proxy")
    try:
        yield p
    finally:
        p.close()


def test_a_route_counts_status_classes_bytes_and_latency(proxy: proxykit.InProcessProxy) -> None:
    with coded() as port:
        proxy.table = table.RouteTable(
            backends=(table.Backend(project="shop", service="api", port=port),)
        )
        base = f"http://127.0.0.1:{proxy.port}"
        with httpx.Client(trust_env=False, headers={"host": "api.localhost"}) as client:
            for _ in range(3):
                assert client.get(f"{base}/code/200").status_code == 200  # 1 byte each
            assert client.get(f"{base}/code/404").status_code == 404  # 5 bytes
            r = client.post(f"{base}/echo", content=b"x" * 1000)
            assert r.status_code == 200 and len(r.content) == 1000
        # A request the proxy answers itself for a service that is not running: a 502 of
        # the route, to no target.
        proxy.table = table.RouteTable(
            backends=(table.Backend(project="shop", service="api", port=port, state="stopped"),)
        )
        assert httpx.get(f"{base}/", headers={"host": "api.localhost"}).status_code == 502
    samples = scrape(proxy.port)
    assert value(samples, "devmesh_proxy_requests_total", **ROUTE, code="2xx") == 4
    assert value(samples, "devmesh_proxy_requests_total", **ROUTE, code="4xx") == 1
    stopped = {**ROUTE, "target": "none"}
    assert value(samples, "devmesh_proxy_requests_total", **stopped, code="5xx") == 1
    assert value(samples, "devmesh_proxy_request_bytes_total", **ROUTE) == 1000
    assert value(samples, "devmesh_proxy_response_bytes_total", **ROUTE) == 3 + 5 + 1000
    assert value(samples, "devmesh_proxy_request_duration_seconds_count", **ROUTE) == 5
    assert value(samples, "devmesh_proxy_request_duration_seconds_sum", **ROUTE) > 0
    inf = value(samples, "devmesh_proxy_request_duration_seconds_bucket", **ROUTE, le="+Inf")
    assert inf == 5
    # /metrics itself, the index page and unknown hosts are no route.
    assert not [k for k in samples if dict(k[1]).get("service") not in (None, "api")]


def _echo(ws: ServerConnection) -> None:
    for message in ws:
        ws.send(message)


@contextlib.contextmanager
def echo_service(proxy: proxykit.InProcessProxy) -> Iterator[None]:
    """A WebSocket echo service routed as api.localhost by ``proxy``."""
    server = serve(_echo, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.socket.getsockname()[1]
        proxy.table = table.RouteTable(
            backends=(table.Backend(project="shop", service="api", port=port),)
        )
        yield
    finally:
        server.shutdown()
        thread.join(5)


@contextlib.contextmanager
def websocket(proxy: proxykit.InProcessProxy) -> Iterator[None]:
    """A WebSocket to api.localhost through ``proxy``, open (one echo done) while inside."""
    sock = socket.create_connection(("127.0.0.1", proxy.port))
    with connect(f"ws://api.localhost:{proxy.port}/chat", sock=sock) as ws:
        ws.send("ping")
        assert ws.recv(timeout=10) == "ping"
        yield


def test_a_websocket_is_counted_open_then_closed(proxy: proxykit.InProcessProxy) -> None:
    with echo_service(proxy):
        with websocket(proxy):
            samples = scrape(proxy.port)
            assert value(samples, "devmesh_proxy_websocket_connections_open", **ROUTE) == 1
            assert value(samples, "devmesh_proxy_websocket_connections_total", **ROUTE) == 1
        proxykit.wait_for(
            lambda: (
                value(scrape(proxy.port), "devmesh_proxy_websocket_connections_open", **ROUTE) == 0
            ),
            "the WebSocket counted closed",
        )
        samples = scrape(proxy.port)
        assert value(samples, "devmesh_proxy_websocket_connections_total", **ROUTE) == 1
        assert value(samples, "devmesh_proxy_requests_total", **ROUTE, code="1xx") == 1
        assert value(samples, "devmesh_proxy_request_bytes_total", **ROUTE) > 0


def test_the_owner_counts_calls_of_teammates_by_caller_node(tmp_path: Path) -> None:
    a = proxykit.Node(tmp_path, "node-a")
    b = proxykit.Node(tmp_path, "node-b", bundle=a.bundle)
    try:
        with coded() as service_port:
            b.set_table(
                backends=(
                    table.Backend(project="shop", service="api", port=service_port, shared=True),
                )
            )
            a.set_table(
                mesh=(
                    table.MeshRoute(
                        project="shop",
                        service="api",
                        peers=(b.instance("shop", "api", version="2.3.0"),),
                        rules=(
                            table.CallerRule(
                                caller="web",
                                requirements=(
                                    routes.Requirement(range_text="^2.1", declared_by="web"),
                                ),
                            ),
                        ),
                    ),
                )
            )
            port = a.proxy.call(a.proxy.server.set_edges({EDGE: None}))[EDGE]
            with httpx.Client(trust_env=False) as client:
                for _ in range(3):
                    assert client.get(f"http://127.0.0.1:{port}/code/200").status_code == 200
        owner = b.proxy.metrics()
        served = {"project": "shop", "service": "api", "caller_node": "node-a"}
        assert value(owner, "devmesh_peer_served_requests_total", **served, code="2xx") == 3
        assert value(owner, "devmesh_peer_served_request_duration_seconds_count", **served) == 3
        caller = a.proxy.metrics()
        hop = {**ROUTE, "caller": "web.shop", "target": "peer", "node": "node-b"}
        assert value(caller, "devmesh_proxy_requests_total", **hop, code="2xx") == 3
        assert not [k for k in caller if k[0].startswith("devmesh_peer_served_")]
    finally:
        a.close()
        b.close()


def test_a_batch_of_observations_exposes_as_observing_each_one(tmp_path: Path) -> None:
    """The recorder adds a batch through prometheus-client's own histogram values
    (``_add_observations``): the exposition must be the one ``observe`` gives."""
    samples = [0.0004, 0.003, 0.003, 0.2, 7.0, 100.0]
    by_batch, by_one = tmp_path / "batch", tmp_path / "one"
    for folder in (by_batch, by_one):
        metrics.prepare(folder)
    value_batch = metrics.values.MultiProcessValue()
    value_one = metrics.values.MultiProcessValue()
    with metrics._storage(value_one, by_one):
        one = Histogram("h_seconds", "h", ["r"], buckets=metrics.core.BUCKETS_S, registry=None)
        child = one.labels("x")
    for s in samples:
        child.observe(s)
    with metrics._storage(value_batch, by_batch):
        batch = Histogram("h_seconds", "h", ["r"], buckets=metrics.core.BUCKETS_S, registry=None)
        bchild = batch.labels("x")
    counts = [0] * (len(metrics.core.BUCKETS_S) + 1)
    for s in samples:
        counts[metrics.core.bucket_index(s)] += 1
    metrics._add_observations(bchild, counts, sum(samples))
    assert metrics.exposition(by_batch) == metrics.exposition(by_one)
    assert b'h_seconds_bucket{le="0.005",r="x"} 3.0' in metrics.exposition(by_one)


def test_a_folder_takes_one_recorder_per_process(tmp_path: Path) -> None:
    metrics.prepare(tmp_path)
    first = metrics.Recorder(tmp_path)
    try:
        with pytest.raises(ValueError, match="already writes"):
            metrics.Recorder(tmp_path)
    finally:
        first.close()
    metrics.Recorder(tmp_path).close()  # free again once closed


def test_a_dead_process_keeps_its_counts_and_drops_its_open_websockets(
    proxy: proxykit.InProcessProxy,
) -> None:
    with echo_service(proxy), websocket(proxy):
        assert value(scrape(proxy.port), "devmesh_proxy_websocket_connections_open", **ROUTE)
        # What the agent does when a worker dies (its pid here: this process's files).
        metrics.worker_died(proxy.metrics_dir, os.getpid())
        samples = proxy.metrics()
        assert value(samples, "devmesh_proxy_websocket_connections_open", **ROUTE) == 0
        assert value(samples, "devmesh_proxy_websocket_connections_total", **ROUTE) == 1
