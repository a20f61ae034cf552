"""Execution through real worker processes: the API enqueues, `trace worker` leases and runs.

PostgreSQL, Redis and the workers are real; a worker is killed with SIGKILL, as a
machine that loses power would be. Waits are generous timeouts (``wait_for``); what a
test asserts is always the recorded state, never how long something took.
"""

from __future__ import annotations

import itertools
import subprocess
import threading
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

import pytest
import redis
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select

from tests.conftest import Processes, Tenant, wait_for
from tracecore.db.engine import db
from tracecore.exceptions import StaleFence
from tracecore.execution import lease, runs
from tracecore.execution.runs import Attempt, Task
from tracecore.settings import Settings

Proc = subprocess.Popen[bytes]

NOOP = "- name: hello\n  runtime: platform\n  operator: noop\n"
SLEEPY = "- name: sleepy\n  runtime: platform\n  operator: sleep\n  config: {{seconds: {seconds}}}\n"
FAILING = "- name: flaky\n  runtime: platform\n  operator: always_fail\n  max_retries: {max_retries}\n"


# --- helpers ------------------------------------------------------------------------------------------------


def put_dag(client: FlaskClient, tenant: Tenant, name: str, body: str) -> None:
    response = client.put(f"/v1/dags/{name}", data=body,
                          headers={**tenant.headers(), "Content-Type": "application/yaml"})
    assert response.status_code == 200, response.json


def trigger(client: FlaskClient, tenant: Tenant, job: str) -> str:
    response = client.post(f"/v1/jobs/{job}/runs", json={}, headers=tenant.headers("writer"))
    assert response.status_code == 202, response.json
    return response.json["run_id"]


def read_run(client: FlaskClient, tenant: Tenant, run_id: str) -> dict[str, Any]:
    db.session.rollback()  # the test shares one app context: drop what the session remembers
    response = client.get(f"/v1/runs/{run_id}", headers=tenant.headers("reader"))
    assert response.status_code == 200, response.json
    return response.json


def logs(processes: Processes, procs: Sequence[Proc]) -> str:
    return "\n".join(f"--- {proc.args[-1] if isinstance(proc.args, list) else proc.args} (pid {proc.pid}, "
                     f"exit {proc.poll()}) ---\n{processes.log(proc)}" for proc in procs)


def wait(predicate: Callable[[], object], processes: Processes, procs: Sequence[Proc], message: str,
         timeout: float = 30) -> Any:
    """``wait_for``, with the workers' logs in the failure message."""
    try:
        return wait_for(predicate, timeout=timeout, message=message)
    except AssertionError as timed_out:
        raise AssertionError(f"{timed_out}\n{logs(processes, procs)}") from None


def wait_run(client: FlaskClient, tenant: Tenant, run_id: str, processes: Processes, procs: Sequence[Proc],
             states: tuple[str, ...] = ("succeeded", "failed", "canceled"), timeout: float = 30) -> dict[str, Any]:
    found: dict[str, Any] = {}

    def finished() -> bool:
        found.update(read_run(client, tenant, run_id))
        return found["status"] in states

    try:
        wait_for(finished, timeout=timeout, message=f"run {run_id} to reach {states}")
    except AssertionError as timed_out:
        raise AssertionError(f"{timed_out}; last seen: {found}\n{logs(processes, procs)}") from None
    return found


def ping_workers(app: Flask, count: int) -> bool:
    """True once ``count`` workers answer a broadcast ping (they consume from the queue)."""
    return len(app.extensions["celery"].control.ping(timeout=0.5)) >= count


def attempts_of(task_id: uuid.UUID | str) -> list[Attempt]:
    db.session.rollback()
    return list(db.session.scalars(select(Attempt).where(Attempt.task_id == uuid.UUID(str(task_id)))
                                   .order_by(Attempt.fence)))


def when(value: str) -> datetime:
    return datetime.fromisoformat(value)


# --- one run, start to end ----------------------------------------------------------------------------------


