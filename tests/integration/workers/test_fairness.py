"""Fairness under a flood: org queues taken in turn (workers/messages.py, docs/reliability.md, Fairness).

Real PostgreSQL, Redis and worker processes. Order, not timing, decides: org A's backlog is in the
broker before any worker starts, org B's one run is triggered after it, and the one worker process
records its attempts one after another, so the order of their ``started_at`` is the order the
worker took the messages. With one shared queue B's run is the last to start (the control case,
which shows the test can fail); with org queues it is among the first two.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import text

import tests.conftest as conftest
from tests.conftest import Processes, Tenant, wait_for
from tests.integration.workers.test_dispatcher import NOOP, SLEEPY, logs, put_dag, read_run, trigger
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
