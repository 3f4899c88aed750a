"""Every devmesh.yaml this repository ships validates as shipped, on a machine with no
variable set, through the real CLI: no error and no warning.

This is the CI check for devmesh.yaml.example and examples/*/devmesh.yaml: a new example,
or a schema change that breaks one, fails here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = [ROOT / "devmesh.yaml.example", *sorted(ROOT.glob("examples/**/devmesh.yaml"))]


def test_the_examples_are_found():
    assert len(SHIPPED) >= 5  # the example file, quickstart, notes, mesh/shop-api, mesh/shop-web


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(ROOT)))
def test_shipped_file_validates_with_no_variable_set(path: Path, tmp_path: Path):
    bare = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-m", "devmesh", "validate", "--json", "-f", str(path)],
        cwd=tmp_path,
        env=bare,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["valid"] is True
    assert report["problems"] == []
