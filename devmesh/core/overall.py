"""One word for the state of everything a machine runs: the dashboard's favicon and title.

Why a pure function: the rule (what counts as failed, as starting) is a decision, the same
Tilt shows in its tab: a glance at the tab says whether to look. It reads the service
states `status` shows and nothing else.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

FAILED = frozenset({"failed", "blocked", "crash-looping", "unhealthy", "restarting"})
BUSY = frozenset({"starting", "waiting", "stopping"})


@dataclass(frozen=True, slots=True)
class Overall:
    level: str
    """``failed``, ``starting``, ``healthy`` or ``idle`` (nothing runs here)."""
    words: str
    """A sentence that says the same without colour, naming what is wrong."""


def _failed(row: Mapping[str, Any]) -> bool:
    state = row.get("state")
    if state in FAILED:
        return True
    # A process that exited by itself is a failure unless it ended cleanly (a one-shot job).
    return state == "exited" and row.get("last_exit") != "exited with code 0"


def summarise(rows: Iterable[Mapping[str, Any]]) -> Overall:
    """The overall state of ``views.rows``-like rows (``external`` rows do not count)."""
    own = [r for r in rows if r.get("state") != "external"]
    if not own:
        return Overall("idle", "no service runs here")
    failed = [r for r in own if _failed(r)]
    if failed:
        named = ", ".join(f"{r.get('name')} ({r.get('state')})" for r in failed[:3])
        more = f" and {len(failed) - 3} more" if len(failed) > 3 else ""
        return Overall("failed", f"{len(failed)} of {len(own)} failing: {named}{more}")
    busy = [r for r in own if r.get("state") in BUSY]
    if busy:
        named = ", ".join(f"{r.get('name')} ({r.get('state')})" for r in busy[:3])
        return Overall("starting", f"{len(busy)} of {len(own)} not ready yet: {named}")
    return Overall("healthy", f"all {len(own)} service{'s' if len(own) != 1 else ''} running")
