"""What the proxy relies on in h11's private ``_parsed`` flag, checked against the h11 installed.

The proxy builds every forwarded head with ``_parsed=True`` (``proxy.upstream``): the names and
values came out of h11's own parser, so h11's per-header regexes would only check them twice,
and skipping them is a third of h11's cost per request. The flag is private, so pyproject.toml
bounds h11's version, and these tests fail when an h11 release changes what the flag does:
then the bound must not move until the proxy is adapted.
"""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

import h11
import pytest

ROOT = Path(__file__).resolve().parent.parent
HEADERS = [(b"host", b"api.localhost"), (b"x-odd name", b"value")]
"""A header name h11's validation rejects (a space) and its parser never produces."""


def test_parsed_skips_the_per_header_validation():
    with pytest.raises(h11.LocalProtocolError):
        h11.Request(method=b"GET", target=b"/", headers=HEADERS)
    request = h11.Request(method=b"GET", target=b"/", headers=HEADERS, _parsed=True)
    assert list(request.headers) == HEADERS
    with pytest.raises(h11.LocalProtocolError):
        h11.Response(status_code=200, headers=HEADERS[1:], reason=b"OK")
    response = h11.Response(status_code=200, headers=HEADERS[1:], reason=b"OK", _parsed=True)
    assert list(response.headers) == HEADERS[1:]


def test_parsed_still_normalises_and_checks_framing():
    with pytest.raises(h11.LocalProtocolError, match="Content-Length"):
        h11.Request(
            method=b"POST",
            target=b"/",
            headers=[(b"host", b"a"), (b"content-length", b"1"), (b"content-length", b"2")],
            _parsed=True,
        )
    response = h11.Response(
        status_code=200, headers=[(b"Transfer-Encoding", b"Chunked")], reason=b"OK", _parsed=True
    )
    assert list(response.headers) == [(b"transfer-encoding", b"chunked")]
    with pytest.raises(h11.LocalProtocolError):  # method and target are still checked
        h11.Request(method=b"G T", target=b"/", headers=[(b"host", b"a")], _parsed=True)


def test_a_parsed_head_goes_out_as_h11_frames_any_other():
    client = h11.Connection(h11.CLIENT)
    head = h11.Request(
        method=b"POST",
        target=b"/up",
        headers=[(b"host", b"api.localhost"), (b"transfer-encoding", b"chunked")],
        _parsed=True,
    )
    wire = client.send(head) + client.send(h11.Data(data=b"abc")) + client.send(h11.EndOfMessage())
    server = h11.Connection(h11.SERVER)
    server.receive_data(wire)
    events = []
    while (event := server.next_event()) is not h11.NEED_DATA:
        events.append(type(event))
        if type(event) is h11.EndOfMessage:
            break
    assert events == [h11.Request, h11.Data, h11.EndOfMessage]


def test_the_installed_h11_is_inside_the_bound_pyproject_declares():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (spec,) = [d for d in deps if re.match(r"h11\b", d)]
    upper = re.search(r"<\s*([\d.]+)", spec)
    assert upper is not None, f"h11 needs an upper bound while the proxy uses _parsed: {spec}"
    installed = tuple(int(x) for x in metadata.version("h11").split(".")[:2])
    assert installed < tuple(int(x) for x in upper.group(1).split(".")[:2])
