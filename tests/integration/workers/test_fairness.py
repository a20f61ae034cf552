"""Fairness under a flood: org queues taken in turn (workers/messages.py, docs/reliability.md, Fairness).

Real PostgreSQL, Redis and worker processes. Order, not timing, decides: org A's backlog is in the
broker before any worker starts, org B's one run is triggered after it, and the one worker process
records its attempts one after another, so the order of their ``started_at`` is the order the
worker took the messages. With one shared queue B's run is the last to start (the control case,
which shows the test can fail); with org queues it is among the first two.
"""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Callable

import pytest
import redis
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import text

import tests.conftest as conftest
from tests.conftest import Processes, Tenant, wait_for
from tests.integration.workers.test_dispatcher import FAILING, NOOP, SLEEPY, logs, put_dag, read_run, trigger
from tracecore.db.engine import db
from tracecore.settings import Settings
from workers import messages

Proc = subprocess.Popen[bytes]
BACKLOG = 30


def two_orgs_on_two_queues(make_tenant: Callable[[str], Tenant], settings: Settings) -> tuple[Tenant, Tenant]:
    """Org A and an org B whose queue is not A's (two orgs that hash alike share a queue, first in
    first out: that is the design's known limit, not what this test is about)."""
    flooder = make_tenant("flooder")
    for attempt in range(20):
        other = make_tenant(f"bystander{attempt}")
        if settings.broker_org_queues == 0 or (messages.org_queue("trace", settings.broker_org_queues, other.org_id)
                                               != messages.org_queue("trace", settings.broker_org_queues,
                                                                     flooder.org_id)):
            return flooder, other
    raise AssertionError("20 orgs in a row hashed onto the flooder's queue")


def start_order(run_ids: list[str]) -> list[str]:
    """Run ids in the order their (first) attempts started."""
    db.session.rollback()
    rows = db.session.execute(text(
        "SELECT CAST(t.run_id AS text) FROM attempts a JOIN tasks t ON t.id = a.task_id "
        "WHERE t.run_id = ANY(CAST(:runs AS uuid[])) AND a.fence = 1 ORDER BY a.started_at, a.id"),
        {"runs": run_ids}).scalars().all()
    db.session.rollback()
    return list(rows)


def all_succeeded(client: FlaskClient, tenant: Tenant, run_ids: list[str]) -> bool:
    states = [read_run(client, tenant, run_id)["status"] for run_id in run_ids]
    assert "failed" not in states and "canceled" not in states, states
    return all(state == "succeeded" for state in states)


@pytest.mark.parametrize("org_queues", [16, 0], ids=["org-queues", "one-shared-queue"])
def test_another_orgs_run_starts_before_a_flooding_orgs_backlog_drains(
        app: Flask, client: FlaskClient, make_tenant: Callable[[str], Tenant], settings: Settings,
        processes: Processes, monkeypatch: pytest.MonkeyPatch, org_queues: int) -> None:
    plain = conftest.process_env
    monkeypatch.setattr(conftest, "process_env",
                        lambda s: {**plain(s), "TRACE_BROKER_ORG_QUEUES": str(org_queues)})
    monkeypatch.setitem(app.extensions, "trace_org_queues", org_queues)  # the API side of the same setting
    flooder, bystander = two_orgs_on_two_queues(make_tenant, settings)
    put_dag(client, flooder, "flood", NOOP)
    put_dag(client, bystander, "light", NOOP)

    flood = [trigger(client, flooder, "hello") for _ in range(BACKLOG)]  # all in the broker: no worker yet
    light = trigger(client, bystander, "hello")
    worker = processes.worker("w1", concurrency=1)
    try:
        wait_for(lambda: all_succeeded(client, flooder, flood) and all_succeeded(client, bystander, [light]),
                 timeout=120, message="every run to succeed")
    except AssertionError as timed_out:
        raise AssertionError(f"{timed_out}\n{logs(processes, [worker])}") from None

    order = start_order([*flood, light])
    assert sorted(order) == sorted([*flood, light])  # each run started once
    position = order.index(light)
    if org_queues:
        assert position <= 1, f"org B's run started {position}th, behind org A's backlog"
    else:  # one first-in-first-out queue: B waits behind A's whole backlog
        assert position == BACKLOG


