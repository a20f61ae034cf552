"""A throwaway Trace for a benchmark: embedded PostgreSQL and Redis, migrations, an admin
token, the API and one worker as child processes; all stopped and deleted on exit."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tracecore.db.migrate import upgrade
from tracecore.infra.embedded import EmbeddedServices, free_port
from tracecore.settings import Settings


@dataclass
class Platform:
    settings: Settings
    home: Path
    url: str
    http: requests.Session  # authenticated as the admin


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def wait_healthy(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{url}/healthz", timeout=1).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise SystemExit(f"API at {url} did not come up")


@contextmanager
def running_platform(worker_args: tuple[str, ...] = ("--concurrency", "1"),
                     env: dict[str, str] | None = None) -> Iterator[Platform]:
    """``env``: extra TRACE_* settings for the API and the worker."""
    home = Path(tempfile.mkdtemp(prefix="trace-bench-", dir="/tmp"))
    services = EmbeddedServices(home)
    settings = services.start(Settings(home=str(home), port=free_port()))
    children: list[subprocess.Popen[bytes]] = []
    try:
        upgrade(settings.database_url or "")
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("TRACE_")},
               "TRACE_HOME": str(home), "TRACE_DATABASE_URL": settings.database_url or "",
               "TRACE_BROKER_URL": settings.broker_url or "", "TRACE_PORT": str(settings.port),
               "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(ROOT), **(env or {})}
        from web.cli import bootstrap_admin

        token = bootstrap_admin(settings)
        with open(home / "children.log", "wb") as log:  # each child keeps its own descriptor
            for role in (["api"], ["worker", *worker_args]):
                children.append(subprocess.Popen([sys.executable, "-m", "web.cli", *role], env=env, cwd=ROOT,
                                                 stdout=log, stderr=subprocess.STDOUT))
        url = settings.resolved_api_url
        wait_healthy(url)
        http = requests.Session()
        http.headers["Authorization"] = f"Bearer {token}"
        yield Platform(settings=settings, home=home, url=url, http=http)
    finally:
        for child in children:
            child.terminate()
        for child in children:
            try:
                child.wait(timeout=15)
            except subprocess.TimeoutExpired:
                child.kill()
        services.stop()
        shutil.rmtree(home, ignore_errors=True)