def test_a_manual_run_goes_queued_running_succeeded_on_a_worker(
        client: FlaskClient, tenant: Tenant, processes: Processes) -> None:
    put_dag(client, tenant, "greetings", NOOP)
    run_id = trigger(client, tenant, "hello")
    queued = read_run(client, tenant, run_id)
    assert queued["status"] == "queued" and queued["started_at"] is None
    assert [task["status"] for task in queued["tasks"]] == ["queued"]
    assert queued["tasks"][0]["attempts"] == [] and queued["tasks"][0]["fence"] == 0

    worker = processes.worker("w1")
    run = wait_run(client, tenant, run_id, processes, [worker])

    assert run["status"] == "succeeded", run
    assert run["started_at"] is not None and run["finished_at"] is not None
    assert when(run["created_at"]) <= when(run["started_at"]) <= when(run["finished_at"])
    [task] = run["tasks"]
    assert (task["status"], task["fence"], task["attempts_count"], task["last_error"]) == ("succeeded", 1, 1, None)
    [attempt] = task["attempts"]
    assert attempt["status"] == "succeeded"
    assert (attempt["number"], attempt["fence"], attempt["exit_reason"]) == (1, 1, "ok")
    assert attempt["worker"]  # the lease owner's name is recorded
    assert attempt["worker"] == task["lease_owner"]
    assert attempt["error_type"] is None and attempt["stack_trace"] is None
    assert when(attempt["started_at"]) <= when(attempt["finished_at"])
    assert attempt["duration_ms"] is not None and attempt["duration_ms"] >= 0
    assert worker.poll() is None, logs(processes, [worker])  # the worker is still serving


# --- a worker dies mid-task ---------------------------------------------------------------------------------


def test_a_task_of_a_killed_worker_completes_on_another_with_the_next_fence(
        client: FlaskClient, tenant: Tenant, processes: Processes, kill_worker: Callable[[Proc], None]) -> None:
    put_dag(client, tenant, "sleepers", SLEEPY.format(seconds=3))
    beat = processes.beat()  # schedules the lease reaper every 0.5 s
    w1 = processes.worker("w1")
    run_id = trigger(client, tenant, "sleepy")
    task_id = read_run(client, tenant, run_id)["tasks"][0]["id"]

    running = wait(lambda: [a for a in attempts_of(task_id) if a.state == "running"], processes, [w1, beat],
                   "the first attempt to be running on w1")
    [first] = running
    assert first.fence == 1
    mid = read_run(client, tenant, run_id)
    assert (mid["status"], mid["tasks"][0]["status"]) == ("running", "running")
    assert mid["tasks"][0]["lease_owner"] == first.worker and mid["started_at"] is not None
    w2 = processes.worker("w2")
    kill_worker(w1)
    assert w1.poll() is not None

    run = wait_run(client, tenant, run_id, processes, [w1, w2, beat], timeout=60)
    assert run["status"] == "succeeded", run
    [task] = run["tasks"]
    assert (task["status"], task["fence"], task["attempts_count"]) == ("succeeded", 2, 2)
    killed, rescued = task["attempts"]
    assert (killed["fence"], killed["status"], killed["exit_reason"]) == (1, "lost", "worker_lost")
    assert killed["finished_at"] is not None and killed["worker"] == first.worker
    assert (rescued["fence"], rescued["status"], rescued["exit_reason"]) == (2, "succeeded", "ok")
    assert rescued["worker"] != killed["worker"]  # it ran on w2
    assert rescued["result"] == {"slept": 3, "fence": 2}
    assert when(rescued["started_at"]) >= when(killed["finished_at"])

    # The killed worker's attempt comes back late, carrying fence 1: refused, and recorded as fenced.
    db.session.rollback()
    zombie = stale_lease(task_id, first)
    with pytest.raises(StaleFence):
        lease.succeed(zombie, {"slept": 3, "fence": 1})
    with pytest.raises(StaleFence):
        lease.assert_current(zombie.task_id, zombie.fence)
    db.session.rollback()
    killed_attempt, rescued_attempt = attempts_of(task_id)
    assert (killed_attempt.state, killed_attempt.exit_reason) == ("fenced", "fenced")
    assert (rescued_attempt.state, rescued_attempt.result) == ("succeeded", {"slept": 3, "fence": 2})
    assert read_run(client, tenant, run_id)["status"] == "succeeded"


