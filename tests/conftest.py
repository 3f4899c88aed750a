"""Shared fixtures: a private agent home per test (see agentkit.Mesh)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from agentkit import Mesh


@pytest.fixture
def mesh() -> Iterator[Mesh]:
    """A DEVMESH_HOME of its own, its proxy on free ports; every process it made is gone after."""
    m = Mesh()
    try:
        yield m
    finally:
        m.close()
