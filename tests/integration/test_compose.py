"""docker-compose.yml is a valid Compose file naming the whole production-like stack."""

from __future__ import annotations

import shutil
import subprocess

import yaml

from tests.conftest import ROOT


def _compose() -> list[str]:
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    found = shutil.which("docker-compose")
    assert found, "neither `docker compose` nor `docker-compose` answers; run deploy/ensure-tools.sh"
    return [found]


def test_compose_config_accepts_the_file() -> None:
    checked = subprocess.run([*_compose(), "-f", str(ROOT / "docker-compose.yml"), "config"], capture_output=True,
                             text=True, cwd=ROOT, timeout=60)
    assert checked.returncode == 0, checked.stderr
    resolved = yaml.safe_load(checked.stdout)
    assert {"postgres", "redis", "api", "worker", "beat", "flower"} <= set(resolved["services"])
    for role in ("api", "worker", "beat"):
        environment = resolved["services"][role]["environment"]
        assert environment["TRACE_DATABASE_URL"].startswith("postgresql://")
        assert environment["TRACE_BROKER_URL"].startswith("redis://")
