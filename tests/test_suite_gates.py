"""The suite's own gates: a test that can only run as root never passes unseen.

Run as an ordinary user, the namespace tests and the root-only database tests cannot run.
They skip for a developer's plain ``pytest``; under ``DEVMESH_REQUIRE_ROOT=1`` (which
``scripts/test``, and so CI, sets) the same skip is a failure. Checked by running pytest on
a one-test folder with the suite's own conftest.py, where the mark's check says "not
possible here" (this suite runs as root in CI, so the real checks pass).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

CANNOT = """
import pytest

@pytest.mark.needs_root("something only root may do", check=lambda: False)
def test_needs_root():
    pass
"""


def _run(folder: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k != "DEVMESH_REQUIRE_ROOT"}
    environ.update(env, PYTHONPATH=str(TESTS))
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:randomly", "-p", "no:cacheprovider",
         "--rootdir", str(folder), str(folder)],
        capture_output=True, text=True, env=environ, cwd=folder, timeout=120, check=False,
    )  # fmt: skip


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    shutil.copy(TESTS / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_gate.py").write_text(CANNOT)
    return tmp_path


def test_a_root_test_skips_for_a_developer(folder: Path) -> None:
    r = _run(folder)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 skipped" in r.stdout and "needs root: something only root may do" in r.stdout


def test_under_require_root_the_skip_is_a_failure(folder: Path) -> None:
    r = _run(folder, DEVMESH_REQUIRE_ROOT="1")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "1 error" in r.stdout  # failed in its setup: the test never ran
    assert "needs root: something only root may do; DEVMESH_REQUIRE_ROOT=1" in r.stdout


def test_scripts_test_requires_root_and_no_test_skips_around_the_gate() -> None:
    script = (TESTS.parent / "scripts" / "test").read_text()
    assert re.search(r"^export DEVMESH_REQUIRE_ROOT=1$", script, re.M)
    bypass = re.compile(r"skip(if)?\((not have_netns|os\.geteuid)")
    offenders = [p.name for p in TESTS.glob("*.py") if bypass.search(p.read_text())]
    assert offenders == [], (
        "a root-only test must use the needs_root mark (netkit.NETNS, dbkit.ROOT)"
    )
