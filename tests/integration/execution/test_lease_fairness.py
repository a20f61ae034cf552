"""Fairness: per-org caps on running tasks and per-job max_concurrency at lease time; the per-org
rate limit of API-triggered runs.

Real PostgreSQL, Redis and worker processes. A sampler counts the running tasks (state
``running`` with a live lease) in one snapshot, over and over, while the workers drain
the queue: the cap must hold in every sample, and every task must still finish (a task
refused for capacity goes back to the queue; it is never lost).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import create_engine, text

import tests.conftest as conftest
from tests.conftest import Processes, Tenant, wait_for
from tests.integration.workers.test_dispatcher import NOOP, ping_workers, put_dag, read_run, trigger
from tracecore.dags.spec import JobSpec
from tracecore.db.engine import db, sqlalchemy_url
from tracecore.settings import SETTINGS_KEY, Settings, configure

ORG_CAP = 3

SLEEPY = "- name: {name}\n  runtime: platform\n  operator: sleep\n  config: {{seconds: {seconds}}}\n{extra}"


@pytest.fixture
def capped(monkeypatch: pytest.MonkeyPatch) -> None:
    """Workers started by the test run with TRACE_ORG_MAX_RUNNING = ORG_CAP."""
    plain = conftest.process_env
    monkeypatch.setattr(conftest, "process_env",
                        lambda settings: {**plain(settings), "TRACE_ORG_MAX_RUNNING": str(ORG_CAP)})


class Sampler:
    """Counts running tasks (live leases) in one snapshot per sample, on its own thread."""

    def __init__(self, settings: Settings, where: str, params: dict[str, object]) -> None:
        self.engine = create_engine(sqlalchemy_url(settings.database_url or ""), isolation_level="AUTOCOMMIT")
        self.query = text("SELECT count(*) FROM tasks WHERE state = 'running' AND lease_expires_at > now() "
                          f"AND {where}")
        self.params = params
        self.samples: list[int] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        with self.engine.connect() as connection:
            while not self.stop.is_set():
                self.samples.append(connection.execute(self.query, self.params).scalar_one())
                self.stop.wait(0.005)

    def __enter__(self) -> Sampler:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=10)
        self.engine.dispose()


def run_states(client: FlaskClient, tenant: Tenant, run_ids: list[str]) -> list[str]:
    return [read_run(client, tenant, run_id)["status"] for run_id in run_ids]


def all_succeeded(client: FlaskClient, tenant: Tenant, run_ids: list[str]) -> bool:
    states = run_states(client, tenant, run_ids)
    assert "failed" not in states and "canceled" not in states, states
    return all(state == "succeeded" for state in states)


def log_text(processes: Processes, procs: list) -> str:
    return "\n".join(Path(proc.log_path).read_text(errors="replace")[-4000:] for proc in procs)


def test_max_concurrency_is_an_optional_integer_of_at_least_one() -> None:
    assert JobSpec.from_dict({"name": "a", "runtime": "platform", "operator": "noop"}).max_concurrency is None
    spec = JobSpec(name="a", runtime="platform", operator="noop", max_concurrency=2)
    assert JobSpec.from_dict(spec.to_dict()).max_concurrency == 2


def test_max_concurrency_below_one_is_refused(client: FlaskClient, tenant: Tenant) -> None:
    body = "- name: a\n  runtime: platform\n  operator: noop\n  max_concurrency: 0\n"
    response = client.put("/v1/dags/bad", data=body,
                          headers={**tenant.headers(), "Content-Type": "application/yaml"})
    assert response.status_code == 400, response.json
    assert response.json["error"]["details"]["errors"][0]["path"] == "jobs[0].max_concurrency"


def test_an_org_cap_of_three_holds_with_fifty_tasks_queued_and_all_fifty_finish(
        app, client: FlaskClient, tenant: Tenant, processes: Processes, settings: Settings, capped: None) -> None:
    put_dag(client, tenant, "busy", SLEEPY.format(name="nap", seconds=0.2, extra=""))
    run_ids = [trigger(client, tenant, "nap") for _ in range(50)]
    with Sampler(settings, "org_id = :org", {"org": tenant.org_id}) as sampled:
        workers = [processes.worker("w1", concurrency=4), processes.worker("w2", concurrency=4)]
        wait_for(lambda: ping_workers(app, 2), timeout=30, message="two workers")
        try:
            wait_for(lambda: all_succeeded(client, tenant, run_ids), timeout=120, interval=0.5,
                     message="all 50 runs to succeed")
        except AssertionError as timed_out:
            raise AssertionError(f"{timed_out}\n{log_text(processes, workers)}") from None
    assert len(sampled.samples) > 50
    assert max(sampled.samples) <= ORG_CAP, sampled.samples
    assert max(sampled.samples) == ORG_CAP  # the cap was reached, not just never tested


def test_max_concurrency_one_serializes_a_job(
        app, client: FlaskClient, tenant: Tenant, processes: Processes, settings: Settings) -> None:
    put_dag(client, tenant, "serial", SLEEPY.format(name="one_at_a_time", seconds=0.2,
                                                    extra="  max_concurrency: 1\n"))
    run_ids = [trigger(client, tenant, "one_at_a_time") for _ in range(8)]
    with Sampler(settings, "job_id IN (SELECT id FROM jobs WHERE name = 'one_at_a_time' AND org_id = :org)",
                 {"org": tenant.org_id}) as sampled:
        worker = processes.worker("w1", concurrency=4)
        try:
            wait_for(lambda: all_succeeded(client, tenant, run_ids), timeout=60, interval=0.3,
                     message="all 8 runs to succeed")
        except AssertionError as timed_out:
            raise AssertionError(f"{timed_out}\n{log_text(processes, [worker])}") from None
    assert sampled.samples and max(sampled.samples) == 1, sampled.samples


def test_a_busy_org_at_its_cap_does_not_starve_another_org(
        app, client: FlaskClient, make_tenant, processes: Processes, settings: Settings, capped: None) -> None:
    busy, quiet = make_tenant("busy"), make_tenant("quiet")
    put_dag(client, busy, "busy", SLEEPY.format(name="nap", seconds=0.5, extra=""))
    put_dag(client, quiet, "quiet", SLEEPY.format(name="blink", seconds=0.05, extra=""))
    busy_runs = [trigger(client, busy, "nap") for _ in range(30)]
    worker = processes.worker("w1", concurrency=4)
    wait_for(lambda: run_states(client, busy, busy_runs).count("running") == ORG_CAP, timeout=30,
             message="the busy org at its cap")
    quiet_run = trigger(client, quiet, "blink")
    try:
        wait_for(lambda: all_succeeded(client, quiet, [quiet_run]), timeout=15, interval=0.1,
                 message="the quiet org's run")
    except AssertionError as timed_out:
        raise AssertionError(f"{timed_out}\n{log_text(processes, [worker])}") from None
    # The quiet org got through while the busy one still had most of its 30 half-second tasks waiting.
    assert run_states(client, busy, busy_runs).count("succeeded") < 25


def test_a_dag_run_over_the_org_cap_waits_and_finishes(
        app, client: FlaskClient, tenant: Tenant, processes: Processes, settings: Settings, capped: None) -> None:
    from tests.integration.execution.test_dag_runs import job, start_dag

    roots = [f"r{i}" for i in range(6)]
    put_dag(client, tenant, "wide", "".join(job(name) for name in roots) + job("sink", upstream=tuple(roots)))
    with Sampler(settings, "org_id = :org", {"org": tenant.org_id}) as sampled:
        worker = processes.worker("w1", concurrency=4)
        run_id = start_dag(client, tenant, "wide")
        try:
            wait_for(lambda: read_run(client, tenant, run_id)["status"] in ("succeeded", "failed", "canceled"),
                     timeout=60, interval=0.2, message="the DAG run to finish")
        except AssertionError as timed_out:
            raise AssertionError(f"{timed_out}\n{log_text(processes, [worker])}") from None
    run = read_run(client, tenant, run_id)
    assert run["status"] == "succeeded", run
    assert {task["status"] for task in run["tasks"]} == {"succeeded"}
    assert max(sampled.samples) <= ORG_CAP, sampled.samples


# --- the per-org rate limit of API-triggered runs ---------------------------------------------------------


def _limit(client: FlaskClient, settings: Settings, limit: int, window: int = 60) -> None:
    client.application.config[SETTINGS_KEY] = configure(replace(settings, run_rate_limit=limit,
                                                                    run_rate_window=window))


def _runs_of(org_id: object) -> int:
    db.session.rollback()
    return int(db.session.scalar(text("SELECT count(*) FROM runs WHERE org_id = :o"), {"o": org_id}) or 0)


def test_a_manual_trigger_past_the_rate_limit_is_429_and_inserts_no_run(
        client: FlaskClient, make_tenant: Callable[[str], Tenant], settings: Settings) -> None:
    acme, other = make_tenant("acme"), make_tenant("other")
    _limit(client, settings, limit=2)
    for tenant in (acme, other):
        put_dag(client, tenant, "hello", NOOP)
    for _ in range(2):
        trigger(client, acme, "hello")
    limited = client.post("/v1/jobs/hello/runs", json={}, headers=acme.headers("writer"))
    assert limited.status_code == 429, limited.json
    assert limited.json["error"]["code"] == "rate_limited"
    assert limited.json["error"]["details"]["limit"] == 2
    assert 1 <= int(limited.headers["Retry-After"]) <= 60
    assert _runs_of(acme.org_id) == 2  # the refused trigger left nothing behind
    trigger(client, other, "hello")  # the limit is per org
    # A missing job past the limit is still 429 (the limit is checked first); under it, 404.
    assert client.post("/v1/jobs/nope/runs", json={}, headers=acme.headers("writer")).status_code == 429
    assert client.post("/v1/jobs/nope/runs", json={}, headers=other.headers("writer")).status_code == 404


def test_the_rate_window_starts_afresh(client: FlaskClient, tenant: Tenant, settings: Settings) -> None:
    _limit(client, settings, limit=1, window=2)
    put_dag(client, tenant, "hello", NOOP)

    def post() -> int:
        return client.post("/v1/jobs/hello/runs", json={}, headers=tenant.headers("writer")).status_code

    assert post() == 202  # the org's first run
    second = post()
    if second == 202:  # the window turned between the two: the next shares the second's window
        second = post()
    assert second == 429
    wait_for(lambda: post() == 202, timeout=10, interval=0.1, message="the next window to admit a run")


def test_concurrent_triggers_never_pass_the_limit(app: Flask, client: FlaskClient, tenant: Tenant,
                                                  settings: Settings) -> None:
    _limit(client, settings, limit=10)
    put_dag(client, tenant, "hello", NOOP)
    statuses: list[int] = []
    lock = threading.Lock()

    def burst() -> None:
        own = app.test_client()
        with app.app_context():
            for _ in range(4):
                status = own.post("/v1/jobs/hello/runs", json={}, headers=tenant.headers("writer")).status_code
                with lock:
                    statuses.append(status)

    threads = [threading.Thread(target=burst) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(statuses) == [202] * 10 + [429] * 14
    assert _runs_of(tenant.org_id) == 10
