"""The wheel carries the JSON Schema, so an installed devmesh validates without the repo."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_ships_the_schema_and_the_console_script(tmp_path: Path) -> None:
    # No build isolation and no index: the build uses the hatchling of the test environment
    # and never leaves the machine.
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    [wheel] = tmp_path.glob("devmesh-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        shipped = z.read("devmesh/schemas/devmesh.schema.json")
        entry_points = next(n for n in names if n.endswith("entry_points.txt"))
        scripts = z.read(entry_points).decode()
    assert shipped == (ROOT / "schemas" / "devmesh.schema.json").read_bytes()
    assert "devmesh = devmesh.cli:main" in scripts
    assert "devmesh/cli.py" in names and "devmesh/core/model.py" in names
    # The dashboard's static files: the agent serves them from the installed package.
    static = ROOT / "devmesh" / "dashboard" / "static"
    for f in static.iterdir():
        assert f"devmesh/dashboard/static/{f.name}" in names
