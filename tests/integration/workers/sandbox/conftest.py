"""The Docker backend and the ``Sandbox`` helper, shared by the modules that run bundles in Docker
(test_docker, test_vetted_libraries, test_examples). The process and Fargate modules define their
own ``backend``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

from tests.integration.workers.sandbox.test_docker import Sandbox
from workers.sandbox.docker import DockerBackend


@pytest.fixture(scope="module")
def backend() -> Iterator[DockerBackend]:
    backend = DockerBackend(docker.from_env(version="auto", timeout=30))
    for image in ("trace-runtime-python", "trace-runtime-node"):
        backend.client.images.get(image)  # ImageNotFound fails the module: run deploy/images/build.sh all
    yield backend
    backend.client.close()


@pytest.fixture
def sandbox(backend: DockerBackend, tmp_path: Path) -> Sandbox:
    return Sandbox(backend, tmp_path)
