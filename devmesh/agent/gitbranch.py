"""Which branch namespace each service runs in, resolved once when its project is applied.

Why at apply and not per start: ``branch: auto`` names the git branch of the project folder,
and a developer who switches branches runs ``devmesh up`` again to say so; resolving at every
restart would move a running service to another namespace behind their back. The answer is
kept in the project's record (``ProjectRecord.branches``), so a restarted agent keeps it.

``branch: auto`` outside a git repository, on a detached HEAD, or on a git branch whose name
devmesh cannot route by, runs in the default namespace with a warning (the apply's answer and
the agent log); ``branch: NAME`` must be a valid branch name (``core.branches.problem``), else
the apply is refused naming the service.
"""

from __future__ import annotations

import logging
import subprocess
from dataclasses import dataclass, field

from devmesh.core import branches, model

log = logging.getLogger("devmesh.agent")

AUTO = "auto"
GIT_TIMEOUT_S = 5.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Resolved:
    """The outcome for one project."""

    branches: dict[str, str] = field(default_factory=dict)
    """Service -> branch, for every service that runs in a branch namespace."""
    warnings: list[str] = field(default_factory=list)
    """``auto`` that fell back to the default namespace, and why."""
    problems: list[str] = field(default_factory=list)
    """Invalid explicit names: the apply is refused."""


def git_branch(directory: str) -> tuple[str | None, str]:
    """(branch, "") for the folder's checked-out branch, or (None, why there is none)."""
    try:
        done = subprocess.run(
            ["git", "-C", directory, "rev-parse", "--abbrev-ref", "HEAD"],
            capture_output=True,
            text=True,
            timeout=GIT_TIMEOUT_S,
            check=False,
        )
    except FileNotFoundError:
        return None, "git is not installed"
    except subprocess.TimeoutExpired:
        return None, f"git did not answer within {GIT_TIMEOUT_S:.0f} s"
    if done.returncode != 0:
        first = (done.stderr.strip().splitlines() or ["git failed"])[0]
        if "not a git repository" in first:
            return None, f"{directory} is not in a git repository"
        return None, f"git rev-parse failed in {directory}: {first}"
    name = done.stdout.strip()
    if name == "HEAD":
        return None, f"{directory} is on a detached HEAD"
    return name, ""


def resolve(project: model.Project) -> Resolved:
    """Resolve every service's ``branch`` (runs git at most once per project)."""
    out = Resolved()
    git: tuple[str | None, str] | None = None
    for name, svc in project.services.items():
        if svc.branch is None:
            continue
        if svc.branch != AUTO:
            problem = branches.problem(svc.branch)
            if problem:
                out.problems.append(f"services.{name}.branch: {problem}")
            else:
                out.branches[name] = svc.branch
            continue
        if git is None:
            git = git_branch(project.directory)
        found, why = git
        unfit = branches.problem(found) if found is not None else None
        if unfit:
            found, why = None, f"git branch {found!r} cannot be routed by: {unfit}"
        if found is None:
            text = f"service {name}: branch: auto runs in the default namespace because {why}"
            out.warnings.append(text)
            log.warning("%s: %s", project.name, text)
        else:
            out.branches[name] = found
    return out
