"""The demo's web front: renders the API's items; finds the API through $API_URL."""

import html
import json
import os
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

API_URL = os.environ["API_URL"]


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path == "/healthz":
            self._send(200, "ok", "text/plain")
            return
        try:
            with urllib.request.urlopen(f"{API_URL}/items", timeout=5) as resp:
                items = json.load(resp)["items"]
        except OSError as exc:
            self._send(502, f"api unreachable at {API_URL}: {exc}\n", "text/plain")
            return
        rows = "".join(f"<li>{html.escape(i['name'])}</li>" for i in items)
        page = f"<!doctype html><title>quickstart</title><h1>Menu</h1><ul>{rows}</ul>\n"
        self._send(200, page, "text/html; charset=utf-8")

    def _send(self, status: int, body: str, ctype: str) -> None:
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, fmt: str, *args: object) -> None:
        print(f"{self.command} {self.path} -> {args[1] if len(args) > 1 else ''}", flush=True)


if __name__ == "__main__":
    port = int(os.environ["PORT"])
    print(f"web: listening on 127.0.0.1:{port}, api at {API_URL}", flush=True)
    ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
