"""The agent end to end: real agent, real CLI, real service processes on loopback."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import queue
import signal
import subprocess
import threading
import time
import urllib.request

import pytest
from agentkit import PY, SERVER, Mesh, alive

TWO = """
version: 1
project: shop
services:
  api:
    version: 1.4.0
    command: {py} server.py
    env: {{LOG_LEVEL: debug}}
    health: {{http: /healthz, interval_s: 0.5}}
  web:
    version: 0.1.0
    command: {py} server.py
    health: {{http: /}}
    depends_on:
      api: {{version: "^1.2", condition: healthy}}
"""


def two(mesh: Mesh, name: str = "shop", **fmt: str) -> os.PathLike[str]:
    text = TWO.format(py=PY, **fmt).replace("project: shop", f"project: {name}")
    return mesh.project(name, text, {"server.py": SERVER})


def get_json(url: str) -> dict[str, str]:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.load(resp)


def test_up_detached_starts_services_and_injects_urls(mesh: Mesh) -> None:
    d = two(mesh)
    r = mesh.cli("up", "-d", cwd=d, check=True)
    assert "Started the devmesh agent" in r.stderr
    assert "2 service(s) ready" in r.stderr
    data = mesh.status()
    assert data["peers"] == []
    [route] = data["routes"]
    assert (route["caller"], route["service"], route["via"], route["range"]) == (
        "web",
        "api",
        "local",
        "^1.2",
    )
    svc = {s["name"]: s for s in data["services"]}
    for name in ("api", "web"):
        row = svc[name]
        assert {
            "project",
            "name",
            "version",
            "state",
            "health",
            "pid",
            "port",
            "url",
            "node",
            "restarts",
        } <= set(row)
        assert row["project"] == "shop"
        assert row["state"] == "running" and row["health"] == "healthy"
        assert alive(row["pid"])
    assert svc["web"]["url"] == f"http://web.localhost:{mesh.proxy_port}"
    web_env = get_json(f"http://{svc['web']['address']}")
    # API_URL is the proxy's listener for the web->api edge, not api's own port.
    assert web_env["API_URL"].startswith("http://127.0.0.1:")
    assert web_env["API_URL"] != f"http://127.0.0.1:{svc['api']['port']}"
    assert web_env["API_URL"] == route["url"]
    assert (route["target"], route["version"]) == ("local", svc["api"]["version"])
    assert web_env["PORT"] == str(svc["web"]["port"])
    assert web_env["DEVMESH_PROJECT"] == "shop"
    assert get_json(web_env["API_URL"])["LOG_LEVEL"] == "debug"
    table = mesh.cli("status", check=True).stdout
    assert table.splitlines()[0].split()[:5] == ["PROJECT", "NAME", "VERSION", "STATE", "HEALTH"]
    assert "shop" in table and "healthy" in table
    mesh.cli("down", cwd=d, check=True)
    assert mesh.status()["services"] == []
    assert mesh.leftovers() == [mesh.agent_pid()]


def test_up_is_idempotent_and_restarts_only_what_changed(mesh: Mesh) -> None:
    d = two(mesh)
    mesh.cli("up", "-d", cwd=d, check=True)
    before = {n: s["pid"] for n, s in mesh.services().items()}
    again = mesh.cli("up", "-d", cwd=d, check=True)
    assert "everything is up to date" in again.stderr
    assert {n: s["pid"] for n, s in mesh.services().items()} == before

    (d / "devmesh.yaml").write_text((d / "devmesh.yaml").read_text().replace("debug", "info"))
    planned = mesh.cli("plan", cwd=d, check=True).stdout
    assert "api: stop - restart: env.LOG_LEVEL changed" in planned
    assert "web:" not in planned
    mesh.cli("up", "-d", cwd=d, check=True)
    after = {n: s["pid"] for n, s in mesh.services().items()}
    assert after["web"] == before["web"]
    assert after["api"] != before["api"]
    assert not alive(before["api"])
    assert get_json(f"http://{mesh.services()['api']['address']}")["LOG_LEVEL"] == "info"

    # Removing a service from the file stops it.
    text = (d / "devmesh.yaml").read_text()
    (d / "devmesh.yaml").write_text(text[: text.index("  web:")])
    mesh.cli("up", "-d", cwd=d, check=True)
    assert set(mesh.services()) == {"api"}
    assert not alive(before["web"])


def test_dependent_starts_after_dependency_is_healthy(mesh: Mesh) -> None:
    mark = mesh.root / "mark.log"
    d = mesh.project(
        "order",
        f"""
        version: 1
        services:
          db:
            version: 1.0.0
            command: {PY} server.py
            env: {{DELAY: "1.0", MARK: {mark}}}
            health: {{http: /, interval_s: 0.2}}
          api:
            version: 1.0.0
            command: {PY} server.py
            env: {{MARK: {mark}}}
            depends_on: {{db: {{condition: healthy}}}}
          cron:
            version: 1.0.0
            command: {PY} server.py
            env: {{MARK: {mark}}}
        """,
        {"server.py": SERVER},
    )
    mesh.cli("up", "-d", cwd=d, check=True)
    lines = [ln.split() for ln in mark.read_text().splitlines()]
    at = {name: float(t) for name, _, t in lines}
    assert at["api"] > at["db"], lines
    assert at["cron"] < at["db"], "independent services start in parallel, not after db"


def test_crash_loop_backoff_and_give_up(mesh: Mesh) -> None:
    d = mesh.project(
        "crash",
        f"""
        version: 1
        services:
          bad:
            version: 1.0.0
            command: [{PY}, -c, "import sys; print('boom: missing config', flush=True); sys.exit(3)"]
            restart: {{policy: on-failure, max_retries: 2, backoff_s: 0.2}}
        """,
    )
    r = mesh.cli("up", "-d", cwd=d)
    assert r.returncode == 1
    assert "bad:" in r.stderr and "exited with code 3" in r.stderr
    assert "boom: missing config" in r.stderr
    row = mesh.wait_for(
        lambda: (
            (s := mesh.services()["bad"])["restarts"] == 2
            and "gave up" in (s["reason"] or "")
            and s
        ),
        what="two restarts then give up",
    )
    assert row["state"] == "crash-looping"
    assert row["last_exit"] == "exited with code 3"
    assert "boom: missing config" in row["last_log"]
    log = (mesh.home / "agent.log").read_text()
    assert log.count("crash/bad: exited with code 3") == 3
    text = mesh.cli("status", check=True).stdout
    assert "crash/bad: crash-looping: exited with code 3; gave up after 2 restarts" in text


def test_up_again_gives_a_service_that_gave_up_a_fresh_start(mesh: Mesh) -> None:
    d = mesh.project(
        "again",
        f"""
        version: 1
        services:
          once:
            version: 1.0.0
            command: [{PY}, -c, "print('run', flush=True); raise SystemExit(2)"]
            restart: {{policy: "no"}}
        """,
    )
    assert mesh.cli("up", "-d", cwd=d).returncode == 1
    row = mesh.wait_for(lambda: (s := mesh.services()["once"])["state"] == "exited" and s)
    assert row["reason"] == "exited with code 2; restart policy is no"
    assert mesh.cli("up", "-d", cwd=d).returncode == 1
    log = mesh.home / "logs" / "again" / "once.log"
    mesh.wait_for(lambda: log.read_text().count("run") == 2, what="a second run")


BACKOFF_S = 0.3


def run_times(mesh: Mesh, runs: int) -> list[float]:
    """When each of the first ``runs`` runs of a service that exits at once started (its
    own time.time()), under ``restart: {policy: always, backoff_s: BACKOFF_S}``. Also
    bench/recovery.py's measure."""
    d = mesh.project(
        "always",
        f"""
        version: 1
        services:
          tick:
            version: 1.0.0
            command: [{PY}, -c, "import time; print(time.time(), flush=True)"]
            health: {{tcp: false}}
            restart: {{policy: always, backoff_s: {BACKOFF_S}}}
        """,
    )
    mesh.cli("up", "-d", cwd=d)
    log = mesh.home / "logs" / "always" / "tick.log"
    mesh.wait_for(lambda: len(log.read_text().split()) >= runs, timeout=60, what=f"{runs} runs")
    mesh.cli("down", cwd=d, check=True)
    return [float(t) for t in log.read_text().split()[:runs]]


