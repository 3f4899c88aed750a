"""What several commands share: finding the agent (and starting it), loading the file, output.

Stdlib only at top level; the config loader (yaml, jsonschema) is imported only by the
commands that read devmesh.yaml, so `devmesh status` stays fast.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from devmesh.agent.client import AgentUnreachable, ApiError, Client
from devmesh.agent.paths import Home

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_AGENT = 3
AGENT_START_TIMEOUT_S = 15.0

__all__ = ["AgentUnreachable", "ApiError", "Client"]


class CommandError(Exception):
    """Ends the command with a message on stderr and an exit status."""

    def __init__(self, message: str, status: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.status = status


def home() -> Home:
    return Home.from_env()


def client(h: Home | None = None, *, timeout_s: float = 60) -> Client:
    return Client((h or home()).socket, timeout_s=timeout_s)


def agent_running(c: Client) -> bool:
    try:
        c.request("GET", "/v1/status")
    except AgentUnreachable:
        return False
    return True


def ensure_agent(
    h: Home, *, out: IO[str] = sys.stderr, agent_env: dict[str, str] | None = None
) -> Client:
    """The agent's client, starting the agent in the background when none answers.

    A new agent gets ``agent_env`` (the project's ``proxy:`` settings, see proxy_env) for
    each variable the environment does not already set.
    """
    c = client(h)
    if agent_running(c):
        return c
    h.ensure()
    env = dict(os.environ)
    for key, value in (agent_env or {}).items():
        env.setdefault(key, value)
    log_file = open(h.agent_log, "ab")  # noqa: SIM115 - handed to the child
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "devmesh", "agent"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
            start_new_session=True,
            close_fds=True,
        )
    finally:
        log_file.close()
    deadline = time.monotonic() + AGENT_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if agent_running(c):
            print(f"Started the devmesh agent (pid {proc.pid}); its log: {h.agent_log}", file=out)
            return c
        code = proc.poll()
        if code is not None:
            if agent_running(c):  # another `up` started one at the same moment
                return c
            raise CommandError(
                f"the devmesh agent exited with status {code} at start; last lines of "
                f"{h.agent_log}:\n{_tail(h.agent_log, 15)}"
            )
        time.sleep(0.05)
    raise CommandError(
        f"the devmesh agent did not answer on {h.socket} within "
        f"{AGENT_START_TIMEOUT_S:.0f} s; see {h.agent_log}"
    )


def proxy_env(proxy: Any, metrics: Any = None) -> dict[str, str]:
    """A project's ``proxy:`` (and ``metrics:``) as the variables the agent reads at start
    (see agent.daemon)."""
    env = {
        "DEVMESH_PROXY_PORT": str(proxy.port),
        "DEVMESH_HTTPS_PORT": str(proxy.https_port),
        "DEVMESH_PROXY_CONNECT_TIMEOUT_S": str(proxy.connect_timeout_s),
        "DEVMESH_PROXY_IDLE_TIMEOUT_S": str(proxy.idle_timeout_s),
        "DEVMESH_PROXY_HEADER_TIMEOUT_S": str(proxy.header_timeout_s),
        "DEVMESH_PROXY_KEEPALIVE_TIMEOUT_S": str(proxy.keepalive_timeout_s),
    }
    if proxy.max_body_mb is not None:
        env["DEVMESH_PROXY_MAX_BODY_MB"] = str(proxy.max_body_mb)
    if metrics is not None:
        env["DEVMESH_METRICS_RETENTION_DAYS"] = str(metrics.retention_days)
    return env


def _tail(path: Path, n: int) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join("  " + line for line in lines[-n:])


FILE_HELP = (
    "devmesh.yaml to use ('-' reads stdin); repeat to merge several in order. Default: the "
    "one found in this folder or a parent, with devmesh.override.yaml beside it merged on top"
)


def add_file_arg(p: argparse.ArgumentParser, *flags: str) -> None:
    """``-f FILE``, repeatable (``action="append"``): a list of files, merged in order."""
    p.add_argument(
        *(flags or ("-f", "--file")), dest="file", action="append", metavar="FILE", help=FILE_HELP
    )


def add_project_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-p",
        "--project",
        metavar="NAME",
        help="act on this applied project by name, without reading a file",
    )


def add_project_name_arg(p: argparse.ArgumentParser) -> None:
    """``-p NAME`` of the commands that apply a file (`up`, `plan`): compose's
    ``--project-name``, the name the file's project is applied under."""
    p.add_argument(
        "-p",
        "--project",
        metavar="NAME",
        help="apply the file as project NAME (default: its project:, else the folder's name)",
    )
    p.set_defaults(project_names_file=True)


PROJECT_NAME = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")


def load(args: argparse.Namespace) -> Any:
    """Load and validate devmesh.yaml; CommandError with every problem when it is invalid.

    A command with ``-p NAME`` that applies the file (see add_project_name_arg) gets the
    project under that name, as ``docker compose -p NAME up`` does.
    """
    loaded = load_file(getattr(args, "file", None) or getattr(args, "project_file", None))
    name = getattr(args, "project", None) if getattr(args, "project_names_file", False) else None
    if name:
        if not PROJECT_NAME.fullmatch(name):
            raise CommandError(
                f"-p {name!r}: a project name is lower-case letters, digits and dashes "
                "(a host name label, at most 63 characters)",
                EXIT_USAGE,
            )
        import dataclasses

        loaded = dataclasses.replace(loaded, project=dataclasses.replace(loaded.project, name=name))
    return loaded


def load_file(files: list[str] | str | None) -> Any:
    """Load the files of ``-f`` merged in order ('-' is stdin); None: the devmesh.yaml found
    here or in a parent, with its devmesh.override.yaml (see loader.config_files)."""
    from devmesh.config import loader

    try:
        given = [files] if isinstance(files, str) else files
        loaded = loader.load_files(loader.config_files(given))
    except loader.ConfigNotFound as exc:
        raise CommandError(str(exc)) from exc
    except loader.ConfigError as exc:
        raise CommandError(str(exc)) from exc
    for w in loaded.warnings:
        print(f"warning: {_problem_text(w)}", file=sys.stderr)
    return loaded


def _problem_text(p: Any) -> str:
    return f"{p.file}:{p.line}:{p.column}: {p.path}: {p.message}" if p.path else str(p.message)


def project_name(args: argparse.Namespace) -> str:
    """The project a command acts on: -p NAME, else the one of the devmesh.yaml found."""
    if getattr(args, "project", None):
        return str(args.project)
    return str(load(args).project.name)


def applied_projects(c: Client) -> dict[str, list[str]]:
    """Each project applied to the agent, with the services it runs or waits for."""
    data = c.request("GET", "/v1/status")
    out: dict[str, list[str]] = {p: [] for p in (data.get("agent") or {}).get("projects", [])}
    for row in data.get("services") or []:
        out.setdefault(row["project"], []).append(row["name"])
    return out


def unknown_project(project: str, projects: Any) -> CommandError:
    known = ", ".join(sorted(projects)) or "none"
    return CommandError(f"no project {project!r} is applied to this agent (projects: {known})")


def unknown_services(names: list[str], project: str, known: Any) -> CommandError:
    listed = ", ".join(sorted(known)) or "none"
    return CommandError(
        f"no such service {', '.join(map(repr, names))} in project {project} (services: {listed})"
    )


@contextlib.contextmanager
def project_lock(h: Home, project: str, *, out: IO[str] = sys.stderr) -> Iterator[None]:
    """Serialise `up`/`down` of one project: a second one waits, and says for whom."""
    h.ensure()
    path = h.project_lock(project)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            print(
                f"another devmesh command (pid {holder}) is changing project {project}; "
                "waiting for it to finish...",
                file=out,
            )
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


# ------------------------------------------------------------------- colour

_COLOURS = ("36", "33", "32", "35", "34", "91", "96", "93", "92", "95", "94")


def use_colour(stream: IO[str]) -> bool:
    return stream.isatty() and not os.environ.get("NO_COLOR")


def paint(text: str, code: str, enabled: bool) -> str:
    return f"\x1b[{code}m{text}\x1b[0m" if enabled else text


def colour_for(index: int) -> str:
    return _COLOURS[index % len(_COLOURS)]


def run_command(func: Any, args: argparse.Namespace) -> int:
    """Call a handler, turning the expected failures into a message and an exit status."""
    try:
        return int(func(args) or 0)
    except CommandError as exc:
        print(f"devmesh {args.command}: {exc}", file=sys.stderr)
        return exc.status
    except AgentUnreachable as exc:
        print(f"devmesh {args.command}: {exc}", file=sys.stderr)
        return EXIT_AGENT
    except ApiError as exc:
        print(f"devmesh {args.command}: {exc.message}", file=sys.stderr)
        return EXIT_FAILED
