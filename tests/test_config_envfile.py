"""KEY=VALUE files: the syntax shared by compose and dotenv, and errors with line numbers."""

from __future__ import annotations

from pathlib import Path

import pytest

from devmesh.config import envfile


def test_syntax():
    text = (
        "# comment\n"
        "\n"
        "export A=1\n"
        "B = spaced value  # trailing comment\n"
        "C='single $X # kept'\n"
        'D="tab\\there \\"q\\"" # comment\n'
        "E=\n"
        "F=url#fragment\n"
        "A=2\n"
    )
    assert envfile.parse(text) == {
        "A": "2",
        "B": "spaced value",
        "C": "single $X # kept",
        "D": 'tab\there "q"',
        "E": "",
        "F": "url#fragment",
    }


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ("A=1\nJUSTAKEY\n", 2, "expected KEY=VALUE, got 'JUSTAKEY'"),
        (
            "1A=x\n",
            1,
            "invalid variable name '1A' "
            "(expected letters, digits and _, not starting with a digit)",
        ),
        ("A='open\n", 1, "missing closing ' quote"),
        ('A="open\n', 1, 'missing closing " quote'),
        ("A='x' y\n", 1, "unexpected text after the closing quote: 'y'"),
    ],
)
def test_errors_name_file_and_line(text: str, line: int, message: str):
    with pytest.raises(envfile.EnvFileError) as info:
        envfile.parse(text, path="app.env")
    assert (info.value.path, info.value.line, info.value.message) == ("app.env", line, message)
    assert str(info.value) == f"app.env:{line}: {message}"


def test_read_rejects_binary(tmp_path: Path):
    path = tmp_path / "bin.env"
    path.write_bytes(b"A=\xff\xfe\n")
    with pytest.raises(envfile.EnvFileError) as info:
        envfile.read(path, display="bin.env")
    assert str(info.value) == "bin.env:1: not UTF-8 text"
