"""`devmesh up`: apply devmesh.yaml to the agent and follow the services' logs.

Attached (the default) the command opens the log feed *before* applying, so the first line
a service prints is shown; Ctrl-C then stops what it applied gracefully, wherever the
interrupt lands once the apply is sent (during the request, the readiness wait or the log
stream), as compose does. With ``-d`` it returns
once every selected service reached its condition, or exits 1 naming the one that did not,
with the reason and the last lines of its log.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from typing import Any

from devmesh.commands import _common

EXAMPLE = """example:
  devmesh up             start every service of ./devmesh.yaml, show their logs; Ctrl-C stops
  devmesh up -d          start in the background; return when all are ready
  devmesh up -d web      start web and what it depends on
  devmesh up -d --no-deps web   start web alone: its dependencies come from this machine's
                         other projects, teammates or their fallback
"""


def register(sub: Any) -> None:
    p = sub.add_parser(
        "up",
        help="start the project's services (attached; -d to detach)",
        description="Apply devmesh.yaml: start what is missing, restart what changed, stop "
        "what was removed. Starts the agent when none runs.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_up_args(p)
    _common.add_project_name_arg(p)
    p.set_defaults(func=lambda a: _common.run_command(run, a))


def add_up_args(p: argparse.ArgumentParser) -> None:
    _common.add_file_arg(p)
    p.add_argument("-d", "--detach", action="store_true", help="return once services are ready")
    p.add_argument(
        "--wait-timeout",
        type=float,
        default=300.0,
        metavar="S",
        help="give up waiting for readiness after S seconds (default 300)",
    )
    p.add_argument(
        "--no-deps",
        action="store_true",
        help="start only the SERVICEs named, not their dependencies (those are routed: "
        "this machine's other projects, teammates, then their fallback)",
    )
    p.add_argument(
        "services", nargs="*", metavar="SERVICE", help="only these (and their dependencies)"
    )


def run(args: argparse.Namespace) -> int:
    loaded = _common.load(args)
    proj = loaded.project
    from devmesh.core import desired, model

    unknown = [s for s in args.services if s not in proj.services]
    if unknown:
        raise _common.CommandError(
            f"no such service {', '.join(map(repr, unknown))} in project {proj.name} "
            f"(services: {', '.join(proj.services)}); nothing was applied"
        )
    no_deps = bool(getattr(args, "no_deps", False))
    if no_deps and not args.services:
        raise _common.CommandError(
            "--no-deps starts only the services named: name them (devmesh up --no-deps web)",
            _common.EXIT_USAGE,
        )
    document = model.to_document(proj)
    return apply_and_follow(
        args,
        project=proj.name,
        document=document,
        directory=proj.directory,
        source=proj.source,
        services=args.services or None,
        log_services=sorted(desired.enabled_closure(proj, args.services or None, no_deps=no_deps)),
        agent_env=_common.proxy_env(proj.proxy, proj.metrics),
        no_deps=no_deps,
    )


def apply_and_follow(
    args: argparse.Namespace,
    *,
    project: str,
    document: dict[str, Any],
    directory: str,
    source: str,
    services: list[str] | None,
    log_services: list[str],
    agent_env: dict[str, str] | None = None,
    no_deps: bool = False,
) -> int:
    h = _common.home()
    err = sys.stderr
    applying = False  # from the moment the apply is sent, Ctrl-C stops what it started
    try:
        with _common.project_lock(h, project, out=err):
            client = _common.ensure_agent(h, out=err, agent_env=agent_env)
            follower = None
            if not args.detach:
                follower = _LogFollower(h, project, log_services)
                follower.start()
            applying = not args.detach
            try:
                result = client.request(
                    "POST",
                    "/v1/apply",
                    {
                        "document": document,
                        "directory": directory,
                        "source": source,
                        "services": services,
                        "no_deps": no_deps,
                        "base_env": dict(os.environ),
                    },
                )
            except _common.ApiError as exc:
                applying = False  # the agent refused it as a whole: nothing started
                raise _common.CommandError(f"nothing was applied: {exc.message}") from exc
            for w in result.get("warnings", []):
                print(f"warning: {w}", file=err)
            _print_actions(result, err)
            for r in result.get("routed", []):
                print(f"  {r['service']}: {r['reason']}", file=err)
            ok = _wait(client, project, result["services"], args.wait_timeout, err)
        if args.detach:
            return _common.EXIT_OK if ok else _common.EXIT_FAILED
        assert follower is not None
        while not follower.done.wait(0.25):
            pass
        print("devmesh: the agent closed the log stream", file=err)
        return _common.EXIT_FAILED
    except KeyboardInterrupt:
        if not applying:
            raise
        _stop_after_interrupt(h, project, services, err)
        return 130


def _stop_after_interrupt(h: Any, project: str, services: list[str] | None, err: Any) -> None:
    """Stop what this attached `up` applied, as compose does on Ctrl-C.

    Wherever the interrupt landed (during the apply request, the readiness wait or the log
    stream), the agent may have started services: asking it to stop them is always right,
    and harmless when it had not. A second Ctrl-C while stopping is ignored, so the project
    is never left half stopped by an impatient double press.
    """
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        print(f"\nStopping project {project}...", file=err)
        with _common.project_lock(h, project, out=err):
            _common.client(h, timeout_s=600).request(
                "POST", "/v1/down", {"project": project, "services": services}
            )
        print(f"Stopped project {project}.", file=err)
    finally:
        signal.signal(signal.SIGINT, previous)


def _print_actions(result: dict[str, Any], out: Any) -> None:
    acts = [a for a in result.get("actions", []) if a["action"] != "wait"]
    if not acts:
        print(f"Project {result['project']}: everything is up to date.", file=out)
    for a in acts:
        print(f"  {a['service']}: {a['action']} ({a['reason']})", file=out)


def _wait(client: Any, project: str, services: list[str], timeout_s: float, out: Any) -> bool:
    """Show progress until each service is ready or failed; True when all are ready."""
    started = time.monotonic()
    colour = _common.use_colour(out)
    deadline = started + timeout_s
    query = {"project": project, "services": ",".join(services)}
    for item in client.stream("GET", "/v1/wait", query=query):
        elapsed = time.monotonic() - started
        if item.get("done"):
            failures = item.get("failures") or {}
            for name, reason in failures.items():
                print(_common.paint(f" x {name}: {reason}", "31", colour), file=out)
                _print_last_log(client, project, name, out)
            if not failures:
                print(
                    f"Project {project}: {len(services)} service(s) ready in {elapsed:.1f} s.",
                    file=out,
                )
            return not failures
        status = item.get("status")
        name = item.get("service")
        if item.get("heartbeat"):
            pass
        elif status == "ready":
            at = f": {item['url']}" if item.get("url") else ""
            print(_common.paint(f" + {name}: ready ({elapsed:.1f} s){at}", "32", colour), file=out)
            note = _short_name_note(client, project, name, item.get("url"))
            if note:
                print(f"   {note}", file=out)
        elif status == "pending" and item.get("reason"):
            print(f" . {name}: {item['reason']}", file=out)
        if time.monotonic() > deadline:
            print(f"devmesh up: still not ready after {timeout_s:.0f} s", file=out)
            return False
    return False


def _short_name_note(client: Any, project: str, name: str, url: str | None) -> str | None:
    """Why ``url`` is ``NAME.PROJECT.localhost``: who keeps the short ``NAME.localhost``.

    The project applied first keeps it (see agent.routing); a user who opens
    ``NAME.localhost`` would reach that other project's service, so `up` says so.
    """
    if not url or f"//{name}.{project}.localhost:".lower() not in url.lower():
        return None
    try:
        rows = client.request("GET", "/v1/status")["services"]
    except _common.ApiError:
        rows = []
    keeper = next(
        (
            r["project"]
            for r in rows
            if r["project"] != project
            and r["name"].lower() == name.lower()
            and f"//{name}.localhost:".lower() in (r.get("url") or "").lower()
        ),
        None,
    )
    by = f"project {keeper}, applied first" if keeper else "another project, applied first"
    return f"{name}.localhost stays with {by}; {name} of {project} answers at {url}"


def _print_last_log(client: Any, project: str, name: str, out: Any) -> None:
    try:
        status = client.request("GET", "/v1/status", query={"project": project})
    except _common.ApiError:
        return
    for row in status["services"]:
        if row["name"] == name and row.get("last_log"):
            print(f"   last lines of {row['log']}:", file=out)
            for line in row["last_log"]:
                print(f"   | {line}", file=out)


class _LogFollower(threading.Thread):
    """Prints `NAME | line` for each log line; ready once the agent has fixed its offsets."""

    def __init__(self, h: Any, project: str, services: list[str] | None) -> None:
        super().__init__(daemon=True)
        self.client = _common.client(h, timeout_s=3600 * 24 * 365)
        self.query = {"project": project, "follow": "1"}
        if services:
            self.query["services"] = ",".join(services)
        self.ready = threading.Event()
        self.done = threading.Event()
        self.colour = _common.use_colour(sys.stdout)
        self.width = max((len(s) for s in services or ()), default=0)
        self.colours = {s: _common.colour_for(i) for i, s in enumerate(services or ())}
        self.error: Exception | None = None

    def start(self) -> None:
        super().start()
        self.ready.wait(10)

    def run(self) -> None:
        try:
            for item in self.client.stream("GET", "/v1/logs", query=self.query):
                if item.get("ready"):
                    self.ready.set()
                    continue
                self._print(item["service"], item["line"])
        except Exception as exc:  # the stream's end is reported by `done`
            self.error = exc
        finally:
            self.ready.set()
            self.done.set()

    def _print(self, name: str, line: str) -> None:
        if name not in self.colours:
            self.colours[name] = _common.colour_for(len(self.colours))
            self.width = max(self.width, len(name))
        prefix = _common.paint(f"{name:<{self.width}} |", self.colours[name], self.colour)
        sys.stdout.write(f"{prefix} {line}\n")
        sys.stdout.flush()
