"""docs/config.md is what scripts/gen_config_docs.py generates, and the schema is complete."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import jsonschema

from devmesh.config import schema

ROOT = Path(__file__).resolve().parents[1]


def test_docs_are_up_to_date():
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_config_docs.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr + "\nrun: python scripts/gen_config_docs.py"


def test_every_key_is_documented_in_the_page():
    page = (ROOT / "docs" / "config.md").read_text()
    for path, _ in schema.key_paths():
        assert f"| `{path}` |" in page


def test_schema_is_2020_12_closed_and_described():
    root = schema.load_schema()
    assert root["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(root)
    for path, node in schema.key_paths():
        resolved = schema.resolve(node)
        assert node.get("description") or resolved.get("description"), path
        if resolved.get("type") == "object":
            assert "additionalProperties" in resolved, path


def test_packaged_and_repository_schema_are_the_same_file():
    assert schema.load_schema() == __import__("json").loads(
        (ROOT / "schemas" / "devmesh.schema.json").read_text()
    )
