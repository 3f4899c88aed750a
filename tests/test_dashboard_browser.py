"""The dashboard in a real headless Chromium: opened from the URL `devmesh dashboard --no-open`
prints, it shows each change of the mesh without a reload (a service started, one stopped, a
peer joining and the route moving to it), restarts a service from its button, refuses the
same restart (and the feed) from a page of another origin, and reconnects by itself when the
agent comes back. Two agents on loopback, discovery pinned to ``lo``.

Set DEVMESH_SCREENSHOTS=docs/img to retake the pictures of docs/dashboard.md.
"""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Iterator

import httpx
import pytest
from agentkit import PY, SERVER, Mesh, free_port
from dashkit import OtherSite, access, chromium, dashboard_url, origin, pid_of, shot
from netkit import free_udp_port
from playwright.sync_api import Page, expect

DEADLINE_MS = 15_000
MESH = """
mesh:
  name: team
  port: {channel}
  discovery:
    interfaces: [lo]
    port: {udp}
    interval_s: 0.3
"""
ANA = """
version: 1
project: shop
{mesh}
services:
  api:
    version: 2.3.1
    command: {py} server.py
    health: {{http: /healthz, interval_s: 0.5}}
    db: {{engine: sqlite}}
  web:
    version: 1.0.0
    command: {py} server.py
    depends_on:
      api: ^2
      pay: ^1
  extra:
    version: 0.1.0
    command: {py} server.py
    depends_on:
      pay: ^2
  pay:
    version: 1.4.0
    command: {py} server.py
    remote: true
  broken:
    version: 0.1.0
    command: {py} -c "import sys; sys.exit(3)"
    restart: {{policy: "no"}}
"""
BEN = """
version: 1
project: shop
{mesh}
services:
  pay:
    version: 1.4.0
    command: {py} server.py
    health: {{http: /healthz, interval_s: 0.5}}
    share: true
"""


class Two:
    def __init__(self) -> None:
        self.udp = free_udp_port()
        self.ana = Mesh()
        self.ben = Mesh()

    def mesh(self) -> str:
        return MESH.format(channel=free_port(), udp=self.udp)

    def close(self) -> None:
        self.ana.close()
        self.ben.close()


@pytest.fixture
def two() -> Iterator[Two]:
    t = Two()
    try:
        yield t
    finally:
        t.close()


def row(page: Page, service: str) -> object:
    return page.locator(f'#service-table tr[data-service="{service}"]')


