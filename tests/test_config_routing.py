"""The routing values the schema cannot judge: a ``fallback`` must be a URL the proxy can
connect to (absolute, http or https, with a host), a ``branch`` must be ``auto`` or a name
route selection can match, and a dependency's range must parse. Each error names the file,
line, column and key path, as every other problem does."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from devmesh.config import loader

HEAD = "version: 1\nservices:\n  api:\n    version: 1.0.0\n    command: ./api\n"


def problems_of(tmp_path: Path, text: str) -> list[tuple[int, int, str, str]]:
    (tmp_path / "devmesh.yaml").write_text(text)
    cwd = os.getcwd()
    os.chdir(tmp_path)  # so that the file reads "devmesh.yaml" in messages
    try:
        loader.load("devmesh.yaml", environ={})
    except loader.ConfigError as exc:
        return [(p.line, p.column, p.path, p.message) for p in exc.problems]
    finally:
        os.chdir(cwd)
    return []


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("http://", "'http://' names no host"),
        ("https:///path", "'https:///path' names no host"),
        ("http://:8080", "'http://:8080' names no host"),
        ("http://staging:http", "'http://staging:http': Port could not be cast"),
        ("http://staging:99999", "'http://staging:99999': Port out of range"),
        ("https://staging.example.com:0", "port 0 cannot be connected to"),
        ("http://staging example.com", "'http://staging example.com' contains whitespace"),
    ],
)
def test_a_fallback_without_a_usable_host_is_an_error_at_its_value(
    tmp_path: Path, url: str, words: str
):
    [(line, column, path, message)] = problems_of(tmp_path, HEAD + f"    fallback: {url}\n")
    assert (line, column, path) == (6, 15, "services.api.fallback")
    assert message.startswith("invalid fallback URL: ")
    assert words in message


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:9",
        "https://auth.staging.example.com",
        "https://auth.staging.example.com:8443/v2",
        "http://[::1]:8080",
    ],
)
def test_a_fallback_url_with_a_host_is_valid(tmp_path: Path, url: str):
    assert problems_of(tmp_path, HEAD + f"    fallback: {url}\n") == []


def test_a_fallback_that_is_not_http_is_the_schema_s_to_report_once(tmp_path: Path):
    found = problems_of(tmp_path, HEAD + "    fallback: ftp://staging\n")
    assert [(p[2], p[3]) for p in found] == [
        (
            "services.api.fallback",
            "expected a URL starting with http:// or https://, got 'ftp://staging'",
        )
    ]


@pytest.mark.parametrize(
    ("branch", "words"),
    [
        ("feat..x", "cannot contain '..'"),
        ("-x", "cannot start with '-'"),
        ("feat/", "cannot end with '.' or '/'"),
        ("has space", "may only hold ASCII letters"),
        ("a/.hidden", "has a component starting with '.'"),
        ("x.lock", "has a component ending with '.lock'"),
        ("x" * 129, "longer than 128 characters"),
    ],
)
def test_an_invalid_branch_name_is_an_error_at_its_value(tmp_path: Path, branch: str, words: str):
    [(line, column, path, message)] = problems_of(tmp_path, HEAD + f"    branch: '{branch}'\n")
    assert (line, column, path) == (6, 13, "services.api.branch")
    assert words in message
    assert message.endswith("; use auto (the git branch of the project folder) or a branch name")


@pytest.mark.parametrize("branch", ["auto", "main", "feature/login", "release-2.3", "ana_wip"])
def test_auto_or_a_valid_branch_name_is_accepted(tmp_path: Path, branch: str):
    assert problems_of(tmp_path, HEAD + f"    branch: {branch}\n") == []


def test_a_range_that_does_not_parse_is_an_error_at_the_range(tmp_path: Path):
    text = HEAD + "  web:\n    version: 1.0.0\n    command: ./web\n    depends_on:\n"
    found = problems_of(tmp_path, text + "      api: {version: '^^1', versions: reject}\n")
    assert [(p[0], p[1], p[2]) for p in found] == [(10, 22, "services.web.depends_on.api.version")]
    assert found[0][3].startswith("invalid version range: ")


def test_validate_prints_every_routing_problem_with_its_place(tmp_path: Path):
    text = HEAD + "    fallback: http://\n    branch: 'a..b'\n"
    (tmp_path / "devmesh.yaml").write_text(text)
    result = subprocess.run(
        [sys.executable, "-m", "devmesh", "validate"],
        cwd=tmp_path,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert lines[0].startswith("devmesh.yaml:6:15: services.api.fallback: invalid fallback URL")
    assert lines[1].startswith("devmesh.yaml:7:13: services.api.branch: branch name 'a..b'")