def test_org_queues_lose_and_duplicate_nothing_when_a_worker_is_killed(
        client: FlaskClient, make_tenant: Callable[[str], Tenant], settings: Settings, processes: Processes,
        kill_worker: Callable[[Proc], None]) -> None:
    flooder, bystander = two_orgs_on_two_queues(make_tenant, settings)
    for tenant in (flooder, bystander):
        put_dag(client, tenant, "sleepers", SLEEPY.format(seconds=0.3))
    beat = processes.beat()  # the lease reaper every 0.5 s (lease TTL 3 s)
    w1 = processes.worker("w1", concurrency=1)
    runs = {flooder.name: [trigger(client, flooder, "sleepy") for _ in range(8)],
            bystander.name: [trigger(client, bystander, "sleepy") for _ in range(3)]}
    tenants = {flooder.name: flooder, bystander.name: bystander}

    def running_on_w1() -> list[str]:
        db.session.rollback()
        held = db.session.execute(text("SELECT CAST(id AS text) FROM tasks WHERE state = 'running'")).scalars().all()
        db.session.rollback()
        return list(held)

    [killed_task] = wait_for(running_on_w1, timeout=60, message="a task to be running on w1")  # type: ignore[misc]
    kill_worker(w1)
    w2 = processes.worker("w2", concurrency=2)
    try:
        wait_for(lambda: all(all_succeeded(client, tenants[name], ids) for name, ids in runs.items()),
                 timeout=120, message="every run to succeed after w1's death")
    except AssertionError as timed_out:
        raise AssertionError(f"{timed_out}\n{logs(processes, [w1, w2, beat])}") from None

    for name, run_ids in runs.items():
        for run_id in run_ids:
            [task] = read_run(client, tenants[name], run_id)["tasks"]
            states = [attempt["status"] for attempt in task["attempts"]]
            assert states.count("succeeded") == 1, (name, task)  # ran to success exactly once
            if task["id"] == killed_task:  # the killed attempt, then the reaper's re-send on w2
                assert states == ["lost", "succeeded"] and task["fence"] == 2, task
            else:
                assert states == ["succeeded"] and task["fence"] == 1, task


class PushedQueues:
    """The lists every LPUSH of the broker names, seen through Redis MONITOR on its own thread."""

    def __init__(self, url: str) -> None:
        self.client = redis.Redis.from_url(url)
        self.keys: list[str] = []
        self.stop = threading.Event()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        with self.client.monitor() as monitor:
            self.ready.set()
            for event in monitor.listen():  # the workers' BRPOP timeouts keep this loop turning
                command = str(event.get("command", ""))
                if command.upper().startswith("LPUSH "):
                    self.keys.append(command.split(" ", 2)[1])
                if self.stop.is_set():
                    return

    def __enter__(self) -> PushedQueues:
        self.thread.start()
        assert self.ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=10)
        self.client.close()


def test_retries_and_capacity_refusals_go_back_onto_the_orgs_queue(
        client: FlaskClient, tenant: Tenant, settings: Settings, processes: Processes,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A retry (its backoff) and a task refused at the org's cap are sent again from the worker,
    onto the queue their message came from: never the shared one, where the org's flood would
    take turns beside every other org's."""
    plain = conftest.process_env
    monkeypatch.setattr(conftest, "process_env", lambda s: {**plain(s), "TRACE_ORG_MAX_RUNNING": "1"})
    own = messages.org_queue("trace", settings.broker_org_queues, tenant.org_id)
    assert own != "trace"
    put_dag(client, tenant, "sleepers", SLEEPY.format(seconds=0.5))
    put_dag(client, tenant, "flaky", FAILING.format(max_retries=1))
    with PushedQueues(settings.broker_url or "") as pushed:
        worker = processes.worker("w1", concurrency=2)
        sleepers = [trigger(client, tenant, "sleepy") for _ in range(2)]  # the second waits for the cap
        flaky = trigger(client, tenant, "flaky")  # fails, retried once, dead-lettered
        try:
            wait_for(lambda: all_succeeded(client, tenant, sleepers)
                     and read_run(client, tenant, flaky)["status"] == "failed", timeout=60,
                     message="the sleepers to succeed and the flaky run to fail")
        except AssertionError as timed_out:
            raise AssertionError(f"{timed_out}\n{logs(processes, [worker])}") from None
    [task] = read_run(client, tenant, flaky)["tasks"]
    assert [attempt["status"] for attempt in task["attempts"]] == ["failed", "failed"]
    task_lists = [key for key in pushed.keys if key.startswith("trace")]
    # three triggers, one retry, and at least one capacity refusal sent again
    assert len(task_lists) >= 5, pushed.keys
    assert set(task_lists) == {own}, pushed.keys
