"""`devmesh dashboard`: print the live dashboard's URL (with the agent's token) and open it.

Why the token is in the URL: the dashboard answers on loopback, which every user of the
machine reaches; only the agent's user can read the token (DEVMESH_HOME, 0600), so the URL
is the login (as Jupyter's). The page moves the token into a cookie at once.

A browser is opened only where one can show a page (a display, macOS, Windows, or
``$BROWSER``), and never waited on for long: on a server over SSH the command prints the URL
and returns. It starts the agent when none runs, as `up` does.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import webbrowser
from typing import Any

from devmesh.commands import _common

EXAMPLE = """example:
  devmesh dashboard
  devmesh dashboard --no-open     # only print the URL (over SSH: forward the proxy's port)
"""
OPEN_WAIT_S = 5.0


def register(sub: Any) -> None:
    p = sub.add_parser(
        "dashboard",
        help="open the live web dashboard (prints its URL with the access token)",
        description="Print the URL of the agent's live dashboard, with the token that gives "
        "access to it, and open it in a browser when one is available.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--no-open", action="store_true", help="only print the URL")
    p.set_defaults(func=lambda a: _common.run_command(run, a))


def run(args: argparse.Namespace) -> int:
    h = _common.home()
    c = _common.ensure_agent(h)
    try:
        data = c.request("GET", "/v1/dashboard")
    except _common.ApiError as exc:
        raise _common.CommandError(f"the agent cannot serve the dashboard: {exc.message}") from exc
    url = str(data["url"])
    print(url, flush=True)
    https = (data.get("urls") or {}).get("https")
    if https:
        print(f"over HTTPS: {https}", file=sys.stderr)
    print(
        "The URL carries this agent's access token: share it with nobody.",
        file=sys.stderr,
    )
    if args.no_open:
        return _common.EXIT_OK
    if not _can_open():
        print(
            "No browser to open here (no display); open the URL above in yours.",
            file=sys.stderr,
        )
        return _common.EXIT_OK
    if _open(url):
        print("Opened in your browser.", file=sys.stderr)
    else:
        print("Could not open a browser; open the URL above in yours.", file=sys.stderr)
    return _common.EXIT_OK


def _can_open() -> bool:
    """Whether a browser can show a page here: never a text browser taking the terminal."""
    if os.environ.get("BROWSER"):
        return True
    if sys.platform in ("darwin", "win32"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def _open(url: str) -> bool:
    """``webbrowser.open`` in a thread, waited on for at most OPEN_WAIT_S: some launchers
    block until the browser exits, and the command must return."""
    result: list[bool] = []

    def opener() -> None:
        try:
            result.append(webbrowser.open(url, new=2))
        except webbrowser.Error:
            result.append(False)

    t = threading.Thread(target=opener, daemon=True)
    t.start()
    t.join(OPEN_WAIT_S)
    return bool(result and result[0]) or t.is_alive()
