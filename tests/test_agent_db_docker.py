"""The docker provider through a real agent and a real Docker engine.

The image is built locally from this machine's PostgreSQL files (registries are
unreachable; see ``dbkit.build_postgres_image``). Skipped on a machine without an engine,
never where ``DEVMESH_REQUIRE_DOCKER=1`` (CI, ``scripts/test``): there a missing engine fails.
"""

from __future__ import annotations

import json
import os
import uuid

import pytest
from agentkit import Mesh
from dbkit import build_postgres_image
from test_agent_db import APP, INIT, curl_json, project_yaml

from devmesh.db.container import connect, engine_answers

if not engine_answers() and os.environ.get("DEVMESH_REQUIRE_DOCKER") != "1":
    pytest.skip(
        "no Docker engine (set DEVMESH_REQUIRE_DOCKER=1 to fail instead)", allow_module_level=True
    )


def test_docker_database_serves_a_row_kept_by_down_deleted_by_volumes(mesh: Mesh) -> None:
    client = connect()
    try:
        image = build_postgres_image(client)
        project = f"dk{uuid.uuid4().hex[:8]}"
        label = {"label": f"devmesh.project={project}"}
        d = mesh.project(
            project,
            project_yaml(
                project, f"{{engine: postgres, provider: docker, image: {image}, init: [init.sql]}}"
            ),
            {"app.py": APP, "init.sql": INIT},
        )
        try:
            mesh.cli("up", "-d", cwd=d, check=True, timeout=180)
            assert curl_json(mesh, "app")["rows"] == ["hello from init"]
            [container] = client.containers.list(filters=label)
            assert container.status == "running"
            status = json.loads(mesh.cli("db", "status", "--json", cwd=d, check=True).stdout)
            [row] = status["databases"]
            assert (row["provider"], row["state"]) == ("docker", "running")
            assert ":***@127.0.0.1:" in row["url"]

            mesh.cli("down", cwd=d, check=True)  # stops the container, keeps the volume
            container.reload()
            assert container.status == "exited"
            mesh.cli("up", "-d", cwd=d, check=True, timeout=180)
            assert curl_json(mesh, "app")["rows"] == ["hello from init"]

            mesh.cli("down", "--volumes", cwd=d, check=True)
            assert client.containers.list(all=True, filters=label) == []
            assert client.volumes.list(filters=label) == []
        finally:
            mesh.cli("down", "--volumes", cwd=d)
            for c in client.containers.list(all=True, filters=label):
                c.remove(force=True)
            for v in client.volumes.list(filters=label):
                v.remove(force=True)
    finally:
        client.close()


def test_auto_takes_docker_when_an_engine_answers(mesh: Mesh) -> None:
    client = connect()
    project = f"dk{uuid.uuid4().hex[:8]}"
    label = {"label": f"devmesh.project={project}"}
    try:
        image = build_postgres_image(client)
        d = mesh.project(
            project,
            project_yaml(project, f"{{engine: postgres, image: {image}, init: [init.sql]}}"),
            {"app.py": APP, "init.sql": INIT},
        )
        try:
            mesh.cli("up", "-d", cwd=d, check=True, timeout=180)
            assert curl_json(mesh, "app")["rows"] == ["hello from init"]
            status = json.loads(mesh.cli("db", "status", "--json", cwd=d, check=True).stdout)
            assert status["databases"][0]["provider"] == "docker"
        finally:
            mesh.cli("down", "--volumes", cwd=d)
        assert client.containers.list(all=True, filters=label) == []
    finally:
        for c in client.containers.list(all=True, filters=label):
            c.remove(force=True)
        for v in client.volumes.list(filters=label):
            v.remove(force=True)
        client.close()
