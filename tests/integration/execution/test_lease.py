"""Leases and fences in-process, over the real PostgreSQL: tracecore.execution.lease without workers.

Every expiry is observed through the database's own clock (``wait_for`` on a query),
never decided by a sleep in the test.
"""

from __future__ import annotations

import random
import threading
import uuid
from collections.abc import Callable

import pytest
from flask import Flask
from sqlalchemy import select, text
from sqlalchemy.exc import IntegrityError

from tests.conftest import wait_for
from tracecore.dags import catalog as dags
from tracecore.db.engine import db
from tracecore.exceptions import StaleFence
from tracecore.execution import lease, runs
from tracecore.execution.runs import Attempt, Run, Task
from tracecore.tenancy import orgs

JOB_YAML = "- name: {name}\n  runtime: platform\n  operator: noop\n  max_retries: {max_retries}\n"


@pytest.fixture
def make_task(app: Flask) -> Callable[..., uuid.UUID]:
    """Create (committed) an org, a DAG with one job, and one queued run of it; answers the task id."""
    org = orgs.create_org("lease-org")
    db.session.commit()
    counter = iter(range(1000))

    def make(max_retries: int = 3) -> uuid.UUID:
        name = f"job{next(counter)}"
        dags.save_dag(org.id, f"dag-{name}", JOB_YAML.format(name=name, max_retries=max_retries),
                      content_type="application/yaml", user_id=None)
        _, task_id = runs.create_run(org_id=org.id, job_name=name, cause="manual", triggered_by=None)
        db.session.commit()
        return task_id

    return make


def task_row(task_id: uuid.UUID) -> Task:
    db.session.rollback()  # a fresh read: the identity map must not answer from an old load
    found = db.session.get(Task, task_id)
    assert found is not None
    return found


def attempts(task_id: uuid.UUID) -> list[Attempt]:
    db.session.rollback()
    return list(db.session.scalars(select(Attempt).where(Attempt.task_id == task_id).order_by(Attempt.fence)))


def run_of(task_id: uuid.UUID) -> Run:
    run = db.session.get(Run, task_row(task_id).run_id)
    assert run is not None
    return run


def lease_expired(task_id: uuid.UUID) -> bool:
    """True once the database's clock is past the task's lease expiry."""
    db.session.rollback()
    return bool(db.session.execute(text("SELECT lease_expires_at < clock_timestamp() FROM tasks WHERE id = :id"),
                                   {"id": task_id}).scalar_one())


def test_a_second_take_gets_nothing_while_the_lease_is_live(make_task: Callable[..., uuid.UUID]) -> None:
    task_id = make_task()
    first = lease.take(task_id, "worker-a", 60)
    assert first is not None and first.fence == 1 and first.attempt_number == 1
    assert first.job_name == "job0" and first.operator == "noop"

    assert lease.take(task_id, "worker-b", 60) is lease.Refused.HELD

    task = task_row(task_id)
    assert (task.state, task.fence, task.lease_owner, task.attempts_count) == ("running", 1, "worker-a", 1)
    assert [(a.fence, a.worker, a.state, a.number) for a in attempts(task_id)] == [(1, "worker-a", "running", 1)]
    assert run_of(task_id).state == "running"


def test_an_expired_lease_is_taken_over_with_the_next_fence(make_task: Callable[..., uuid.UUID]) -> None:
    task_id = make_task()
    old = lease.take(task_id, "worker-a", 0.2)
    assert old is not None

    new = wait_for(lambda: lease.take(task_id, "worker-b", 60), timeout=10, message="the 0.2 s lease to lapse")
    assert isinstance(new, lease.Lease)
    assert new.fence == old.fence + 1 == 2
    assert new.attempt_number == 2

    task = task_row(task_id)
    assert (task.state, task.fence, task.lease_owner) == ("running", 2, "worker-b")
    first, second = attempts(task_id)
    assert (first.fence, first.state, first.exit_reason) == (1, "lost", "worker_lost")
    assert first.finished_at is not None
    assert (second.fence, second.state, second.worker) == (2, "running", "worker-b")


