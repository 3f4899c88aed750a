"""Pure parts of the proxy: host matching, the route table, header rewriting, pages."""

from __future__ import annotations

import pytest

from devmesh.core import hostroute
from devmesh.proxy import accesslog, headers, pages, table


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("api.localhost", hostroute.HostMatch(kind=hostroute.HostKind.SERVICE, service="api")),
        ("API.localhost:7700", hostroute.HostMatch(kind=hostroute.HostKind.SERVICE, service="api")),
        (
            "api.shop.localhost.",
            hostroute.HostMatch(kind=hostroute.HostKind.SERVICE, service="api", project="shop"),
        ),
        ("devmesh.localhost:1", hostroute.RESERVED),
        ("a.b.c.localhost", hostroute.NO_MATCH),
        ("localhost", hostroute.NO_MATCH),
        ("api.example.com", hostroute.NO_MATCH),
        ("127.0.0.1:7700", hostroute.NO_MATCH),
        ("[::1]:7700", hostroute.NO_MATCH),
        ("a..localhost", hostroute.NO_MATCH),
        ("", hostroute.NO_MATCH),
    ],
)
def test_host_matching(host, expected):
    assert hostroute.match(host) == expected


def test_service_url_omits_default_ports():
    assert hostroute.service_url("api", None, scheme="http", port=80) == "http://api.localhost"
    assert (
        hostroute.service_url("api", "shop", scheme="https", port=7743)
        == "https://api.shop.localhost:7743"
    )


def test_route_table_keeps_the_short_name_with_the_first_project_and_matches_edges():
    a = table.Backend(project="one", service="api", port=1)
    b = table.Backend(project="two", service="api", port=2)
    routes = table.RouteTable((a, b))
    assert routes.resolve_host("api.localhost") is a
    assert routes.resolve_host("api.one.localhost:9") is a
    assert routes.resolve_host("api.two.localhost") is b
    assert routes.resolve_host("devmesh.localhost") == table.Reserved()
    assert routes.resolve_host("web.localhost") == table.Unknown("web.localhost")
    edge = table.Edge(caller_project="one", caller_service="web", target_service="api")
    assert routes.for_edge(edge) is a
    assert (
        routes.for_edge(
            table.Edge(caller_project="three", caller_service="w", target_service="api")
        )
        is None
    )


def test_request_headers_rewrite():
    out = headers.request_headers(
        [
            (b"host", b"h"),
            (b"connection", b"close, x-drop"),
            (b"x-drop", b"1"),
            (b"transfer-encoding", b"chunked"),
            (b"x-forwarded-proto", b"ftp"),
            (b"x-keep", b"2"),
        ],
        client_ip="::1",
        proto="https",
        host=b"h",
    )
    assert out == [
        (b"host", b"h"),
        (b"x-keep", b"2"),
        (b"x-forwarded-for", b"::1"),
        (b"x-forwarded-proto", b"https"),
        (b"x-forwarded-host", b"h"),
        (b"forwarded", b'for="[::1]";host=h;proto=https'),
        (b"via", b"1.1 devmesh"),
        (b"transfer-encoding", b"chunked"),
    ]


def test_response_headers_rewrite():
    assert headers.response_headers([(b"keep-alive", b"5"), (b"via", b"1.0 x"), (b"a", b"b")]) == [
        (b"via", b"1.0 x, 1.1 devmesh"),
        (b"a", b"b"),
    ]
    assert (
        headers.wants_upgrade([(b"connection", b"keep-alive, Upgrade"), (b"upgrade", b"WebSocket")])
        == b"websocket"
    )
    assert headers.wants_upgrade([(b"upgrade", b"websocket")]) is None


def test_pages_plain_and_html():
    rows = pages.service_lines(
        [table.Backend(project="p", service="a<b", port=1)], port=7700, https_port=None, now_s=0
    )
    ctype, body = pages.render(404, "nope", accept=b"*/*", services=rows)
    assert ctype == b"text/plain; charset=utf-8"
    assert body == (
        b"404 Not Found: nope\n\nKnown services:\n  a<b (p, running): http://a<b.p.localhost:7700\n"
    )
    ctype, body = pages.render(404, "nope", accept=b"text/html", services=rows)
    assert b"a&lt;b" in body and b"<a<b" not in body


def test_access_log_text_format(tmp_path):
    log = accesslog.AccessLog(tmp_path / "a.log")
    log.record(
        accesslog.Entry(
            time=0.5,
            client="127.0.0.1:5",
            method="GET",
            host="api.localhost",
            path="/x",
            status=200,
            bytes_in=1,
            bytes_out=2,
            duration_ms=1.234,
            upstream="127.0.0.1:9",
            caller="web.shop",
        )
    )
    log.close()
    assert (tmp_path / "a.log").read_text() == (
        "1970-01-01T00:00:00.500Z 127.0.0.1:5 GET api.localhost /x 200 in=1 out=2 1.23ms"
        " upstream=127.0.0.1:9 caller=web.shop\n"
    )


def test_restarting_state_in_words_counts_down_and_never_goes_negative():
    b = table.Backend(
        project="p", service="api", port=1, state="restarting", attempt=3, retry_at=100.0
    )
    assert table.state_words(b, 97.5) == "restarting, attempt 3, next try in 3 s"
    assert table.state_words(b, 100.0) == "restarting, attempt 3, next try in 0 s"
    assert table.state_words(b, 130.0) == "restarting, attempt 3, next try in 0 s"
    assert table.state_words(table.Backend(project="p", service="api", port=1), 0) == "running"
