"""`devmesh graph` against real agents: what they run, where each call goes, the traffic.

One agent runs a project whose ``web`` depends on a local ``api``, on a dependency with only
a fallback, on one nothing serves, and on a local one outside web's range. Two agents on
loopback (discovery pinned to ``lo``) show a dependency served by a teammate, whose shared
services appear under its machine. Traffic is real: curl through the caller's ``NAME_URL``
(the proxy's edge listener names the caller), counted by the agent's proxy.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
from agentkit import PY, Mesh
from graphcheck import check_document, check_mermaid, render_dot
from test_agent_mesh_routes import Team, service

from devmesh.agent import client

# Answers /status/NNN with status NNN, anything else 200; /healthz is the health check.
STATUS_SERVICE = """
import http.server, os
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        code = int(self.path.split("/")[2]) if self.path.startswith("/status/") else 200
        body = os.environ["DEVMESH_SERVICE"].encode()
        self.send_response(code); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), H).serve_forever()
"""


def shop_yaml() -> str:
    run = f"{PY} svc.py"
    check = "    health: {http: /healthz, interval_s: 0.3}\n"
    return (
        "version: 1\nproject: shop\nservices:\n"
        f"  web:\n    version: 1.0.0\n    command: {run}\n{check}"
        "    depends_on:\n      api: ^1.2\n      pay: '*'\n      auth: ^1\n      search: ^1.0\n"
        f"  api:\n    version: 1.2.0\n    command: {run}\n{check}"
        f"  search:\n    version: 0.9.0\n    command: {run}\n{check}"
        "  pay:\n    fallback: http://127.0.0.1:9/v1\n"
        "  auth: {}\n"
    )


@pytest.fixture
def shop() -> Iterator[Mesh]:
    m = Mesh()
    try:
        m.start_agent()
        d = m.project("shop", shop_yaml(), {"svc.py": STATUS_SERVICE})
        r = m.cli("up", "-d", cwd=d, timeout=90)
        assert r.returncode == 0, r.stderr
        yield m
    finally:
        m.close()


def graph_json(m: Mesh, *args: str) -> dict[str, Any]:
    r = m.cli(*args, "graph", "--format", "json", check=True)
    doc: dict[str, Any] = json.loads(r.stdout)
    check_document(doc)
    return doc


def edges(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["service"]: e for e in doc["edges"]}


def nodes(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n["id"]: n for n in doc["nodes"]}


def curl(url: str) -> int:
    r = subprocess.run(
        ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "10", url],
        capture_output=True,
        text=True,
        check=False,
    )
    return int(r.stdout or 0)


def name_url(m: Mesh, caller: str, dep: str) -> str:
    """The ``NAME_URL`` ``caller`` was given for ``dep``: its edge listener on the proxy."""
    route = next(r for r in m.status()["routes"] if (r["caller"], r["service"]) == (caller, dep))
    return str(route["url"])


def test_the_graph_shows_where_each_call_goes_and_renders_in_every_format(shop: Mesh) -> None:
    doc = graph_json(shop)
    assert doc["project"] is None and doc["metrics"] is True
    (machine,) = doc["machines"]
    assert (machine["id"], machine["local"], machine["node_id"]) == ("local", True, None)
    e, n = edges(doc), nodes(doc)
    assert (e["api"]["target"], e["api"]["to"], e["api"]["range"]) == (
        "local",
        "local:shop/api",
        "^1.2",
    )
    assert n["local:shop/api"]["state"] == "running" and n["local:shop/api"]["version"] == "1.2.0"
    assert n["local:shop/api"]["url"].startswith("http://api.localhost:")
    # Only a fallback: the edge goes there, the node carries the URL.
    assert (e["pay"]["target"], e["pay"]["to"]) == ("fallback", "fallback:shop/pay")
    assert n["fallback:shop/pay"]["url"] == "http://127.0.0.1:9/v1"
    # Nothing: nowhere, 502, and why.
    assert (e["auth"]["target"], e["auth"]["status"], e["auth"]["to"]) == (
        None,
        502,
        "missing:shop/auth",
    )
    assert "no instance runs here or on any peer" in n["missing:shop/auth"]["reason"]
    # Outside web's range: routed under warn, and marked.
    assert [s for s, x in sorted(e.items()) if x["mismatch"]] == ["search"]
    assert "web needs search ^1.0" in e["search"]["warning"]
    # No call went through any edge yet: no traffic anywhere.
    assert all(x["rps"] is None and x["requests"] is None for x in doc["edges"])
    # The decisions are the ones status shows.
    routes = {r["service"]: r for r in shop.status()["routes"]}
    assert {s: x["reason"] for s, x in e.items()} == {s: r["reason"] for s, r in routes.items()}

    text = shop.cli("graph", check=True).stdout
    assert all(len(line) <= 80 for line in text.splitlines()), text
    assert "  web → api ^1.2: served by local api 1.2.0" in text
    assert "  web → auth ^1: nowhere, calls get 502" in text
    assert "! web → search ^1.0: served by local search 0.9.0" in text
    assert "shop/pay: fallback http://127.0.0.1:9/v1" in text

    svg = render_dot(shop.cli("graph", "--format", "dot", check=True).stdout)
    for label in ("shop/web 1.0.0", "shop/api 1.2.0", "shop/search 0.9.0", "shop/auth", "shop/pay"):
        assert label in svg, label
    assert "version mismatch" in svg

    mermaid = check_mermaid(shop.cli("graph", "--format", "mermaid", check=True).stdout)
    assert len(mermaid["nodes"]) == len(doc["nodes"]) and len(mermaid["subgraphs"]) == 1
    assert sorted(arrow for _, arrow, _ in mermaid["edges"]) == sorted(
        ["-->", "-->", "-.->", "==>"]
    )


def test_traffic_on_an_edge_shows_its_rate_and_its_share_of_5xx(shop: Mesh) -> None:
    api_url, auth_url = name_url(shop, "web", "api"), name_url(shop, "web", "auth")
    sent = [curl(f"{api_url}/ok") for _ in range(30)]
    sent += [curl(f"{api_url}/status/500") for _ in range(9)]
    sent += [curl(f"{api_url}/status/503")]
    assert sent == [200] * 30 + [500] * 9 + [503]
    assert [curl(f"{auth_url}/x") for _ in range(3)] == [502] * 3  # devmesh answers nowhere

    def counted() -> dict[str, dict[str, Any]] | None:
        e = edges(graph_json(shop))
        done = e["api"]["requests"] == 40 and e["auth"]["requests"] == 3
        return e if done else None

    e = shop.wait_for(counted, timeout=20, what="the 43 calls counted on their edges")
    assert e["api"]["error_rate"] == 0.25  # 10 of 40 answered 5xx
    assert e["api"]["rps"] > 0 and e["api"]["p50_ms"] is not None and e["api"]["p99_ms"] > 0
    assert (e["auth"]["error_rate"], e["auth"]["target"]) == (1.0, None)
    assert all(e[s]["rps"] is None for s in ("pay", "search"))  # no calls: null, not 0
    text = shop.cli("graph", check=True).stdout
    assert "25% errors" in text and "100% errors" in text
    assert all(len(line) <= 80 for line in text.splitlines()), text


def test_scope_by_project_and_the_errors_of_the_command(shop: Mesh) -> None:
    other = shop.project(
        "other",
        "version: 1\nproject: other\nservices:\n"
        f"  solo:\n    version: 3.0.0\n    command: {PY} svc.py\n",
        {"svc.py": STATUS_SERVICE},
    )
    assert shop.cli("up", "-d", cwd=other, timeout=90).returncode == 0
    everything = graph_json(shop)
    assert {n["project"] for n in everything["nodes"]} == {"shop", "other"}
    only = graph_json(shop, "-p", "other")
    assert only["project"] == "other" and only["edges"] == []
    assert [n["id"] for n in only["nodes"]] == ["local:other/solo"]
    # -f FILE: the project of that file, as status does.
    from_file = shop.cli("-f", str(other / "devmesh.yaml"), "graph", "--format", "json")
    assert json.loads(from_file.stdout)["project"] == "other", from_file.stderr
    # The API says the same for the same question.
    api = client.Client(shop.home / "agent.sock").request(
        "GET", "/v1/graph", query={"project": "other"}
    )
    assert [n["id"] for n in api["nodes"]] == ["local:other/solo"]

    r = shop.cli("-p", "nosuch", "graph")
    assert r.returncode == 1 and r.stdout == ""
    assert "no project 'nosuch' is applied to this agent (projects: shop, other)" in r.stderr
    r = shop.cli("graph", "--format", "png")
    assert r.returncode == 2 and "invalid choice: 'png'" in r.stderr


def test_with_the_metrics_off_the_graph_says_no_traffic_is_known() -> None:
    m = Mesh()
    m.env["DEVMESH_METRICS"] = "off"
    try:
        m.start_agent()
        d = m.project("shop", shop_yaml(), {"svc.py": STATUS_SERVICE})
        assert m.cli("up", "-d", cwd=d, timeout=90).returncode == 0
        assert curl(name_url(m, "web", "api") + "/ok") == 200
        doc = graph_json(m)
        assert doc["metrics"] is False
        assert all(e["requests"] is None and e["rps"] is None for e in doc["edges"])
        text = m.cli("graph", check=True).stdout
        assert "CALLS (the proxy's metrics are off: calls are not counted)" in text
        assert "no traffic" not in text
    finally:
        m.close()


def test_without_an_agent_graph_exits_3_and_says_so() -> None:
    m = Mesh()
    try:
        r = m.cli("graph")
        assert r.returncode == 3 and r.stdout == ""
        assert "agent" in r.stderr
    finally:
        m.close()


@pytest.mark.slow
def test_a_peer_serves_an_edge_and_its_services_show_under_its_machine(team: Team) -> None:
    ana = team.add("ana")
    ben = team.add("ben", team_of=ana)
    team.up(
        ana,
        "owner",
        service("api", "2.3.0", extra="    share: true\n")
        + service("search", "1.0.0", extra="    share: true\n"),
    )
    team.up(
        ben,
        "caller",
        service("web", "1.0.0", extra="    depends_on:\n      api: ^2.1\n") + "  api: {}\n",
    )
    ana_id = ana.peers()["node"]

    def served_by_ana() -> dict[str, Any] | None:
        doc = graph_json(ben)
        return doc if edges(doc)["api"]["target"] == "peer" else None

    doc = ben.wait_for(served_by_ana, timeout=30, what="web -> api served by ana")
    machines = {m["name"]: m for m in doc["machines"]}
    assert [m["name"] for m in doc["machines"]] == ["ben", "ana"]  # this machine first
    assert machines["ben"]["local"] and machines["ben"]["node_id"] == ben.peers()["node"]
    assert (machines["ana"]["id"], machines["ana"]["state"]) == (f"peer:{ana_id}", "alive")
    under_ana = sorted(n["name"] for n in doc["nodes"] if n["machine"] == f"peer:{ana_id}")
    assert under_ana == ["api", "search"]
    api = edges(doc)["api"]
    assert (api["to"], api["node"], api["version"], api["mismatch"]) == (
        f"peer:{ana_id}:shop/api",
        "ana",
        "2.3.0",
        False,
    )
    assert nodes(doc)[api["to"]]["shared"] is True

    # Calls through web's API_URL cross to ana and are counted on ben's edge.
    url = name_url(ben, "web", "api")
    assert [curl(f"{url}/hello") for _ in range(5)] == [200] * 5
    counted = ben.wait_for(
        lambda: (e := edges(graph_json(ben))["api"])["requests"] == 5 and e,
        timeout=20,
        what="5 calls on web -> api",
    )
    assert counted["error_rate"] == 0.0 and counted["target"] == "peer"
    # ana, the owner, sees the same calls arrive from ben's node.
    ben_id = ben.peers()["node"]
    arrived = ana.wait_for(
        lambda: [i for i in graph_json(ana)["inbound"] if i["requests"] == 5],
        timeout=20,
        what="ben's 5 calls counted on ana's side",
    )
    assert [(i["node"], i["machine"], i["to"]) for i in arrived] == [
        ("ben", f"peer:{ben_id}", "local:shop/api")
    ]
    ana_text = ana.cli("graph", check=True).stdout
    assert "CALLS FROM TEAMMATES (last 5 min)\n  ben → shop/api\n" in ana_text

    text = ben.cli("graph", check=True).stdout
    assert all(len(line) <= 80 for line in text.splitlines()), text
    assert "ana (peer at 127.0.0.1, alive)" in text
    assert "  web → api ^2.1: served by ana api 2.3.0" in text
    svg = render_dot(ben.cli("graph", "--format", "dot", check=True).stdout)
    assert "ana (peer at 127.0.0.1, alive)" in svg and "shop/search 1.0.0" in svg
    mermaid = check_mermaid(ben.cli("graph", "--format", "mermaid", check=True).stdout)
    assert len(mermaid["subgraphs"]) == 2


@pytest.fixture
def team() -> Iterator[Team]:
    t = Team()
    try:
        yield t
    finally:
        t.close()
