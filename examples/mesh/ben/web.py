"""The demo's web: GET / calls $API_URL/items and shows what came back, standard library only.

API_URL is a loopback address of Ben's own devmesh proxy; which machine answers is the
mesh's business, not this code's.
"""

import json
import os
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path == "/healthz":
            self._send(200, {"status": "ok"})
            return
        try:
            with urllib.request.urlopen(os.environ["API_URL"] + "/items", timeout=10) as resp:
                answer = json.load(resp)
                warning = resp.headers.get("X-Devmesh-Version-Warning")
        except urllib.error.HTTPError as exc:  # devmesh's 409/502 say why in the body
            self._send(502, {"error": f"api answered {exc.code}", "why": exc.read().decode()})
            return
        self._send(200, {"web": "ben", "api": answer, "version_warning": warning})

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
