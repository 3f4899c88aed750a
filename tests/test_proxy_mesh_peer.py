"""The peer hop and the peer listener: two ProxyServers in one test act as two mesh nodes.

Node A runs the caller (``web``, through its edge listener) and has no ``api`` of its own;
node B runs ``api`` (a real HTTP service on loopback) and shares it. Every byte crosses B's
peer listener over mutual TLS with certificates of a team CA made in the test.
"""

from __future__ import annotations

import hashlib
import json
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import proxykit
import pytest
from websockets.sync.client import connect
from websockets.sync.server import ServerConnection, serve

from devmesh.core import routes
from devmesh.proxy import table

MIB = 1024 * 1024
EDGE = table.Edge(caller_project="shop", caller_service="web", target_service="api")


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[tuple[proxykit.Node, proxykit.Node]]:
    a = proxykit.Node(tmp_path, "node-a", https=True)
    b = proxykit.Node(tmp_path, "node-b", bundle=a.bundle, catalog=b'{"node": "node-b"}')
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def share(a: proxykit.Node, b: proxykit.Node, port: int, **backend: object) -> int:
    """B shares api on ``port``; A routes web -> api to B. The edge's port on A."""
    b.set_table(
        backends=(table.Backend(project="shop", service="api", port=port, shared=True, **backend),)
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
                        requirements=(routes.Requirement(range_text="^2.1", declared_by="web"),),
                    ),
                ),
            ),
        )
    )
    return a.proxy.call(a.proxy.server.set_edges({EDGE: None}))[EDGE]


def test_http_across_the_hop_names_the_service_and_logs_both_sides(nodes):
    a, b = nodes
    with proxykit.upstream() as up:
        edge_port = share(a, b, up.port)
        with httpx.Client(trust_env=False) as client:
            for _ in range(3):  # the peer connection is pooled: one TLS connection
                r = client.get(f"http://127.0.0.1:{edge_port}/echo?x=1")
                assert r.status_code == 200
        seen = dict(r.json()["headers"])
        assert r.json()["path"] == "/echo?x=1"
        assert "x-devmesh-service" not in seen  # removed before the service sees it
        assert seen["host"] == f"127.0.0.1:{edge_port}"  # kept as the client sent it
        assert seen["via"] == "1.1 devmesh, 1.1 devmesh"
        assert a.proxy.server.pool.opened == 1
        caller_side = a.proxy.wait_entries(3)
        assert {(e["route"], e["node"], e["caller"]) for e in caller_side} == {
            ("peer", "node-b", "web.shop")
        }
        owner_side = b.proxy.wait_entries(3)
        assert {(e["route"], e["caller"]) for e in owner_side} == {("local", "peer node-a")}


