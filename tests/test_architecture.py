"""Import contracts: the layering of DESIGN.md, enforced (as kopf does) rather than hoped for.

- devmesh/core is pure: no I/O modules, no clock, no randomness, nothing of devmesh outside core.
- A driver package never imports another driver package, nor the agent; the agent wires them.
- config builds the model and imports only core; the CLI commands talk to the agent through
  its client and never import the drivers that run services.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "devmesh"
DRIVERS = ("supervisor", "proxy", "mesh", "db", "dashboard")
"""I/O drivers. The agent is the one layer above them that wires them together."""
CORE_FORBIDDEN = {
    "anyio",
    "asyncio",
    "socket",
    "ssl",
    "subprocess",
    "psycopg",
    "docker",
    "time",
    "os",
    "io",
    "pathlib",
    "shutil",
    "tempfile",
    "threading",
    "select",
    "selectors",
    "random",
    "http",
    "urllib",
    "signal",
    "fcntl",
    "h11",
    "wsproto",
    "netifaces",
    "multiprocessing",
}


def imports_of(path: Path, root: Path = ROOT) -> set[str]:
    """Every module a file imports, at any depth (function-level imports included).

    ``root`` is the ``devmesh`` package folder the file belongs to (relative imports resolve
    from it).
    """
    tree = ast.parse(path.read_text(), filename=str(path))
    out: set[str] = set()
    package = ".".join(path.relative_to(root.parent).with_suffix("").parts[:-1])
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join([*base, node.module] if node.module else base)
            else:
                mod = node.module or ""
            out.add(mod)
            out.update(f"{mod}.{alias.name}" for alias in node.names)
    return out


def files(sub: str) -> list[Path]:
    return sorted((ROOT / sub).rglob("*.py"))


def test_imports_are_parsed_including_function_level() -> None:
    mods = imports_of(ROOT / "core" / "model.py")
    assert "shlex" in mods  # imported inside a function
    assert "devmesh.core.model" not in mods


def core_impurities(path: Path, root: Path = ROOT) -> list[str]:
    return sorted(
        m
        for m in imports_of(path, root)
        if m.split(".")[0] in CORE_FORBIDDEN
        or (m.startswith("devmesh") and not m.startswith("devmesh.core") and m != "devmesh")
    )


@pytest.mark.parametrize("path", files("core"), ids=lambda p: p.name)
def test_core_is_pure(path: Path) -> None:
    bad = core_impurities(path)
    assert not bad, f"{path.relative_to(ROOT.parent)} imports {bad}: core must stay free of I/O"


@pytest.mark.parametrize("driver", DRIVERS)
def test_drivers_do_not_import_each_other(driver: str) -> None:
    others = [d for d in (*DRIVERS, "agent") if d != driver]
    problems = []
    for path in files(driver):
        for m in imports_of(path):
            parts = m.split(".")
            if parts[0] == "devmesh" and len(parts) > 1 and parts[1] in others:
                problems.append(f"{path.relative_to(ROOT.parent)} imports {m}")
            if (
                parts[0] == "devmesh"
                and len(parts) > 1
                and parts[1] in ("cli", "commands", "config")
            ):
                problems.append(f"{path.relative_to(ROOT.parent)} imports {m} (drivers sit below)")
    assert not problems, "\n".join(problems)


def test_agent_does_not_import_the_cli() -> None:
    problems = [
        f"{p.relative_to(ROOT.parent)} imports {m}"
        for p in files("agent")
        for m in imports_of(p)
        if m.startswith(("devmesh.cli", "devmesh.commands", "devmesh.config"))
    ]
    assert not problems, "\n".join(problems)


def test_config_imports_only_core() -> None:
    problems = [
        f"{p.relative_to(ROOT.parent)} imports {m}"
        for p in files("config")
        for m in imports_of(p)
        if m.startswith("devmesh.") and m.split(".")[1] not in ("core", "config")
    ]
    assert not problems, "\n".join(problems)


COMMAND_FILE_MODULES = {
    "devmesh.proxy.ca": "ca.py",
    "devmesh.mesh.identity": "mesh.py",
    "devmesh.mesh.membership": "mesh.py",
}
"""The only driver modules a command may import, and which command: `ca path|export|install`
and `mesh init|join|export|show` work on DEVMESH_HOME's files without an agent (starting one
would fix the proxy's ports before the project's `proxy:` can; docs/architecture.md)."""


def test_commands_use_the_agent_only_through_its_client() -> None:
    allowed = {"devmesh.agent.client", "devmesh.agent.paths", "devmesh.agent.daemon"}
    problems = []
    for p in [ROOT / "cli.py", *files("commands")]:
        for m in imports_of(p):
            parts = m.split(".")
            if len(parts) < 2 or parts[0] != "devmesh":
                continue
            if parts[1] == "agent" and len(parts) > 2 and ".".join(parts[:3]) not in allowed:
                problems.append(f"{p.name} imports {m}")
            if parts[1] in ("supervisor", "proxy", "mesh", "db", "dashboard"):
                if len(parts) == 2:
                    continue  # `from devmesh.proxy import X`: X is checked as devmesh.proxy.X
                if COMMAND_FILE_MODULES.get(".".join(parts[:3])) != p.name:
                    problems.append(f"{p.name} imports {m}")
    assert not problems, "\n".join(problems)


def test_contract_catches_a_violation(tmp_path: Path) -> None:
    root = tmp_path / "devmesh"
    (root / "core").mkdir(parents=True)
    bad = root / "core" / "probe.py"
    bad.write_text("import socket\nfrom . import model\nfrom ..proxy import table\n")
    assert core_impurities(bad, root) == ["devmesh.proxy", "devmesh.proxy.table", "socket"]


AGENT_ENGINE_INTERNALS = (
    "devmesh.agent.engine",
    "devmesh.agent.instance",
    "devmesh.agent.reconcile",
    "devmesh.agent.state",
)


def test_views_read_the_snapshot_and_the_api_goes_through_the_engine() -> None:
    problems = [
        f"views.py imports {m}"
        for m in imports_of(ROOT / "agent" / "views.py")
        if m.startswith(AGENT_ENGINE_INTERNALS)
    ]
    problems += [
        f"api.py imports {m}"
        for m in imports_of(ROOT / "agent" / "api.py")
        if m.startswith(("devmesh.supervisor", "devmesh.proxy", "devmesh.agent.reconcile"))
    ]
    assert not problems, "\n".join(problems)


def test_process_inspection_does_not_parse_proc_by_hand() -> None:
    """psutil does it portably; the Linux-only bits are named in supervisor/process.py."""
    problems = []
    for path in [*files("supervisor"), *files("agent")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and str(node.value).startswith("/proc"):
                problems.append(f"{path.relative_to(ROOT.parent)}: {node.value!r}")
    assert not problems, "\n".join(problems)
