"""devmesh.supervisor: the I/O layer for the services' processes.

Why it exists: the agent's reconciler decides *what* should run and *when* to restart it; this
package does the system calls that make it so, and nothing else. It spawns a service in its own
session with its output appended to a log file (``process``), stops the whole process tree that
a service left behind, re-attaches to processes after the agent itself restarted, probes
readiness (``probes``), rotates and follows the log files (``logs``) and says who holds a port
(``ports``). Restart policy, backoff and health bookkeeping live in ``devmesh.core`` (see
``devmesh.core.health``), so they can be tested without processes or clocks.

Platforms: process inspection (session members, start times for adoption, port holders) goes
through psutil (``procinfo``, ``ports``) and POSIX calls, with no hand-parsed ``/proc``. The
Linux-only pieces are named in ``process``: the child-subreaper ``prctl`` and the pidfd wait
(which falls back to polling elsewhere). Linux is the supported and tested platform.

What it does not guarantee: processes that leave the
service's session (``setsid`` in a grandchild, a double-forking daemon) are beyond ``stop``:
the session is the unit of ownership.

Every error raised on purpose derives from ``SupervisorError``.
"""

from __future__ import annotations


class SupervisorError(Exception):
    """Base of every error the supervisor raises on purpose."""
