"""Pick the sandbox backend named by TRACE_SANDBOX, once per worker process."""

from __future__ import annotations

import logging

from tracecore.exceptions import PlatformError
from tracecore.settings import Settings

from . import SandboxBackend

log = logging.getLogger(__name__)
_backends: dict[str, SandboxBackend] = {}


def backend_for(settings: Settings) -> SandboxBackend:
    name = settings.sandbox
    backend = _backends.get(name)
    if backend is None:
        backend = _backends[name] = _build(name, settings)
    return backend


def _build(name: str, settings: Settings) -> SandboxBackend:
    # Deliberate lazy loads: only the chosen backend's client library is imported (the docker SDK,
    # boto3), and a host without Docker still runs the process backend.
    if name == "docker":
        from .docker import DockerBackend

        return DockerBackend(orphan_age_s=settings.max_job_timeout + 300)
    if name == "process":
        from .process import ProcessBackend

        return ProcessBackend()
    if name == "fargate":
        from .fargate import FargateBackend

        return FargateBackend.from_settings(settings)
    raise PlatformError(f"TRACE_SANDBOX={name!r} is not a backend: docker, process or fargate",
                        code="unknown_sandbox")
