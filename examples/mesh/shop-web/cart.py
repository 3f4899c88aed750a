"""The demo's cart: a tiny JSON service on $PORT, standard library only."""

import json
import os
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

CART = [{"item": 1, "quantity": 2}]


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path == "/healthz":
            self._send(200, {"status": "ok"})
        elif self.path == "/cart":
            served_by = f"{os.environ.get('DEVMESH_SERVICE')} of {os.environ.get('OWNER')}"
            self._send(200, {"cart": CART, "served_by": served_by})
        else:
            self._send(404, {"error": f"no route {self.path}"})

    def _send(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, fmt: str, *args: object) -> None:
        print(f"{self.command} {self.path} -> {args[1] if len(args) > 1 else ''}", flush=True)


if __name__ == "__main__":
    port = int(os.environ["PORT"])
    print(f"cart: listening on 127.0.0.1:{port}", flush=True)
    sys.stdout.flush()
    ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