def test_restart_always_restarts_clean_exit_with_growing_delay(mesh: Mesh) -> None:
    gaps = [b - a for a, b in itertools.pairwise(run_times(mesh, 4))]
    # Order, not speed: restart N starts no earlier than its backoff after run N (0.3 s,
    # doubling, + jitter), so each gap is at least that; load only makes gaps longer. A flat
    # delay would start the fourth run about 0.3 s after the third. How long the gaps
    # really are is measured by bench/recovery.py.
    floors = [0.3, 0.6, 1.2]
    assert all(g >= f for g, f in zip(gaps, floors, strict=True)), (gaps, floors)


def test_down_kills_grandchildren_even_outside_the_process_group(mesh: Mesh) -> None:
    script = """
    import os, subprocess, sys, time
    child = subprocess.Popen([sys.executable, "-c", "import os, time; os.setpgid(0, 0); time.sleep(600)"])
    grand = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); time.sleep(600)"])
    print("children", child.pid, grand.pid, flush=True)
    time.sleep(600)
    """
    d = mesh.project(
        "tree",
        f"""
        version: 1
        services:
          forker:
            version: 1.0.0
            command: {PY} fork.py
            health: {{tcp: false}}
        """,
        {"fork.py": script},
    )
    mesh.cli("up", "-d", cwd=d, check=True)
    agent = mesh.agent_pid()
    mesh.wait_for(
        lambda: len(mesh.leftovers()) == 5, what="agent, forker, 2 children, 1 grandchild"
    )
    mesh.cli("down", cwd=d, check=True)
    assert mesh.leftovers() == [agent]