@pytest.mark.slow
def test_the_page_follows_the_mesh_restarts_and_refuses_other_origins(two: Two) -> None:
    ana, ben = two.ana, two.ben
    ana.mesh_init("ana")
    ben.mesh_join(ana, "ben")
    d = ana.project("shop", ANA.format(mesh=two.mesh(), py=PY), {"server.py": SERVER})
    ana.cli("up", "-d", "api", "web", cwd=d, check=True, timeout=90)
    url = dashboard_url(ana)
    evil_site, same_site = OtherSite("evil.localhost"), OtherSite("devmesh.localhost")
    try:
        with chromium() as browser:
            page = browser.new_page()
            page.goto(url)
            # The token went into the cookie and out of the address bar.
            expect(page).to_have_url(f"{origin(ana)}/", timeout=DEADLINE_MS)
            cookie = next(c for c in browser.cookies() if c["name"].startswith("devmesh-token"))
            assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
            expect(page.locator("#connection")).to_have_attribute("data-live", "yes")
            api, web = row(page, "shop/api"), row(page, "shop/web")
            expect(api).to_have_attribute("data-state", "running", timeout=DEADLINE_MS)
            expect(web).to_have_attribute("data-state", "running", timeout=DEADLINE_MS)
            expect(api.locator("td.reason")).to_have_attribute("data-pid", str(pid_of(ana, "api")))
            expect(api.locator("td.state")).to_have_text("running")  # a word, not a colour
            expect(page.locator('#db-table tr[data-db="shop/api"] td').nth(2)).to_have_text(
                "sqlite", timeout=DEADLINE_MS
            )
            expect(page.locator("#overall")).to_have_attribute("data-level", "healthy")
            assert page.title().startswith("✓ devmesh")
            page.evaluate("window.__same_page = true")  # gone if the page reloads

            # A service started: it appears by itself.
            ana.cli("up", "-d", "extra", cwd=d, check=True, timeout=90)
            expect(row(page, "shop/extra")).to_have_attribute(
                "data-state", "running", timeout=DEADLINE_MS
            )

            # A peer joins: it shows alive, its shared service is listed, web's calls to pay
            # move from nowhere to it, and extra's range (^2) is a version warning.
            pay_route = page.locator('#route-table tr[data-edge="shop/web->pay"] td.goes-to')
            expect(pay_route).to_have_text("nowhere")
            b = ben.project("shop", BEN.format(mesh=two.mesh(), py=PY), {"server.py": SERVER})
            ben.cli("up", "-d", cwd=b, check=True, timeout=90)
            expect(page.locator('#peer-table tr[data-peer="ben"]')).to_have_attribute(
                "data-state", "alive", timeout=DEADLINE_MS
            )
            expect(row(page, "shop/pay@ben")).to_be_visible(timeout=DEADLINE_MS)
            expect(pay_route).to_have_text("peer ben", timeout=DEADLINE_MS)
            expect(page.locator("#warning-list")).to_contain_text("extra → pay")
            expect(page.locator('#graph-canvas g.edge[data-edge*="shop/web"]')).to_have_count(2)

            # Traffic: web's calls to api and to ben's pay (through its API_URL and PAY_URL
            # listeners) put the golden numbers on the edges; browser-like calls and a 404
            # show in the request tail.
            listeners = {
                r["service"]: r["listener"] for r in ana.status()["routes"] if r["caller"] == "web"
            }
            with httpx.Client(trust_env=False, timeout=10) as c:
                for i in range(20):
                    assert c.get(f"http://{listeners['api']}/edge/{i}").status_code == 200
                for i in range(5):
                    assert c.get(f"http://{listeners['pay']}/peer/{i}").status_code == 200
                for i in range(3):
                    c.get(
                        f"http://127.0.0.1:{ana.proxy_port}/direct/{i}",
                        headers={"host": "api.localhost"},
                    )
                assert (
                    c.get(
                        f"http://127.0.0.1:{ana.proxy_port}/", headers={"host": "nothing.localhost"}
                    ).status_code
                    == 404
                )
            web_api = page.locator('#route-table tr[data-edge="shop/web->api"] td')
            expect(web_api.nth(6)).to_have_text("100.0%", timeout=DEADLINE_MS)  # success
            expect(web_api.nth(5)).not_to_have_text("\u2013")  # requests per second
            web_pay = page.locator('#route-table tr[data-edge="shop/web->pay"] td')
            expect(web_pay.nth(6)).to_have_text("100.0%", timeout=DEADLINE_MS)  # via ben
            expect(
                page.locator('#graph-canvas g.edge[data-edge="local:shop/web->local:shop/api"]')
            ).to_contain_text("rps")
            tap = page.locator("#tap-table tbody tr")
            expect(tap.filter(has_text="/edge/19")).to_have_count(1, timeout=DEADLINE_MS)
            expect(
                page.locator('#tap-table tr[data-service="nothing"][data-status="404"]')
            ).to_have_count(1)
            page.select_option("#tap-status", "4xx")  # filtered at the agent: only the 404
            expect(tap).to_have_count(1, timeout=DEADLINE_MS)
            expect(tap.first).to_have_attribute("data-status", "404")
            page.select_option("#tap-status", "")
            page.select_option("#tap-service", "api")
            expect(tap.filter(has_text="/direct/2")).to_have_count(1, timeout=DEADLINE_MS)
            expect(page.locator('#tap-table tbody tr:not([data-service="api"])')).to_have_count(0)
            shot(page, "dashboard")
            shot(page, "dashboard-graph", "#graph")

            # The restart button: a new process, and the page shows its pid.
            old = pid_of(ana, "api")
            page.locator("#restart-shop-api").focus()  # by keyboard: a real button
            page.keyboard.press("Enter")
            expect(page.locator("#action-result")).to_contain_text(
                "Restarted shop/api", timeout=DEADLINE_MS
            )
            new = ana.wait_for(
                lambda: (p := pid_of(ana, "api")) not in (None, old) and p, what="a new pid"
            )
            expect(api.locator("td.reason")).to_have_attribute(
                "data-pid", str(new), timeout=DEADLINE_MS
            )
            expect(api.locator("td.restarts")).to_have_text("1")
            expect(page.locator("#restart-shop-api")).to_be_focused()  # kept across redraws

            # The log of a service, followed live.
            page.locator("#logs-shop-api").click()
            expect(page.locator("#log-lines")).to_contain_text("ready on", timeout=DEADLINE_MS)
            shot(page, "dashboard-log")

            # A service stopped: its row goes.
            ana.cli("down", "web", cwd=d, check=True, timeout=60)
            expect(web).to_have_count(0, timeout=DEADLINE_MS)
            assert page.evaluate("window.__same_page === true")  # never reloaded

            # Pages of other origins try the restart and the feed: evil.localhost (another
            # site: no cookie goes along, 401) and devmesh.localhost on another port (the same
            # site, so the cookie goes along: the Origin check refuses, 403). Nothing restarts.
            before = pid_of(ana, "api")
            for site, status in ((evil_site, 401), (same_site, 403)):
                forged = browser.new_page()
                forged.goto(site.url)
                sent = len(access(ana, "/api/restart"))
                forged.evaluate(
                    """async ([dash]) => {
                      await fetch(dash + "/api/restart", {method: "POST", mode: "no-cors",
                        credentials: "include", headers: {"content-type": "text/plain"},
                        body: JSON.stringify({project: "shop", service: "api"})});
                    }""",
                    [origin(ana)],
                )
                opened = forged.evaluate(
                    """([dash]) => new Promise((done) => {
                      const ws = new WebSocket(dash.replace("http", "ws") + "/feed");
                      ws.onopen = () => done("open");
                      ws.onerror = () => done("refused");
                    })""",
                    [origin(ana)],
                )
                assert opened == "refused", site.url
                got = ana.wait_for(
                    lambda sent=sent: access(ana, "/api/restart")[sent:],
                    what=f"the restart forged by {site.url} in the access log",
                )
                assert [(e["method"], e["status"]) for e in got] == [("POST", status)], site.url
                ana.wait_for(
                    lambda status=status: any(e["status"] == status for e in access(ana, "/feed")),
                    what=f"the feed opened by {site.url} refused",
                )
                forged.close()
            assert pid_of(ana, "api") == before

            # The peer leaves: it is gone from the page and extra's calls to pay go nowhere.
            ben.cli("down", cwd=b, check=True, timeout=60)
            expect(
                page.locator('#peer-table tr[data-peer="ben"][data-state="alive"]')
            ).to_have_count(0, timeout=DEADLINE_MS)
            expect(row(page, "shop/pay@ben")).to_have_count(0)
            extra_pay = page.locator('#route-table tr[data-edge="shop/extra->pay"] td.goes-to')
            expect(extra_pay).to_have_text("nowhere", timeout=DEADLINE_MS)

            # Something fails: the title, the favicon and the header say so, in words.
            ana.cli("up", "-d", "broken", cwd=d, timeout=90)
            broken = row(page, "shop/broken")
            expect(broken).to_have_attribute("data-state", "exited", timeout=DEADLINE_MS)
            expect(broken.locator("td.reason")).to_contain_text("exited with code 3")
            expect(page.locator("#overall")).to_have_attribute("data-level", "failed")
            expect(page.locator("#overall")).to_contain_text("broken (exited)")
            expect(page).to_have_title(re.compile(r"^✗ devmesh: 1 of \d failing: broken"))
            icon = page.locator("#favicon").get_attribute("href") or ""
            assert icon.startswith("data:image/svg+xml,") and "cf222e" in icon  # the red one
            shot(page, "dashboard-failed", "header")

            # The agent goes away and comes back: the page says so, then is live again.
            agent = ana.agent_pid()
            assert agent is not None
            os.kill(agent, signal.SIGKILL)
            expect(page.locator("#connection")).to_have_attribute(
                "data-live", "no", timeout=DEADLINE_MS
            )
            expect(page.locator("#overall")).to_have_attribute("data-level", "offline")
            shot(page, "dashboard-offline")
            ana.start_agent()
            expect(page.locator("#connection")).to_have_attribute(
                "data-live", "yes", timeout=DEADLINE_MS
            )
            expect(row(page, "shop/api")).to_have_attribute(
                "data-state", "running", timeout=DEADLINE_MS
            )
            assert page.evaluate("window.__same_page === true")
    finally:
        evil_site.close()
        same_site.close()