def stale_lease(task_id: str, attempt: Attempt) -> lease.Lease:
    """The lease the killed worker held, rebuilt from the database (fence and worker of its attempt)."""
    task = db.session.get(Task, uuid.UUID(task_id))
    assert task is not None
    return lease.Lease(task_id=task.id, org_id=task.org_id, run_id=task.run_id, job_id=task.job_id,
                       job_name="sleepy", fence=attempt.fence, attempt_id=attempt.id,
                       attempt_number=attempt.number, max_retries=task.max_retries, worker=attempt.worker,
                       operator="sleep", job_spec={}, config_overrides={}, parameters={}, window={})


# --- at-least-once delivery: duplicates ---------------------------------------------------------------------


def test_the_same_message_delivered_to_several_workers_leases_once(
        app: Flask, client: FlaskClient, tenant: Tenant, processes: Processes, settings: Settings) -> None:
    put_dag(client, tenant, "sleepers", SLEEPY.format(seconds=1))
    # Two workers of two processes each: four copies of the message are worked on at once.
    workers = [processes.worker("w1", concurrency=2), processes.worker("w2", concurrency=2)]
    wait(lambda: ping_workers(app, 2), processes, workers, "both workers to answer a ping")
    run_id, task_id = runs.create_run(org_id=tenant.org_id, job_name="sleepy", cause="manual", triggered_by=None)
    db.session.commit()

    celery = app.extensions["celery"]
    copies = [celery.send_task("trace.execute_task", args=[str(task_id)], ignore_result=False) for _ in range(4)]
    try:
        outcomes = sorted(copy.get(timeout=60) for copy in copies)  # what dispatcher.execute answered
    except Exception as error:
        raise AssertionError(f"a copy was not executed: {error!r}\n{logs(processes, workers)}") from error
    assert outcomes == ["not_leased", "not_leased", "not_leased", "succeeded"]

    run = read_run(client, tenant, str(run_id))
    assert run["status"] == "succeeded"
    [task] = run["tasks"]
    assert (task["status"], task["fence"], task["attempts_count"]) == ("succeeded", 1, 1)
    assert [(a["fence"], a["status"]) for a in task["attempts"]] == [(1, "succeeded")]
    broker = redis.Redis.from_url(settings.broker_url or "")
    try:
        assert broker.llen("trace") == 0  # no copy is left behind
    finally:
        broker.close()