def test_agent_kill_9_then_restart_adopts_without_duplicates(mesh: Mesh) -> None:
    d = two(mesh)
    mesh.cli("up", "-d", cwd=d, check=True)
    pids = {n: s["pid"] for n, s in mesh.services().items()}
    agent = mesh.agent_pid()
    assert agent
    os.kill(agent, signal.SIGKILL)
    mesh.wait_for(lambda: not alive(agent), what="agent death")
    assert all(alive(p) for p in pids.values()), "services survive the agent"
    r = mesh.cli("up", "-d", cwd=d, check=True)  # starts a new agent, which adopts
    assert "Started the devmesh agent" in r.stderr
    assert "everything is up to date" in r.stderr
    now = mesh.services()
    assert {n: s["pid"] for n, s in now.items()} == pids
    assert all(s["state"] == "running" for s in now.values())
    assert "adopted running pid" in (mesh.home / "agent.log").read_text()
    assert sorted(mesh.leftovers()) == sorted([*pids.values(), mesh.agent_pid()])
    mesh.cli("down", cwd=d, check=True)
    assert not any(alive(p) for p in pids.values())


def test_restarted_agent_cleans_up_services_that_died_meanwhile(mesh: Mesh) -> None:
    d = two(mesh)
    mesh.cli("up", "-d", cwd=d, check=True)
    pids = {n: s["pid"] for n, s in mesh.services().items()}
    agent = mesh.agent_pid()
    os.kill(agent, signal.SIGKILL)
    os.kill(pids["web"], signal.SIGKILL)
    mesh.wait_for(lambda: not alive(agent) and not alive(pids["web"]), what="deaths")
    mesh.cli("up", "-d", cwd=d, check=True)
    now = mesh.services()
    assert now["api"]["pid"] == pids["api"]
    assert now["web"]["pid"] != pids["web"] and now["web"]["state"] == "running"