def test_a_write_with_the_old_fence_is_refused_and_fenced(make_task: Callable[..., uuid.UUID]) -> None:
    task_id = make_task()
    old = lease.take(task_id, "worker-a", 0.2)
    assert old is not None
    new = wait_for(lambda: lease.take(task_id, "worker-b", 60), timeout=10, message="the 0.2 s lease to lapse")
    assert isinstance(new, lease.Lease)

    with pytest.raises(StaleFence) as refused:
        lease.succeed(old, {"zombie": True})
    assert refused.value.details == {"task_id": str(task_id), "fence": 1}
    with pytest.raises(StaleFence):
        lease.assert_current(task_id, old.fence)
    lease.assert_current(task_id, new.fence)  # the live fence passes
    db.session.rollback()

    first, second = attempts(task_id)
    assert (first.state, first.exit_reason, first.result) == ("fenced", "fenced", None)
    assert second.state == "running"
    assert task_row(task_id).state == "running"  # the zombie changed nothing on the task

    assert lease.succeed(new, {"ok": 1}).run_state == "succeeded"
    first, second = attempts(task_id)
    assert (second.state, second.exit_reason, second.result) == ("succeeded", "ok", {"ok": 1})
    assert second.duration_ms is not None and second.duration_ms >= 0
    assert task_row(task_id).state == "succeeded"
    assert run_of(task_id).state == "succeeded"


def test_a_write_after_the_lease_lapsed_is_refused_even_with_no_successor(
        make_task: Callable[..., uuid.UUID]) -> None:
    task_id = make_task()
    held = lease.take(task_id, "worker-a", 0.2)
    assert held is not None
    wait_for(lambda: lease_expired(task_id), timeout=10, message="the 0.2 s lease to lapse")

    with pytest.raises(StaleFence):
        lease.succeed(held)
    [attempt] = attempts(task_id)
    assert attempt.state == "fenced"
    task = task_row(task_id)
    assert (task.state, task.fence) == ("running", 1)
    assert run_of(task_id).state == "running"


def test_renew_keeps_a_lease_alive_past_its_first_expiry(make_task: Callable[..., uuid.UUID]) -> None:
    task_id = make_task()
    held = lease.take(task_id, "worker-a", 2.0)
    assert held is not None
    first_expiry = task_row(task_id).lease_expires_at
    lease.renew(held, 60)
    assert task_row(task_id).lease_expires_at > first_expiry

    def past_first_expiry() -> bool:
        db.session.rollback()
        return bool(db.session.execute(text("SELECT clock_timestamp() > :t"), {"t": first_expiry}).scalar_one())

    wait_for(past_first_expiry, timeout=10, message="the clock to pass the first expiry")
    assert lease.take(task_id, "worker-b", 60) is lease.Refused.HELD
    lease.assert_current(task_id, held.fence)
    db.session.rollback()
    assert lease.succeed(held).run_state == "succeeded"
    assert [a.state for a in attempts(task_id)] == ["succeeded"]


def test_renew_of_a_lapsed_lease_is_refused(make_task: Callable[..., uuid.UUID]) -> None:
    task_id = make_task()
    held = lease.take(task_id, "worker-a", 0.2)
    assert held is not None
    wait_for(lambda: lease_expired(task_id), timeout=10, message="the 0.2 s lease to lapse")
    with pytest.raises(StaleFence):
        lease.renew(held, 60)
    assert [a.state for a in attempts(task_id)] == ["fenced"]
    assert lease_expired(task_id)


