"""Where the agent keeps what it writes: everything under one DEVMESH_HOME.

One folder per agent is what lets tests (and a developer) run several agents side by side:
point DEVMESH_HOME elsewhere and nothing is shared. Stdlib only, because the CLI imports it
on every command.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class Home:
    root: Path

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Home:
        env = os.environ if environ is None else environ
        raw = env.get("DEVMESH_HOME") or str(Path.home() / ".devmesh")
        return cls(Path(raw).expanduser().absolute())

    @property
    def socket(self) -> Path:
        return self.root / "agent.sock"

    @property
    def lock(self) -> Path:
        return self.root / "agent.lock"

    @property
    def pid_file(self) -> Path:
        return self.root / "agent.pid"

    @property
    def state(self) -> Path:
        return self.root / "state.json"

    @property
    def agent_log(self) -> Path:
        return self.root / "agent.log"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def proxy_log(self) -> Path:
        return self.logs / "proxy.log"

    @property
    def proxy_routes(self) -> Path:
        """The route table and edge ports the agent publishes for its proxy worker processes."""
        return self.root / "proxy-routes.json"

    @property
    def dashboard_token(self) -> Path:
        """The dashboard's access token (mode 0600): `devmesh dashboard` prints it in its URL."""
        return self.root / "dashboard.token"

    @property
    def metrics_counts(self) -> Path:
        """The proxy processes' shared metric files (prometheus-client's multiprocess folder),
        emptied at every agent start."""
        return self.root / "metrics" / "counts"

    @property
    def metrics_db(self) -> Path:
        """The per-minute metrics history (SQLite, WAL)."""
        return self.root / "metrics" / "history.db"

    def service_log(self, project: str, service: str) -> Path:
        return self.logs / project / f"{service}.log"

    def project_lock(self, project: str) -> Path:
        return self.root / "locks" / f"{project}.lock"

    def ensure(self) -> None:
        """Create the folder private to the user (0700): it holds secrets and a socket."""
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.root, 0o700)
        self.logs.mkdir(exist_ok=True, mode=0o700)
        (self.root / "locks").mkdir(exist_ok=True, mode=0o700)