def test_two_projects_on_one_agent_stay_apart(mesh: Mesh) -> None:
    a = two(mesh, "alpha")
    b = two(mesh, "beta")
    mesh.cli("up", "-d", cwd=a, check=True)
    mesh.cli("up", "-d", cwd=b, check=True)
    beta = {n: s["pid"] for n, s in mesh.services("beta").items()}
    assert len(mesh.status()["services"]) == 4
    mesh.cli("down", cwd=a, check=True)
    assert "alpha" not in mesh.status()["agent"]["projects"]  # forgotten: `-p alpha` exits 1
    assert {s["project"] for s in mesh.status()["services"]} == {"beta"}
    assert {n: s["pid"] for n, s in mesh.services("beta").items()} == beta
    assert all(alive(p) for p in beta.values())


def test_agent_sigterm_stops_everything(mesh: Mesh) -> None:
    d = two(mesh)
    mesh.cli("up", "-d", cwd=d, check=True)
    agent = mesh.agent_pid()
    assert agent and len(mesh.leftovers()) == 3
    os.kill(agent, signal.SIGTERM)
    mesh.wait_for(lambda: not mesh.leftovers(), timeout=20, what="no process left")
    assert not (mesh.home / "agent.sock").exists()


GATED = """
version: 1
project: gated
services:
  api:
    version: 1.0.0
    command: {py} server.py
    port: auto  # a command check alone says nothing about a port: ask for one
    health: {{command: test -f {flag}, interval_s: 0.2}}
  web:
    version: 1.0.0
    command: {py} server.py
    depends_on: [api]
"""


