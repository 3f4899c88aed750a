"""Two mesh nodes on this machine's loopback with the real ``serf``: tags follow the catalog,
and a machine without ``serf`` keeps its other backends. Serf binds 127.0.0.1 only."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
from pathlib import Path

import pytest
from agentkit import free_port
from netkit import free_udp_port

from devmesh.core import catalog
from devmesh.mesh import identity as ids
from devmesh.mesh import node, serf

API = catalog.SharedService(name="api", project="shop", version="1.0.0", health="healthy")


async def until(what: str, check, timeout_s: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    """Wait for an observable state; the deadline names what did not happen."""
    try:
        async with asyncio.timeout(timeout_s):
            while not check():
                await asyncio.sleep(0.02)  # polling an observable state with a deadline
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


def make(tmp: Path, name: str, lines: list[str], **kw: object) -> node.Node:
    settings = node.NodeSettings(
        home=tmp / name,
        interfaces=("lo",),
        channel_host="127.0.0.1",
        channel_port=0,
        interval_s=0.5,
        **kw,  # type: ignore[arg-type]
    )
    return node.Node(settings, log=lines.append)


def team(tmp: Path) -> None:
    a = ids.init(tmp / "alpha", "team", node_name="alpha")
    ids.join(tmp / "beta", ids.encode_bundle(a.team), node_name="beta")


@pytest.mark.skipif(shutil.which("serf") is None, reason="needs the serf package")
def test_serf_finds_the_peer_and_its_tags_follow_the_catalog(tmp_path: Path) -> None:
    team(tmp_path)
    pa, pb = free_port(), free_port()
    log: list[str] = []

    async def main() -> None:
        a = make(tmp_path, "alpha", log, broadcast=False, serf=True, serf_port=pa)
        b = make(
            tmp_path,
            "beta",
            log,
            broadcast=False,
            serf=True,
            serf_port=pb,
            serf_join=(f"127.0.0.1:{pa}",),
        )
        await a.start()
        await b.start()
        try:
            await until("both meet", lambda: a.registry.get(b.identity.node_id) is not None)
            peer = a.registry.get(b.identity.node_id)
            assert peer is not None and peer.backends == frozenset({"serf"})
            # A new revision while alpha's Serf does not answer (stopped): the tag push fails
            # and must be retried, or beta would hold a stale revision for ever.
            pid = a.status()["serf"]["pid"]  # type: ignore[index]
            os.kill(pid, signal.SIGSTOP)
            try:
                a.set_services((API,))
                # Three calls timed out (5 s each, two at a time): the push was one of them.
                await until("a failed push", lambda: a.status()["serf"]["errors"] >= 3)  # type: ignore[index]
            finally:
                os.kill(pid, signal.SIGCONT)
            await until(
                "beta fetches alpha's new catalog",
                lambda: (
                    (p := b.registry.get(a.identity.node_id)) is not None
                    and p.catalog is not None
                    and p.catalog.services == (API,)
                ),
            )
            await until("alpha's tags pushed", lambda: a.status()["sent"] == {"serf": 1})
            await until(
                "beta's view of alpha's tags to carry the new revision",
                lambda: (
                    (p := b.registry.get(a.identity.node_id)) is not None
                    and p.revision == p.catalog_revision == a.catalog.revision
                ),
            )
        finally:
            await b.stop()
            await a.stop()
        await until("alpha sees beta leave", lambda: True)
        assert (tmp_path / "alpha" / "logs" / "serf.log").exists()
        assert (tmp_path / "alpha" / "serf" / "agent.json").stat().st_mode & 0o077 == 0

    asyncio.run(main())


def test_without_serf_the_other_backends_work_and_the_log_names_the_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    team(tmp_path)
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    port = free_udp_port()
    log: list[str] = []

    async def main() -> None:
        a = make(tmp_path, "alpha", log, discovery_port=port, serf=True)
        b = make(tmp_path, "beta", log, discovery_port=port, serf=True)
        await a.start()
        await b.start()
        try:
            await until("broadcast still finds beta", lambda: a.registry.get(b.identity.node_id))
            assert "serf" not in a.status()["sent"]
        finally:
            await b.stop()
            await a.stop()

    asyncio.run(main())
    assert any(serf.PACKAGE_HINT in line for line in log)
