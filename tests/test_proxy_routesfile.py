"""The routes file the agent hands its proxy workers: round trip, atomic and change-only writes."""

from __future__ import annotations

import json
import os

import pytest

from devmesh.proxy import routesfile, table

WEB_API = table.Edge(caller_project="shop", caller_service="web", target_service="api")
JOBS_API = table.Edge(caller_project="shop", caller_service="jobs", target_service="api")


def sample() -> tuple[table.RouteTable, dict[table.Edge, int | None]]:
    routes = table.RouteTable(
        (
            table.Backend(project="shop", service="api", port=8080),
            table.Backend(
                project="shop",
                service="admin",
                port=8443,
                host="::1",
                scheme="https",
                state="crash-looping",
                reason="exited with status 1",
            ),
            table.Backend(
                project="shop",
                service="jobs",
                port=8081,
                state="restarting",
                reason="exited with status 3",
                attempt=2,
                retry_at=1767225600.25,
            ),
        ),
        agent=table.Backend(project="devmesh", service="dashboard", port=7799),
    )
    return routes, {WEB_API: 41001, JOBS_API: None}


def test_round_trip_keeps_every_backend_field_the_agent_and_the_edges(tmp_path):
    path = tmp_path / "routes.json"
    routes, edges = sample()
    assert routesfile.write(path, routes, edges)
    got, got_edges = routesfile.read(path)
    assert got.backends == routes.backends  # host, scheme, state, reason, attempt, retry_at
    assert got.agent == routes.agent
    assert got_edges == edges
    # The table read back routes like the original one.
    assert got.resolve_host("admin.shop.localhost:7700") == routes.backends[1]
    assert got.for_edge(WEB_API) == routes.backends[0]


def test_the_standalone_format_with_defaults_still_reads(tmp_path):
    path = tmp_path / "routes.json"
    path.write_text(
        json.dumps(
            {
                "backends": [{"project": "shop", "service": "api", "port": 8080}],
                "edges": [
                    {"caller_project": "shop", "caller_service": "web", "target_service": "api"}
                ],
            }
        )
    )
    routes, edges = routesfile.read(path)
    assert routes.backends == (table.Backend(project="shop", service="api", port=8080),)
    assert routes.agent is None
    assert edges == {WEB_API: None}


def test_write_is_skipped_when_nothing_changed_and_replaces_the_file_when_it_did(tmp_path):
    path = tmp_path / "routes.json"
    routes, edges = sample()
    assert routesfile.write(path, routes, edges)
    before = path.stat()
    assert not routesfile.write(path, routes, dict(reversed(edges.items())))  # order-free
    assert path.stat().st_ino == before.st_ino
    assert path.stat().st_mtime_ns == before.st_mtime_ns
    assert routesfile.write(path, routes, {WEB_API: 41002})
    after = path.stat()
    assert after.st_ino != before.st_ino  # a new file renamed over the old: never half-written
    assert after.st_mtime_ns > before.st_mtime_ns
    assert routesfile.read(path)[1] == {WEB_API: 41002}
    assert [p.name for p in tmp_path.iterdir()] == ["routes.json"]  # no temp file left
    assert after.st_mode & 0o777 == 0o600


def test_mtime_moves_forward_even_within_one_clock_tick(tmp_path):
    path = tmp_path / "routes.json"
    routes, edges = sample()
    routesfile.write(path, routes, edges)
    future = path.stat().st_mtime_ns + 10**12  # as if the next write landed in the same tick
    os.utime(path, ns=(future, future))
    stamp = routesfile.stamp(path)
    assert routesfile.write(path, routes, {})
    assert path.stat().st_mtime_ns == future + 1
    assert routesfile.stamp(path) != stamp


def test_stamp_of_a_missing_file_is_none(tmp_path):
    assert routesfile.stamp(tmp_path / "nope.json") is None


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ("{", "Expecting"),
        ("[]", "expected a JSON object"),
        ('{"backends": [{"project": "p", "service": "s"}]}', "port"),
        ('{"backends": [{"project": "p", "service": "s", "port": "80"}]}', "is not a number"),
        ('{"backends": [{"project": "p", "service": "s", "port": 1, "x": 2}]}', "unknown"),
        (
            '{"backends": [{"project": "p", "service": "s", "port": 1, "attempt": "2"}]}',
            "attempt '2' is not a number",
        ),
        (
            '{"backends": [{"project": "p", "service": "s", "port": 1, "retry_at": "soon"}]}',
            "retry_at 'soon' is not a time in seconds",
        ),
        ('{"edges": [{"caller_project": "p", "caller_service": "w"}]}', "target_service"),
        (
            '{"edges": [{"caller_project": "p", "caller_service": "w", "target_service": "a",'
            ' "port": 70000}]}',
            "not a port number",
        ),
    ],
)
def test_a_bad_file_is_named_with_the_cause(tmp_path, content, reason):
    path = tmp_path / "routes.json"
    path.write_text(content)
    with pytest.raises(routesfile.RoutesFileError) as exc:
        routesfile.read(path)
    assert str(exc.value).startswith(f"{path}: ")
    assert reason in str(exc.value)
