"""docs/reference.md is what the generator writes from the schema, and the schema is complete.

A stale page fails here, which is how CI catches a schema change without its docs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema

from devmesh.config import reference, schema, unbuilt

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "reference.md"
GUIDE = ROOT / "docs" / "config.md"


def test_reference_page_is_up_to_date():
    assert PAGE.read_text(encoding="utf-8") == reference.render(), (
        "docs/reference.md is stale: run python -m devmesh.config.reference"
    )


def test_generator_check_fails_on_a_stale_page_and_rewrites_it(tmp_path: Path):
    page = tmp_path / "reference.md"
    page.write_text(PAGE.read_text(encoding="utf-8").replace("HTTP port", "HTTP prot"))
    command = [sys.executable, "-m", "devmesh.config.reference", "--output", str(page)]
    stale = subprocess.run(
        [*command, "--check"], capture_output=True, text=True, timeout=60, check=False
    )
    assert stale.returncode == 1
    assert stale.stderr == (
        f"{page}: out of date with the schema; run python -m devmesh.config.reference\n"
    )
    subprocess.run(command, capture_output=True, timeout=60, check=True)
    fresh = subprocess.run([*command, "--check"], capture_output=True, timeout=60, check=False)
    assert fresh.returncode == 0
    assert page.read_text(encoding="utf-8") == reference.render()


def test_every_key_has_a_row_with_type_default_example_and_description():
    page = PAGE.read_text(encoding="utf-8")
    for path, _ in schema.key_paths():
        row = next((line for line in page.splitlines() if line.startswith(f"| `{path}` |")), "")
        cells = [c.strip() for c in row.strip("|").split(" | ")]
        assert len(cells) == 5, f"{path}: no row in docs/reference.md"
        assert all(cells[i] for i in (1, 2, 3, 4)), f"{path}: empty cell in {row}"
        assert cells[3] != "—", f"{path}: no example"


def _properties(node: Any, where: str = "#") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every property declared anywhere in the schema, wherever it is nested."""
    if isinstance(node, dict):
        for name, sub in node.get("properties", {}).items():
            yield f"{where}/properties/{name}", sub
        for key, sub in node.items():
            yield from _properties(sub, f"{where}/{key}")
    elif isinstance(node, list):
        for i, sub in enumerate(node):
            yield from _properties(sub, f"{where}/{i}")


def test_every_schema_property_has_a_description():
    found = list(_properties(schema.load_schema()))
    assert len(found) >= 55
    missing = [
        where
        for where, sub in found
        if not (sub.get("description") or schema.resolve(sub).get("description"))
    ]
    assert missing == []


def test_every_key_has_examples_that_its_own_schema_accepts():
    root = schema.load_schema()
    for path, node in schema.key_paths():
        examples = node.get("examples")
        assert examples, f"{path}: no examples in the schema"
        checker = jsonschema.Draft202012Validator({**node, "$defs": root["$defs"]})
        for example in examples:
            errors = [e.message for e in checker.iter_errors(example)]
            assert errors == [], f"{path}: example {example!r} is invalid: {errors}"


def test_schema_is_2020_12_closed():
    root = schema.load_schema()
    assert root["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(root)
    for path, node in schema.key_paths():
        resolved = schema.resolve(node)
        if resolved.get("type") == "object":
            assert "additionalProperties" in resolved, path


def test_packaged_and_repository_schema_are_the_same_file():
    assert schema.load_schema() == json.loads(
        (ROOT / "schemas" / "devmesh.schema.json").read_text()
    )


def test_guide_links_the_reference_and_lists_every_key_not_built_yet():
    guide = GUIDE.read_text(encoding="utf-8")
    assert "(reference.md)" in guide
    if not unbuilt.TABLE:  # every key is built: the guide has no such section
        assert "## What is not built yet" not in guide
        assert "not built yet" not in guide
        return
    section = guide.split("## What is not built yet", 1)[1].split("\n## ", 1)[0]
    listed = {
        line.split("`")[1]: line.split(" | ")[1]
        for line in section.splitlines()
        if line.startswith("| `")
    }
    assert listed == {row.key: row.when for row in unbuilt.TABLE}


def test_every_key_not_built_yet_is_a_key_of_the_schema():
    keys = {path for path, _ in schema.key_paths()}
    assert [row.key for row in unbuilt.TABLE if row.key not in keys] == []