def test_chunked_upload_large_download_and_sse_stream_across_the_hop(nodes):
    a, b = nodes
    with proxykit.upstream() as up:
        edge_port = share(a, b, up.port)
        blob = bytes(range(256)) * (24 * MIB // 256)

        def chunks() -> Iterator[bytes]:
            for i in range(0, len(blob), MIB):
                yield blob[i : i + MIB]

        with httpx.Client(trust_env=False, timeout=30) as client:
            r = client.post(f"http://127.0.0.1:{edge_port}/upload", content=chunks())
            assert r.json()["body_length"] == len(blob)
            assert r.json()["body_sha256"] == hashlib.sha256(blob).hexdigest()
            assert ["transfer-encoding", "chunked"] in r.json()["headers"]
            with client.stream("GET", f"http://127.0.0.1:{edge_port}/download?n={64 * MIB}") as s:
                assert sum(len(c) for c in s.iter_bytes()) == 64 * MIB
            with client.stream("GET", f"http://127.0.0.1:{edge_port}/sse?n=4&gated=1") as s:
                assert s.headers["content-type"] == "text/event-stream"
                lines = s.iter_lines()
                for i in range(4):
                    # Each event arrives before the service is allowed to send the next one:
                    # nothing across the hop holds the stream back.
                    assert next(lines) == f"id: {i}"
                    assert next(lines) == f"data: event {i}"
                    assert next(lines) == ""
                    up.sse_gate.release()


def _ws_handler(ws: ServerConnection) -> None:
    for message in ws:
        ws.send(message)


def test_websocket_across_the_hop(nodes):
    a, b = nodes
    server = serve(_ws_handler, "127.0.0.1", 0, max_size=8 * MIB)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        edge_port = share(a, b, server.socket.getsockname()[1])
        with connect(f"ws://127.0.0.1:{edge_port}/chat", proxy=None, max_size=8 * MIB) as ws:
            ws.send("hello over the mesh")
            assert ws.recv(timeout=10) == "hello over the mesh"
            payload = bytes(range(256)) * (4 * MIB // 256)
            ws.send(payload)
            assert ws.recv(timeout=10) == payload
        entries = a.proxy.wait_entries(1)
        assert entries[0]["status"] == 101 and entries[0]["node"] == "node-b"
    finally:
        server.shutdown()
        thread.join(5)


def test_https_from_the_client_by_host_across_the_hop(nodes, tmp_path):
    a, b = nodes
    with proxykit.upstream() as up:
        share(a, b, up.port)
        https_port = a.proxy.server.https_port
        ca_file = a.proxy.server._ca.cert_path()  # type: ignore[union-attr]
        out = subprocess.run(
            [
                "curl",
                "-sS",
                "--cacert",
                str(ca_file),
                "--resolve",
                f"api.localhost:{https_port}:127.0.0.1",
                f"https://api.localhost:{https_port}/secure",
            ],
            capture_output=True,
            check=True,
            timeout=30,
            env=proxykit.env_without_proxy(),
        )
        doc = json.loads(out.stdout)
        assert doc["path"] == "/secure"
        assert ["x-forwarded-proto", "https"] in doc["headers"]  # A's view, passed on by B
        assert a.proxy.wait_entries(1)[0]["node"] == "node-b"


def _tls_client(node: proxykit.Node, server: proxykit.Node) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(server.identity.ca_path))
    ctx.load_cert_chain(str(node.identity.node_cert_path), str(node.identity.node_key_path))
    ctx.check_hostname = False  # the server's identity is not what these tests are about
    return ctx


def _raw(ctx: ssl.SSLContext, port: int, request: bytes) -> bytes:
    """Send one request over TLS and read until the server closes or answers completely."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as sock,
        ctx.wrap_socket(sock, server_hostname="peer") as tls,
    ):
        tls.sendall(request)
        data = b""
        while True:
            chunk = tls.recv(65536)
            if not chunk:
                return data
            data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:") and len(body) >= int(
                    line.split(b":")[1]
                ):
                    return data


def test_catalog_path_and_methods(nodes):
    a, b = nodes
    ctx = _tls_client(a, b)
    got = _raw(ctx, b.peer_port, b"GET /mesh/v1/catalog HTTP/1.1\r\nHost: b\r\n\r\n")
    assert got.startswith(b"HTTP/1.1 200 ")
    assert b"content-type: application/json" in got.lower()
    assert got.endswith(b'{"node": "node-b"}')
    got = _raw(ctx, b.peer_port, b"POST /mesh/v1/catalog HTTP/1.1\r\nHost: b\r\n\r\n")
    assert got.startswith(b"HTTP/1.1 405 ")
    with (
        socket.create_connection(("127.0.0.1", b.peer_port), timeout=10) as sock,
        ctx.wrap_socket(sock, server_hostname="peer") as tls,
    ):
        tls.sendall(b"HEAD /mesh/v1/catalog HTTP/1.1\r\nHost: b\r\n\r\n")
        assert proxykit.read_head(tls).startswith(b"HTTP/1.1 200 ")


def test_a_certificate_of_another_ca_fails_in_tls(nodes, tmp_path):
    _, b = nodes
    stranger = proxykit.Node(tmp_path, "node-x")  # a team of its own, same mesh name
    try:
        ctx = _tls_client(stranger, b)
        ctx.load_verify_locations(cafile=str(b.identity.ca_path))
        with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)):
            got = _raw(ctx, b.peer_port, b"GET /mesh/v1/catalog HTTP/1.1\r\nHost: b\r\n\r\n")
            assert got == b"", got  # TLS 1.3: the refusal may come as the end of the stream
            raise ConnectionResetError("closed without an answer")
    finally:
        stranger.close()


def test_a_node_outside_mesh_allow_gets_403_and_the_connection_closes(nodes):
    a, b = nodes
    b.refuse.add("node-a")
    got = _raw(
        _tls_client(a, b),
        b.peer_port,
        b"GET /mesh/v1/catalog HTTP/1.1\r\nHost: b\r\n\r\n"
        b"GET /mesh/v1/catalog HTTP/1.1\r\nHost: b\r\n\r\n",
    )
    assert got.startswith(b"HTTP/1.1 403 ")
    assert got.endswith(b'{"error": "refused by mesh.allow"}')
    assert got.count(b"HTTP/1.1") == 1  # the second request got no answer: closed


def test_the_owner_serves_only_local_shared_instances_never_a_peer(nodes):
    a, b = nodes
    with proxykit.upstream() as up:
        # B's table says api runs on A (and has a fallback): B must not forward there.
        b.set_table(
            backends=(
                table.Backend(project="shop", service="db", port=up.port),  # not shared
                table.Backend(
                    project="shop", service="cache", port=up.port, shared=True, health="starting"
                ),
            ),
            mesh=(
                table.MeshRoute(
                    project="shop",
                    service="api",
                    peers=(a.instance("shop", "api"),),
                    fallback=f"http://127.0.0.1:{up.port}",
                ),
            ),
        )
        ctx = _tls_client(a, b)
        for service, status in (("api", 404), ("db", 404), ("cache", 503)):
            got = _raw(
                ctx,
                b.peer_port,
                f"GET / HTTP/1.1\r\nHost: b\r\nx-devmesh-service: {service}.shop\r\n\r\n".encode(),
            )
            assert got.startswith(f"HTTP/1.1 {status} ".encode()), got
            assert b"x-devmesh-unavailable: 1" in got
            assert service.encode() in got.split(b"\r\n\r\n", 1)[1]
        assert up.connections == 0


def test_the_owner_serves_a_call_only_in_the_branch_its_instance_runs_in(nodes):
    """A shared instance under a branch answers calls for that branch only; the default
    namespace's only calls without one. Anything else is this node's 404 with
    ``x-devmesh-unavailable`` (the caller moves on), and nothing reaches the service."""
    a, b = nodes
    with proxykit.upstream() as feat, proxykit.upstream() as plain:
        b.set_table(
            backends=(
                table.Backend(
                    project="shop", service="api", port=feat.port, shared=True, branch="feat"
                ),
                table.Backend(project="shop", service="web", port=plain.port, shared=True),
            )
        )
        ctx = _tls_client(a, b)

        def call(service: str, branch: str | None) -> bytes:
            head = f"GET /x HTTP/1.1\r\nHost: b\r\nx-devmesh-service: {service}.shop\r\n"
            if branch is not None:
                head += f"x-devmesh-branch: {branch}\r\n"
            return _raw(ctx, b.peer_port, (head + "Connection: close\r\n\r\n").encode())

        for service, branch, where in (
            ("api", None, b"runs in branch feat on node node-b, not in the default namespace"),
            ("api", "other", b"runs in branch feat on node node-b, not in branch other"),
            ("web", "feat", b"runs in the default namespace on node node-b, not in branch feat"),
        ):
            got = call(service, branch)
            assert got.startswith(b"HTTP/1.1 404 "), got
            assert b"x-devmesh-unavailable: 1" in got and where in got, got
        assert feat.connections == 0 and plain.connections == 0
        assert call("api", "feat").startswith(b"HTTP/1.1 200 ")
        assert call("web", None).startswith(b"HTTP/1.1 200 ")
        assert feat.connections == 1 and plain.connections == 1
