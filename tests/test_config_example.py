"""devmesh.yaml.example shows every key of the schema, each with a comment, and validates."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from devmesh.config import loader, marks, schema

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "devmesh.yaml.example"


def data_paths(value: object, prefix: str = "", key: tuple = ()) -> list[tuple[str, tuple]]:
    """(dotted path with ``[]`` for list items, marks key) of every key in value."""
    out: list[tuple[str, tuple]] = []
    if isinstance(value, dict):
        for name, sub in value.items():
            path = f"{prefix}.{name}" if prefix else str(name)
            out.append((path, (*key, name)))
            out.extend(data_paths(sub, path, (*key, name)))
    elif isinstance(value, list):
        for i, sub in enumerate(value):
            out.extend(data_paths(sub, f"{prefix}[]", (*key, i)))
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
        key = next((k for p, k in present if rx.fullmatch(p)), None)
        assert key is not None, f"{path} is missing from devmesh.yaml.example"
        line = parsed.marks.key(key).line
        above = lines[line - 2].strip() if line > 1 else ""
        assert "#" in lines[line - 1] or above.startswith("#"), (
            f"{path} (line {line}) has no comment"
        )


def test_example_reads_its_optional_env_file_and_the_mesh(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    shutil.copy(EXAMPLE, tmp_path / "devmesh.yaml")
    (tmp_path / "api.env").write_text("FROM_FILE=1\nLOG_LEVEL=info\n")
    monkeypatch.chdir(tmp_path)
    loaded = loader.load("devmesh.yaml", environ={})
    assert loaded.warnings == []
    assert list(loaded.project.services) == ["api", "worker", "db", "auth", "search", "mailer"]
    assert loaded.project.service("search").project == "shop-search"
    assert loaded.project.mesh is not None and loaded.project.mesh.node_name == "ana-laptop"
    api = loaded.project.service("api")
    assert api.env_file == ("api.env",)
    assert api.env["FROM_FILE"] == "1" and api.env["LOG_LEVEL"] == "debug"  # env wins