def test_fail_retries_until_max_retries_then_dead_letters(make_task: Callable[..., uuid.UUID]) -> None:
    task_id = make_task(max_retries=1)
    failure = lease.Failure("error", "ProbeFailure", "boom", "Traceback ...\nProbeFailure: boom")

    first = lease.take(task_id, "worker-a", 60)
    assert first is not None
    delay = lease.fail(first, failure, base_delay=0.2, max_delay=2.0)
    assert delay is not None and 0.1 <= delay <= 0.2
    task = task_row(task_id)
    assert (task.state, task.last_error, task.lease_owner) == ("retrying", "boom", "worker-a")
    assert task.next_attempt_at is not None and task.finished_at is None

    second = lease.take(task_id, "worker-b", 60)
    assert second is not None and (second.fence, second.attempt_number) == (2, 2)
    assert task_row(task_id).next_attempt_at is None
    assert lease.fail(second, failure, base_delay=0.2, max_delay=2.0) is None

    task = task_row(task_id)
    assert (task.state, task.last_error) == ("dead_letter", "boom")
    assert task.finished_at is not None
    assert run_of(task_id).state == "failed"
    recorded = [(a.fence, a.state, a.exit_reason, a.error_type, a.error_message, a.stack_trace)
                for a in attempts(task_id)]
    assert recorded == [(n, "failed", "error", "ProbeFailure", "boom", failure.stack_trace) for n in (1, 2)]
    assert lease.take(task_id, "worker-c", 60) is lease.Refused.HELD  # dead letter is final


def test_a_non_retryable_failure_dead_letters_at_once(make_task: Callable[..., uuid.UUID]) -> None:
    task_id = make_task(max_retries=3)
    held = lease.take(task_id, "worker-a", 60)
    assert held is not None
    failure = lease.Failure("malformed", "ValidationError", "bad batch", retryable=False)
    assert lease.fail(held, failure, base_delay=0.2, max_delay=2.0) is None
    assert task_row(task_id).state == "dead_letter"
    assert run_of(task_id).state == "failed"


def test_reap_requeues_expired_leases_and_dead_letters_exhausted_ones(
        make_task: Callable[..., uuid.UUID]) -> None:
    retryable = make_task(max_retries=3)
    exhausted = make_task(max_retries=0)
    live = make_task(max_retries=3)
    waiting = make_task(max_retries=3)
    for task_id in (retryable, exhausted):
        assert lease.take(task_id, "doomed", 0.2) is not None
    live_lease = lease.take(live, "alive", 60)
    assert live_lease is not None
    for task_id in (retryable, exhausted):
        wait_for(lambda task_id=task_id: lease_expired(task_id), timeout=10, message="the 0.2 s leases to lapse")

    assert lease.reap(stale_after=3600) == [retryable]

    task = task_row(retryable)
    assert (task.state, task.lease_owner, task.lease_expires_at, task.fence) == ("queued", None, None, 1)
    assert task.last_error == "worker lost: the lease expired"
    assert [(a.state, a.exit_reason) for a in attempts(retryable)] == [("lost", "worker_lost")]
    assert run_of(retryable).state == "running"

    task = task_row(exhausted)
    assert task.state == "dead_letter" and task.finished_at is not None
    assert [(a.state, a.exit_reason) for a in attempts(exhausted)] == [("lost", "worker_lost")]
    assert run_of(exhausted).state == "failed"

    assert task_row(live).state == "running"
    assert [a.state for a in attempts(live)] == ["running"]
    assert task_row(waiting).state == "queued"

    # The requeued task is leased again with the next fence.
    again = lease.take(retryable, "rescuer", 60)
    assert again is not None and (again.fence, again.attempt_number) == (2, 2)
    assert lease.succeed(again).run_state == "succeeded"

    # A second pass finds nothing expired; with stale_after=0 it answers the queued task
    # whose message may have been lost, so that it is sent again.
    assert lease.reap(stale_after=3600) == []
    assert lease.reap(stale_after=0) == [waiting]
    assert task_row(waiting).state == "queued"
    # The worker's reaper re-sends each onto its org's queue (docs/reliability.md, Fairness).
    assert lease.reap_with_orgs(stale_after=0) == [(waiting, task_row(waiting).org_id)]


@pytest.mark.parametrize("attempt_number", [1, 2, 3, 4, 5, 6, 8])
def test_retry_delay_is_exponential_with_equal_jitter(attempt_number: int, monkeypatch: pytest.MonkeyPatch) -> None:
    base, cap = 0.2, 2.0
    ceiling = base * 2 ** (attempt_number - 1)
    low, high = min(cap, ceiling / 2), min(cap, ceiling)
    samples = [lease.retry_delay(attempt_number, base, cap) for _ in range(500)]
    assert all(low <= delay <= high for delay in samples)
    if low < high:
        assert len(set(samples)) > 1  # jittered, not constant

    monkeypatch.setattr(random, "uniform", lambda low, high: low)
    assert lease.retry_delay(attempt_number, base, cap) == pytest.approx(low)
    monkeypatch.setattr(random, "uniform", lambda low, high: high)
    assert lease.retry_delay(attempt_number, base, cap) == pytest.approx(high)


