"""A notes service: GET / lists the notes, POST / (the body is the note) adds one.

Standard library only. It reads DATABASE_URL once, at start: devmesh starts the service
only after its database is ready. PostgreSQL is reached through `psql`, which finds the
server, role, password and database in the PG* variables devmesh sets; a sqlite:/// URL
is opened with the sqlite3 module.
"""

import http.server
import json
import os
import sqlite3
import subprocess

URL = os.environ["DATABASE_URL"]


def query(sql: str, *args: str) -> list[list[str]]:
    if URL.startswith("sqlite:///"):
        with sqlite3.connect(URL.removeprefix("sqlite:///")) as conn:
            return [[str(c) for c in row] for row in conn.execute(sql.replace("%s", "?"), args)]
    # psql variables (:'v') quote the values: no SQL injection through a note
    names = [f"v{i}" for i in range(len(args))]
    for name in names:
        sql = sql.replace("%s", f":'{name}'", 1)
    cmd = ["psql", "-X", "-q", "-At", "-F", "\t", "-v", "ON_ERROR_STOP=1"]
    for name, value in zip(names, args, strict=True):
        cmd += ["-v", f"{name}={value}"]
    out = subprocess.run(cmd, input=sql, capture_output=True, text=True, check=True).stdout
    return [line.split("\t") for line in out.splitlines() if line]


class Handler(http.server.BaseHTTPRequestHandler):
    def answer(self, status: int, body: object) -> None:
        data = json.dumps(body, indent=2).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path == "/healthz":
            self.answer(200, {"ok": True})
            return
        rows = query("SELECT id, body FROM notes ORDER BY id;")
        self.answer(200, [{"id": int(i), "body": b} for i, b in rows])

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()
        [[new_id]] = query("INSERT INTO notes (body) VALUES (%s) RETURNING id;", body)
        self.answer(201, {"id": int(new_id), "body": body})

    def log_message(self, *args: object) -> None:
        pass


print("notes: database", URL.split("@")[-1], flush=True)
http.server.HTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler).serve_forever()
