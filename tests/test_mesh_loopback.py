"""Several mesh nodes on one machine, on ``lo`` only: real processes, real sockets."""

from __future__ import annotations

import base64
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from netkit import NodeProc, free_udp_port, init_team, join_team, wait_for

from devmesh.mesh import identity as ids

INTERVAL = "0.3"  # TTL = 0.9 s
API = {"name": "api", "project": "shop", "version": "2.3.1", "health": "healthy"}


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[tuple[Path, int, list[NodeProc]]]:
    started: list[NodeProc] = []
    try:
        yield tmp_path, free_udp_port(), started
    finally:
        for n in started:
            n.stop(signal.SIGKILL)


def start(
    tmp: Path, port: int, started: list[NodeProc], name: str, *extra: str, services=None
) -> NodeProc:
    node = NodeProc(
        tmp / name,
        ["--interfaces", "lo", "--discovery-port", str(port), "--channel-host", "127.0.0.1",
         "--channel-port", "0", "--interval", INTERVAL, *extra],
        services=services,
    )  # fmt: skip
    started.append(node)
    return node


def team(tmp: Path, *names: str) -> None:
    init_team(tmp / names[0], names[0])
    for name in names[1:]:
        join_team(tmp / name, tmp / names[0], name)


@pytest.mark.slow
def test_three_nodes_find_each_other_and_fetch_catalogs(nodes) -> None:
    tmp, port, started = nodes
    team(tmp, "alpha", "beta", "gamma")
    a = start(tmp, port, started, "alpha", services=[API])
    b = start(tmp, port, started, "beta")
    c = start(tmp, port, started, "gamma")
    for node, others in ((a, {"beta", "gamma"}), (b, {"alpha", "gamma"}), (c, {"alpha", "beta"})):
        wait_for(f"{node.home.name} to see {others}", lambda n=node, o=others: n.alive_peers() == o)
    services = wait_for(
        "beta to fetch alpha's catalog", lambda: (b.peer("alpha") or {}).get("services")
    )
    assert services == [{**API, "branch": None}]
    peer = b.peer("alpha")
    assert peer is not None and peer["backends"] == ["broadcast"] and peer["address"] == "127.0.0.1"
    assert peer["port"] == a.port
    assert b.status()["drops"] == {}

    # A clean stop says goodbye: the others drop it without waiting for the TTL.
    c.stop(signal.SIGTERM)
    wait_for("gamma gone from alpha", lambda: a.peer("gamma") is None)
    # A killed node cannot say goodbye: it expires after three missed heartbeats.
    b.stop(signal.SIGKILL)
    expired = wait_for(
        "beta expired on alpha",
        lambda: (a.peer("beta") or {}).get("state") == "expired" and a.peer("beta"),
    )
    assert "3 intervals" in expired["reason"]


@pytest.mark.slow
def test_another_secret_is_kept_out_and_counted(nodes) -> None:
    tmp, port, started = nodes
    team(tmp, "alpha", "beta")
    init_team(tmp / "mallory", "mallory")  # same mesh name, its own CA and secret
    a = start(tmp, port, started, "alpha")
    start(tmp, port, started, "beta")
    start(tmp, port, started, "mallory")
    wait_for("alpha to see beta", lambda: a.alive_peers() == {"beta"})
    drops = wait_for("a bad signature counted", lambda: a.status()["drops"].get("bad-signature"))
    assert drops >= 1
    assert a.peer("mallory") is None


@pytest.mark.slow
def test_a_certificate_of_another_ca_is_refused_and_counted(nodes) -> None:
    tmp, port, started = nodes
    team(tmp, "alpha")
    # mallory knows the secret (say it leaked) but its certificate is from another CA.
    init_team(tmp / "mallory", "mallory")
    secret = (ids.mesh_dir(tmp / "alpha") / "secret").read_bytes()
    ids.write_private(ids.mesh_dir(tmp / "mallory") / "secret", secret)
    a = start(tmp, port, started, "alpha", services=[API])
    m = start(tmp, port, started, "mallory", services=[API])
    refused = wait_for(
        "alpha to refuse mallory",
        lambda: (a.peer("mallory") or {}).get("state") == "refused" and a.peer("mallory"),
    )
    assert refused["reason"].startswith("tls:") and refused["services"] == []
    assert a.status()["drops"].get("refused", 0) >= 1
    # And mallory gets nothing from alpha either: its fetches are refused by alpha's channel.
    wait_for("alpha's channel to count mallory", lambda: a.status()["drops"].get("channel-refused"))
    assert (m.peer("alpha") or {}).get("services") in (None, [])


@pytest.mark.slow
def test_mesh_allow_refuses_peers_outside(nodes) -> None:
    tmp, port, started = nodes
    team(tmp, "alpha", "beta", "gamma")
    a = start(tmp, port, started, "alpha", "--allow", "gamma", services=[API])
    start(tmp, port, started, "beta", services=[API])
    start(tmp, port, started, "gamma", services=[API])
    wait_for("alpha to refuse beta", lambda: (a.peer("beta") or {}).get("state") == "refused")
    assert "mesh.allow" in a.peer("beta")["reason"]  # type: ignore[index]
    wait_for("alpha to accept gamma", lambda: (a.peer("gamma") or {}).get("services"))
    assert a.status()["drops"]["refused"] >= 1


@pytest.mark.slow
def test_the_secret_never_reaches_the_log(nodes) -> None:
    tmp, port, started = nodes
    team(tmp, "alpha", "beta")
    init_team(tmp / "mallory", "mallory")
    a = start(tmp, port, started, "alpha", "--verbose", services=[API])
    start(tmp, port, started, "beta", services=[API])
    start(tmp, port, started, "mallory")
    wait_for("alpha to fetch beta", lambda: (a.peer("beta") or {}).get("services"))
    wait_for("a drop logged", lambda: a.status()["drops"].get("bad-signature"))
    log = a.stop(signal.SIGTERM)
    assert "seen by broadcast" in log and "bad-signature" in log
    raw = base64.b64decode((ids.mesh_dir(tmp / "alpha") / "secret").read_bytes())
    for form in (raw.hex(), base64.b64encode(raw).decode(), repr(raw)):
        assert form not in log
