"""The demo's web: GET / calls $API_URL/items and $CART_URL/cart and shows what came back,
standard library only.

API_URL and CART_URL are loopback addresses of this machine's devmesh proxy; which machine
and which project answer is the mesh's business, not this code's.
"""

import json
import os
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def fetch(url: str) -> tuple[dict, str | None]:
    """The JSON answer and devmesh's version warning; devmesh's 409/502 say why in the body."""
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return json.load(resp), resp.headers.get("X-Devmesh-Version-Warning")
    except urllib.error.HTTPError as exc:
        return {"error": f"answered {exc.code}", "why": exc.read().decode()}, None


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path == "/healthz":
            self._send(200, {"status": "ok"})
            return
        api, warning = fetch(os.environ["API_URL"] + "/items")
        cart, _ = fetch(os.environ["CART_URL"] + "/cart")
        status = 502 if "error" in api or "error" in cart else 200
        self._send(
            status, {"web": "shop-web", "api": api, "cart": cart, "version_warning": warning}
        )

    def _send(self, status: int, body: dict) -> None:
        data = json.dumps(body, indent=2).encode() + b"\n"
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, fmt: str, *args: object) -> None:
        print(f"{self.command} {self.path} -> {args[1] if len(args) > 1 else ''}", flush=True)


if __name__ == "__main__":
    port = int(os.environ["PORT"])
    print(f"web: listening on 127.0.0.1:{port}, API_URL={os.environ['API_URL']}", flush=True)
    ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