@pytest.mark.parametrize("moment", ["waiting for readiness", "following logs"])
def test_attached_up_ctrl_c_stops_what_it_started(mesh: Mesh, moment: str) -> None:
    """SIGINT at a chosen observable point: nothing of the project runs afterwards.

    api is healthy only once a flag file exists, so "waiting for readiness" is a state the
    test holds for as long as it likes, not a race it hopes to win.
    """
    flag = mesh.root / "api-ready.flag"
    d = mesh.project("gated", GATED.format(py=PY, flag=flag), {"server.py": SERVER})
    # A job started in the background by a non-interactive shell (as CI may run the suite)
    # inherits SIGINT ignored, and an ignored signal stays ignored across exec: give `up`
    # the default disposition a terminal user's Ctrl-C meets.
    sigint_default = (
        "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
        "os.execv(sys.executable, [sys.executable, '-m', 'devmesh', 'up'])"
    )
    proc = subprocess.Popen(
        [PY, "-c", sigint_default],
        cwd=d,
        env=mesh.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out: list[str] = []
    err: list[str] = []
    readers = [
        threading.Thread(target=lambda s=s, d=d: d.extend(iter(s.readline, "")), daemon=True)
        for s, d in ((proc.stdout, out), (proc.stderr, err))
    ]
    for r in readers:
        r.start()
    try:
        mesh.wait_for(lambda: any(ln.startswith("api | api ready on") for ln in out), what="api")
        api = mesh.services("gated")["api"]
        assert api["pid"] and alive(api["pid"])
        if moment == "waiting for readiness":
            assert not any(" + api: ready" in ln for ln in err), err  # the wait is on
        else:
            flag.write_text("")
            mesh.wait_for(lambda: any(ln.startswith("web | ") for ln in out), what="web's line")
            mesh.wait_for(lambda: any("service(s) ready" in ln for ln in err), what="ready")
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for r in readers:
            r.join(5)
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == 130, "".join(err)
    assert "Stopped project gated.\n" in err, err
    assert mesh.services() == {}
    assert not alive(api["pid"])
    assert mesh.leftovers() == [mesh.agent_pid()]


def test_logs_tail_and_follow(mesh: Mesh) -> None:
    d = two(mesh)
    mesh.cli("up", "-d", cwd=d, check=True)
    out = mesh.cli("logs", "--tail", "5", cwd=d, check=True).stdout
    assert "api | api ready on" in out and "web | web ready on" in out
    one = mesh.cli("logs", "api", cwd=d, check=True).stdout
    assert one.startswith("api ready on")
    follow = subprocess.Popen(
        [PY, "-m", "devmesh", "logs", "-f", "--tail", "0", "api"],
        cwd=d,
        env=mesh.env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        # The follower prints nothing until a line arrives: append numbered lines until one
        # comes out (that proves it follows), then the next one must come out too.
        assert follow.stdout is not None
        lines: queue.Queue[str] = queue.Queue()
        reader = threading.Thread(
            target=lambda: [lines.put(line) for line in follow.stdout], daemon=True
        )
        reader.start()
        log = mesh.home / "logs" / "shop" / "api.log"
        deadline = time.monotonic() + 20
        first = None
        n = 0
        while first is None and time.monotonic() < deadline:
            n += 1
            with log.open("a") as f:
                f.write(f"a new line {n}\n")
            with contextlib.suppress(queue.Empty):
                first = lines.get(timeout=0.5)
        assert first is not None and first.startswith("a new line "), first
        with log.open("a") as f:
            f.write("the last line\n")
        rest = [lines.get(timeout=20)]
        while rest[-1] != "the last line\n":
            rest.append(lines.get(timeout=20))
        numbered = [first, *rest[:-1]]
        assert numbered == [f"a new line {i}\n" for i in range(int(first.split()[3]), n + 1)]
    finally:
        follow.terminate()
        follow.wait(10)
        follow.stdout.close()


def test_adhoc_run_registers_a_service_without_a_file(mesh: Mesh) -> None:
    (mesh.root / "srv.py").write_text(SERVER)
    r = mesh.cli("run", "echo", "-d", "--version", "0.2.0", "--", PY, "srv.py", check=True)
    assert "1 service(s) ready" in r.stderr
    row = mesh.services("echo")["echo"]
    assert row["version"] == "0.2.0" and row["state"] == "running"
    assert get_json(f"http://{row['address']}")["DEVMESH_SERVICE"] == "echo"
    mesh.cli("down", "-p", "echo", check=True)
    assert mesh.services() == {}


def test_run_service_starts_it_with_dependencies_only(mesh: Mesh) -> None:
    d = mesh.project(
        "sub",
        f"""
        version: 1
        services:
          api: {{version: 1.0.0, command: {PY} server.py}}
          web: {{version: 1.0.0, command: {PY} server.py, depends_on: [api]}}
          other: {{version: 1.0.0, command: {PY} server.py}}
        """,
        {"server.py": SERVER},
    )
    mesh.cli("run", "-d", "web", cwd=d, check=True)
    assert set(mesh.services()) == {"api", "web"}
    mesh.cli("down", "web", cwd=d, check=True)
    assert set(mesh.services()) == {"api"}


def test_service_on_a_fixed_port_starts_once_and_stays(mesh: Mesh) -> None:
    from agentkit import free_port

    port = free_port()
    text = f"""
version: 1
project: fixed
services:
  api:
    version: 1.0.0
    command: {PY} server.py
    port: {port}
    health: {{tcp: true}}
"""
    d = mesh.project("fixed", text, {"server.py": SERVER})
    r = mesh.cli("up", "-d", "--wait-timeout", "15", cwd=d)
    assert r.returncode == 0, r.stderr
    first = mesh.services()["api"]
    assert (first["port"], first["state"]) == (port, "running")
    # More reconcile rounds (each `up` plans again): none may find the instance "changed".
    for _ in range(2):
        again = mesh.cli("up", "-d", "--wait-timeout", "15", cwd=d, check=True)
        assert "everything is up to date" in again.stderr, again.stderr
    now = mesh.services()["api"]
    assert (now["pid"], now["restarts"]) == (first["pid"], 0)
    assert "port changed" not in (mesh.home / "agent.log").read_text()