def test_retry_delays_never_shrink_and_stop_at_the_cap() -> None:
    base, cap = 0.2, 2.0
    by_attempt = {n: [lease.retry_delay(n, base, cap) for _ in range(200)] for n in range(1, 10)}
    # Equal jitter, then the cap: the shortest delay of attempt n+1 is at least the longest of attempt n.
    for n in range(1, 9):
        assert min(by_attempt[n + 1]) >= max(by_attempt[n])
    assert max(by_attempt[1]) <= base
    assert all(delay == cap for n in range(6, 10) for delay in by_attempt[n])


# --- the running counters behind the fairness caps (org_running, job_running) ------------------------------

def counters(task_id: uuid.UUID) -> tuple[int, int]:
    """(org's running count, job's running count) of the task's org and job."""
    db.session.rollback()
    row = db.session.execute(text(
        "SELECT (SELECT running FROM org_running WHERE org_id = t.org_id), "
        "(SELECT running FROM job_running WHERE job_id = t.job_id) FROM tasks t WHERE t.id = :id"),
        {"id": task_id}).one()
    db.session.rollback()
    return row[0], row[1]


def running_tasks(task_id: uuid.UUID) -> tuple[int, int]:
    """The same two figures counted from the tasks table: what the counters must equal."""
    db.session.rollback()
    row = db.session.execute(text(
        "SELECT (SELECT count(*) FROM tasks o WHERE o.org_id = t.org_id AND o.state = 'running'), "
        "(SELECT count(*) FROM tasks j WHERE j.job_id = t.job_id AND j.state = 'running') "
        "FROM tasks t WHERE t.id = :id"), {"id": task_id}).one()
    db.session.rollback()
    return row[0], row[1]


def test_counters_follow_take_close_fail_and_reap_and_never_drift(make_task: Callable[..., uuid.UUID]) -> None:
    done, retried, reaped, taken_over = (make_task(max_retries=3) for _ in range(4))
    held = {task_id: lease.take(task_id, "w", 60 if task_id in (done, retried) else 0.2)
            for task_id in (done, retried, reaped, taken_over)}
    assert all(isinstance(value, lease.Lease) for value in held.values())
    assert counters(done)[0] == running_tasks(done)[0] == 4
    assert lease.succeed(held[done]).run_state == "succeeded"  # type: ignore[arg-type]
    lease.fail(held[retried], lease.Failure("error", "E", "boom"), base_delay=60, max_delay=60)  # type: ignore[arg-type]
    assert counters(done) == running_tasks(done) == (2, 0)
    for task_id in (reaped, taken_over):
        wait_for(lambda task_id=task_id: lease_expired(task_id), timeout=10, message="the 0.2 s leases to lapse")
    # Taking over an expired lease moves its slot to the new holder: no count changes.
    again = lease.take(taken_over, "rescuer", 60, org_cap=2)
    assert isinstance(again, lease.Lease) and again.fence == 2
    assert counters(taken_over) == running_tasks(taken_over) == (2, 1)
    assert lease.reap(stale_after=3600) == [reaped]
    assert counters(reaped) == running_tasks(reaped) == (1, 0)
    assert lease.succeed(again).run_state == "succeeded"
    assert counters(reaped) == running_tasks(reaped) == (0, 0)
    # A zombie's late write changes nothing, the counters included.
    with pytest.raises(StaleFence):
        lease.succeed(held[reaped])  # type: ignore[arg-type]
    assert counters(reaped) == (0, 0)


def test_a_counter_can_never_go_negative(make_task: Callable[..., uuid.UUID]) -> None:
    task_id = make_task()
    held = lease.take(task_id, "w", 60)
    assert isinstance(held, lease.Lease)
    assert lease.succeed(held).run_state == "succeeded"
    with pytest.raises(IntegrityError):
        db.session.execute(text("UPDATE org_running SET running = running - 1 WHERE org_id = "
                                "(SELECT org_id FROM tasks WHERE id = :id)"), {"id": task_id})
    db.session.rollback()


