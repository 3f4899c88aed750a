"""The in-process API the agent uses: serve() under anyio, table swaps, edges, shutdown."""

from __future__ import annotations

import socket

import anyio
import httpx
import proxykit

from devmesh.proxy import accesslog, ca, server, settings, table


def test_serve_swap_table_edges_and_shutdown(tmp_path):
    with proxykit.upstream() as up:
        backend = table.Backend(project="shop", service="api", port=up.port)
        current = [table.RouteTable((backend,))]
        proxy = server.ProxyServer(
            settings.Settings(port=0, https_port=0),
            lambda: current[0],
            ca.LocalCA(tmp_path),
            accesslog.AccessLog(tmp_path / "access.log"),
        )
        edge = table.Edge(caller_project="shop", caller_service="web", target_service="api")

        async def main() -> None:
            async with anyio.create_task_group() as tg:
                started = await tg.start(proxy.serve)
                assert started is proxy and proxy.http_port and proxy.https_port
                ports = await proxy.set_edges({edge: None})
                async with httpx.AsyncClient() as client:
                    r = await client.get(f"http://127.0.0.1:{ports[edge]}/echo")
                    assert r.json()["path"] == "/echo"
                    current[0] = table.RouteTable(
                        (
                            table.Backend(
                                project="shop", service="api", port=up.port, state="stopped"
                            ),
                        )
                    )
                    r = await client.get(f"http://127.0.0.1:{ports[edge]}/")
                    assert r.status_code == 502
                    # Asking again with the same preferred port keeps it; dropping frees it.
                    assert await proxy.set_edges({edge: ports[edge]}) == ports
                    assert await proxy.set_edges({}) == {}
                    # The preferred port is reused when the edge comes back.
                    assert await proxy.set_edges({edge: ports[edge]}) == ports
                    idle = await anyio.connect_tcp("127.0.0.1", proxy.http_port)
                    await idle.send(b"GET / HTTP/1.1\r\nHost: devmesh.localhost\r\n\r\n")
                    assert (await idle.receive()).startswith(b"HTTP/1.1 200 OK")
                tg.cancel_scope.cancel()
            # Listeners and keep-alive connections are gone after cancellation.
            with anyio.fail_after(5):
                try:
                    assert await idle.receive() == b""
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    pass
            await idle.aclose()
            with socket.socket() as s:
                assert s.connect_ex(("127.0.0.1", ports[edge])) != 0

        anyio.run(main)
        proxy.access_log.close()
    lines = (tmp_path / "access.log").read_text().splitlines()
    assert len(lines) == 3
    assert lines[0].endswith("caller=web.shop")
