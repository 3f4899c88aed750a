"""The dashboard's pure parts: the token file, the cookie, CSRF and Origin rules, and the
overall state the favicon and the title show."""

from __future__ import annotations

import stat
from pathlib import Path

from devmesh.core import overall
from devmesh.dashboard import auth


def test_the_token_is_created_once_private_and_kept(tmp_path: Path) -> None:
    path = tmp_path / "dashboard.token"
    token = auth.load_or_create_token(path)
    assert len(token) >= 40
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert auth.load_or_create_token(path) == token
    path.chmod(0o644)
    assert auth.load_or_create_token(path) == token
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # tightened
    path.write_text("")
    assert auth.load_or_create_token(path) not in ("", token)


def test_csrf_tokens_are_per_page_and_bound_to_the_agent_token() -> None:
    a, b = auth.mint_csrf("secret"), auth.mint_csrf("secret")
    assert a != b
    assert auth.check_csrf(a, "secret") and auth.check_csrf(b, "secret")
    assert not auth.check_csrf(a, "another agent's token")
    nonce, mac = a.split(".")
    for forged in (None, "", nonce, f"{nonce}.", f".{mac}", f"{nonce}x.{mac}", f"{nonce}.{mac}x"):
        assert not auth.check_csrf(forged, "secret"), forged


def test_cookie_names_carry_the_port_and_requests_present_the_token() -> None:
    assert auth.cookie_name("devmesh.localhost:7080") == "devmesh-token-7080"
    assert auth.cookie_name("devmesh.localhost") == "devmesh-token-default"
    assert auth.cookie_name("[::1]") == "devmesh-token-default"
    cookie = auth.set_cookie("devmesh.localhost:7080", "t0k", secure=False)
    assert cookie == "devmesh-token-7080=t0k; HttpOnly; SameSite=Strict; Path=/"
    assert auth.set_cookie("devmesh.localhost:7443", "t", secure=True).endswith("; Secure")
    headers = {"host": "devmesh.localhost:7080", "cookie": "a=1; devmesh-token-7080=t0k"}
    assert auth.request_token(headers) == "t0k"
    other_port = {"host": "devmesh.localhost:7081", "cookie": "devmesh-token-7080=t0k"}
    assert auth.request_token(other_port) is None
    assert auth.request_token({"authorization": "Bearer abc"}) == "abc"
    assert auth.same("abc", "abc") and not auth.same("", "") and not auth.same(None, "abc")


def test_origins_match_exactly() -> None:
    mine = [
        auth.origin("http", "devmesh.localhost", 7080),
        auth.origin("https", "devmesh.localhost", 443),
    ]
    assert mine == ["http://devmesh.localhost:7080", "https://devmesh.localhost"]
    assert auth.origin_allowed("http://devmesh.localhost:7080", mine)
    assert auth.origin_allowed("HTTP://DEVMESH.LOCALHOST:7080", mine)
    for other in (
        None,
        "null",
        "http://devmesh.localhost:7081",
        "http://evil.localhost:7080",
        "https://devmesh.localhost:7080",
        "http://devmesh.localhost:7080.evil.com",
    ):
        assert not auth.origin_allowed(other, mine), other


def row(name: str, state: str, **kw: object) -> dict[str, object]:
    return {"name": name, "state": state, **kw}


def test_overall_state_in_words() -> None:
    assert overall.summarise([]) == overall.Overall("idle", "no service runs here")
    assert overall.summarise([row("pay", "external")]).level == "idle"
    ok = [row("api", "running"), row("web", "running")]
    assert overall.summarise(ok) == overall.Overall("healthy", "all 2 services running")
    starting = overall.summarise([*ok, row("db", "starting")])
    assert starting == overall.Overall("starting", "1 of 3 not ready yet: db (starting)")
    failed = overall.summarise([*ok, row("db", "starting"), row("job", "crash-looping")])
    assert failed == overall.Overall("failed", "1 of 4 failing: job (crash-looping)")
    assert (
        overall.summarise([row("job", "exited", last_exit="exited with code 0")]).level == "healthy"
    )
    assert (
        overall.summarise([row("job", "exited", last_exit="exited with code 3")]).level == "failed"
    )
    many = overall.summarise([row(f"s{i}", "unhealthy") for i in range(5)])
    assert many.words.endswith("and 2 more")