def test_over_the_cap_a_take_waits_and_an_expired_lease_is_still_taken_over(
        make_task: Callable[..., uuid.UUID]) -> None:
    first, second, third = (make_task() for _ in range(3))
    held = lease.take(first, "w", 0.2, org_cap=2)
    assert isinstance(held, lease.Lease)
    assert isinstance(lease.take(second, "w", 60, org_cap=2), lease.Lease)
    assert lease.take(third, "w", 60, org_cap=2) == lease.Refused.OVER_CAPACITY
    task = task_row(third)
    assert (task.state, task.fence, task.attempts_count) == ("queued", 0, 0)  # untouched, still waiting
    wait_for(lambda: lease_expired(first), timeout=10, message="the 0.2 s lease to lapse")
    assert lease.take(third, "w", 60, org_cap=2) == lease.Refused.OVER_CAPACITY  # the expired lease holds its slot
    assert isinstance(lease.take(first, "rescuer", 60, org_cap=2), lease.Lease)  # ... until taken over
    assert counters(first)[0] == running_tasks(first)[0] == 2


def test_concurrent_takes_never_pass_the_caps_and_the_counters_end_at_zero(
        app: Flask, make_task: Callable[..., uuid.UUID]) -> None:
    """Eight threads drain 40 tasks of one org (org cap 3) and one job (max_concurrency 2):
    every count sampled right after a take is within the caps; at the end both are zero."""
    plain = [make_task() for _ in range(20)]
    org_id = task_row(plain[0]).org_id  # the org make_task uses
    dags.save_dag(org_id, "capped", "- name: capped\n  runtime: platform\n  operator: noop\n  max_concurrency: 2\n",
                  content_type="application/yaml", user_id=None)
    db.session.commit()
    capped: list[uuid.UUID] = []
    for _ in range(20):
        capped.append(runs.create_run(org_id=org_id, job_name="capped", cause="manual", triggered_by=None)[1])
    db.session.commit()
    queue = [*capped, *plain]
    random.shuffle(queue)
    guard = threading.Lock()
    seen: list[tuple[int, int]] = []
    errors: list[BaseException] = []

    def drain(number: int) -> None:
        try:
            with app.app_context():
                while True:
                    with guard:
                        if not queue:
                            return
                        task_id = queue.pop()
                    held = lease.take(task_id, f"t{number}", 60, org_cap=3)
                    if not isinstance(held, lease.Lease):
                        assert held == lease.Refused.OVER_CAPACITY
                        with guard:
                            queue.insert(0, task_id)
                        continue
                    sample = running_tasks(capped[0])  # the real count, not the counter
                    with guard:
                        seen.append(sample)
                    lease.succeed(held)
                db.session.remove()
        except BaseException as error:
            with guard:
                errors.append(error)

    threads = [threading.Thread(target=drain, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    assert len(seen) == 40
    assert max(org for org, _ in seen) <= 3 and max(job for _, job in seen) <= 2, seen
    assert counters(capped[0]) == running_tasks(capped[0]) == (0, 0)
    db.session.rollback()
    assert db.session.scalar(text("SELECT count(*) FROM tasks WHERE org_id = :org AND state <> 'succeeded'"),
                             {"org": org_id}) == 0


def test_a_lease_survives_its_pooled_connections_being_killed(make_task: Callable[..., uuid.UUID]) -> None:
    """The hot path has no pre-ping: a connection found dead (here: every backend of the pool
    terminated, as in a database restart) is replaced and the statement sent again."""
    first = lease.take(make_task(), "w", 60)
    assert isinstance(first, lease.Lease)
    assert lease.succeed(first).run_state == "succeeded"
    killed = db.session.execute(text(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
        "WHERE datname = current_database() AND pid <> pg_backend_pid() AND backend_type = 'client backend'")).scalar()
    db.session.commit()
    assert killed and killed >= 1
    second = lease.take(make_task(), "w", 60)
    assert isinstance(second, lease.Lease)
    assert lease.succeed(second).run_state == "succeeded"