def test_concurrent_takes_of_one_task_yield_exactly_one_lease(
        app: Flask, client: FlaskClient, tenant: Tenant) -> None:
    put_dag(client, tenant, "greetings", NOOP)
    run_id = trigger(client, tenant, "hello")  # no worker runs: the message stays in Redis
    task_id = read_run(client, tenant, run_id)["tasks"][0]["id"]
    contenders = 8
    start = threading.Barrier(contenders)
    results: list[lease.Lease | None] = []
    errors: list[BaseException] = []
    guard = threading.Lock()

    def contend(number: int) -> None:
        try:
            with app.app_context():
                start.wait(timeout=10)
                taken = lease.take(task_id, f"thread-{number}", 60)
                db.session.remove()
            with guard:
                results.append(taken)
        except BaseException as error:  # reported below, not lost in the thread
            with guard:
                errors.append(error)

    threads = [threading.Thread(target=contend, args=(n,)) for n in range(contenders)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not errors, errors
    assert len(results) == contenders
    winners = [taken for taken in results if isinstance(taken, lease.Lease)]
    assert len(winners) == 1, results
    [winner] = winners
    assert winner.fence == 1
    [attempt] = attempts_of(task_id)
    assert (attempt.fence, attempt.worker, attempt.state) == (1, winner.worker, "running")
    [task] = read_run(client, tenant, run_id)["tasks"]
    assert (task["status"], task["lease_owner"], task["attempts_count"]) == ("running", winner.worker, 1)


# --- failures: retries with backoff, then the dead letter ---------------------------------------------------


def test_an_always_failing_operator_retries_with_growing_delays_then_dead_letters(
        client: FlaskClient, tenant: Tenant, processes: Processes, settings: Settings) -> None:
    put_dag(client, tenant, "flaky", FAILING.format(max_retries=3))
    worker = processes.worker("w1")
    run_id = trigger(client, tenant, "flaky")
    run = wait_run(client, tenant, run_id, processes, [worker])

    assert run["status"] == "failed", run
    [task] = run["tasks"]
    assert (task["status"], task["attempts_count"], task["fence"]) == ("dead_letter", 4, 4)
    assert task["last_error"] == "attempt 4 failed on purpose"
    assert task["finished_at"] is not None and task["next_attempt_at"] is None
    attempts = task["attempts"]
    assert [(a["number"], a["fence"], a["status"], a["exit_reason"]) for a in attempts] == \
        [(n, n, "failed", "error") for n in (1, 2, 3, 4)]
    for attempt in attempts:
        assert attempt["error_type"] == "ProbeFailure"
        assert attempt["error_message"] == f"attempt {attempt['number']} failed on purpose"
        assert "Traceback (most recent call last)" in attempt["stack_trace"]
        assert "tests/operators.py" in attempt["stack_trace"], attempt["stack_trace"]
        assert "ProbeFailure: attempt" in attempt["stack_trace"]

    # Retry n waits d_n in [b * 2**(n-1) / 2, b * 2**(n-1)] (equal jitter): each wait is at least
    # the lower bound, and the lower bounds double, so the delays grow.
    base = settings.retry_base_delay
    gaps = [(when(later["started_at"]) - when(earlier["finished_at"])).total_seconds()
            for earlier, later in itertools.pairwise(attempts)]
    floors = [base * 2 ** (n - 1) / 2 for n in (1, 2, 3)]
    assert all(gap >= floor for gap, floor in zip(gaps, floors, strict=True)), (gaps, floors)
    assert all(gap < settings.retry_max_delay + 10 for gap in gaps), gaps  # bounded: no runaway backoff


def test_max_retries_zero_dead_letters_after_one_attempt(
        client: FlaskClient, tenant: Tenant, processes: Processes) -> None:
    put_dag(client, tenant, "flaky", FAILING.format(max_retries=0))
    worker = processes.worker("w1")
    run_id = trigger(client, tenant, "flaky")
    run = wait_run(client, tenant, run_id, processes, [worker])

    assert run["status"] == "failed", run
    [task] = run["tasks"]
    assert (task["status"], task["attempts_count"], task["max_retries"]) == ("dead_letter", 1, 0)
    [attempt] = task["attempts"]
    assert (attempt["status"], attempt["error_type"], attempt["error_message"]) == \
        ("failed", "ProbeFailure", "attempt 1 failed on purpose")
    assert task["last_error"] == "attempt 1 failed on purpose"


# --- a worker killed while idle -----------------------------------------------------------------------------


def test_a_worker_killed_while_idle_breaks_nothing(
        app: Flask, client: FlaskClient, tenant: Tenant, processes: Processes,
        kill_worker: Callable[[Proc], None]) -> None:
    put_dag(client, tenant, "greetings", NOOP)
    w1 = processes.worker("w1")
    wait(lambda: ping_workers(app, 1), processes, [w1], "w1 to answer a ping")
    kill_worker(w1)

    run_id = trigger(client, tenant, "hello")  # sent while no worker runs
    w2 = processes.worker("w2")
    run = wait_run(client, tenant, run_id, processes, [w1, w2])
    assert run["status"] == "succeeded", run
    [task] = run["tasks"]
    assert (task["fence"], [a["status"] for a in task["attempts"]]) == (1, ["succeeded"])


def test_waiting_for_a_run_answers_when_it_finishes(client: FlaskClient, tenant: Tenant,
                                                    processes: Processes) -> None:
    """GET /v1/runs/{id}?wait= blocks on the run-finished notification, not a poll loop."""
    client.put("/v1/dags/waits", data="- name: quick\n  runtime: platform\n  operator: noop\n",
               headers={**tenant.headers(), "Content-Type": "application/yaml"})
    run_id = client.post("/v1/jobs/quick/runs", json={}, headers=tenant.headers("writer")).json["run_id"]
    queued = client.get(f"/v1/runs/{run_id}?wait=0.2", headers=tenant.headers("reader")).json
    assert queued["status"] == "queued"  # no worker yet: the wait ran out
    processes.worker()
    answer = client.get(f"/v1/runs/{run_id}?wait=30", headers=tenant.headers("reader"))
    assert answer.json["status"] == "succeeded", answer.json
    # Woken by the notification (or finished before the wait began), not by the wait running out.
    assert answer.headers["Trace-Wait"] == "held"
    assert answer.headers["Trace-Wait-End"] in ("notified", "finished"), answer.headers
