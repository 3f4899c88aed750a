"""The registry file: applied order survives a restart, and an older file still adopts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from devmesh.agent import state as state_mod
from devmesh.supervisor import process


def _project(name: str) -> state_mod.ProjectRecord:
    return state_mod.ProjectRecord(
        name=name, document={}, directory="/p", source="devmesh.yaml", enabled=[], base_env={}
    )


def test_projects_keep_the_order_they_were_applied(tmp_path: Path) -> None:
    st = state_mod.State(projects={"zeta": _project("zeta"), "alpha": _project("alpha")})
    state_mod.save(tmp_path / "state.json", st)
    assert list(state_mod.load(tmp_path / "state.json").projects) == ["zeta", "alpha"]


def test_a_schema_1_file_is_converted_and_its_process_adopted(tmp_path: Path) -> None:
    sleeper = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True
    )
    try:
        # What an agent of schema 1 wrote: the start time as kernel ticks since boot.
        stat = Path(f"/proc/{sleeper.pid}/stat").read_text()
        ticks = int(stat[stat.rfind(")") + 2 :].split()[19])
        rec = {
            "project": "p",
            "service": "api",
            "pid": sleeper.pid,
            "sid": sleeper.pid,
            "start_ticks": ticks,
            "started_at": 0.0,
            "fingerprint": "f",
            "spec": {},
            "deps": [],
            "port": None,
            "restarts": 0,
        }
        path = tmp_path / "state.json"
        path.write_text(json.dumps({"schema": 1, "projects": {}, "processes": {"p/api": rec}}))
        loaded = state_mod.load(path).processes["p/api"]
        adopted = process.adopt(loaded.pid, loaded.start_time)
        assert adopted is not None and adopted.pid == sleeper.pid
    finally:
        sleeper.kill()
        sleeper.wait()
