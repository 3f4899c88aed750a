"""devmesh.yaml.example shows every key of the schema, each with a comment, and validates."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from devmesh.config import loader, marks, schema

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "devmesh.yaml.example"


def data_paths(value: object, prefix: str = "") -> list[str]:
    out: list[str] = []
    if isinstance(value, dict):
        for key, sub in value.items():
            path = f"{prefix}.{key}" if prefix else str(key)
            out.append(path)
            out.extend(data_paths(sub, path))
    return out


def pattern(path: str) -> re.Pattern[str]:
    parts = [r"[^.]+" if p.startswith("<") else re.escape(p) for p in path.split(".")]
    return re.compile(r"\.".join(parts))


def test_every_schema_key_appears_with_a_comment():
    text = EXAMPLE.read_text()
    parsed = marks.parse(text)
    lines = text.splitlines()
    present = data_paths(parsed.data)
    for path, _ in schema.key_paths():
        rx = pattern(path)
        match = next((p for p in present if rx.fullmatch(p)), None)
        assert match is not None, f"{path} is missing from devmesh.yaml.example"
        key = tuple(match.split("."))
        line = parsed.marks.key(key).line
        above = lines[line - 2].strip() if line > 1 else ""
        assert "#" in lines[line - 1] or above.startswith("#"), (
            f"{path} (line {line}) has no comment"
        )


def test_example_validates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    shutil.copy(EXAMPLE, tmp_path / "devmesh.yaml")
    (tmp_path / "api.env").write_text("FROM_FILE=1\n")
    monkeypatch.chdir(tmp_path)
    loaded = loader.load("devmesh.yaml", environ={"DEVMESH_SECRET": "test-secret"})
    assert loaded.warnings == []
    assert list(loaded.project.services) == ["api", "worker", "db", "auth"]
    assert loaded.project.mesh is not None and loaded.project.mesh.secret == "test-secret"
