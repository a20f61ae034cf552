"""Leases and fences: the only way a worker may act on a task.

Delivery is at least once, so any number of workers may hold a message for the same
task. Exactly one wins the lease (the single statement of :func:`take`); every lease
bumps ``tasks.fence``, and every write made on behalf of a task names the fence it
was given. A write whose fence is no longer the task's current one, or whose lease
has lapsed, is refused with :class:`StaleFence` and its attempt is recorded as
``fenced``: a zombie worker can never overwrite the work of its successor.
"""

from __future__ import annotations

import json
import logging
import random
import uuid
from dataclasses import dataclass
from typing import Any

from psycopg.errors import LockNotAvailable
from sqlalchemy import TextClause

from tracecore.db.engine import batches, db, execute_one
from tracecore.exceptions import StaleFence
from tracecore.execution import sql
from tracecore.execution.redaction import redact, redact_optional
from tracecore.execution.sql import RUN_FINISHED_CHANNEL as RUN_FINISHED_CHANNEL
from tracecore.execution.states import AttemptState, ExitReason, LeaseVerdict, Refused, TaskState

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Lease:
    """What a worker holds while it runs a task; ``fence`` goes with every write."""

    task_id: uuid.UUID
    org_id: uuid.UUID
    run_id: uuid.UUID
    job_id: uuid.UUID
    job_name: str
    fence: int
    attempt_id: uuid.UUID
    attempt_number: int
    max_retries: int
    worker: str
    operator: str
    job_spec: dict[str, Any]
    config_overrides: dict[str, Any]
    parameters: dict[str, Any]
    window: dict[str, Any]

    @property
    def config(self) -> dict[str, Any]:
        return {**self.job_spec.get("config", {}), **self.config_overrides}


@dataclass(frozen=True)
class Failure:
    """How an attempt failed, as recorded on the attempt."""

    exit_reason: str
    error_type: str
    message: str
    stack_trace: str = ""
    retryable: bool = True


def _fast(statement: TextClause, params: dict[str, Any]) -> dict[str, Any] | None:
    """One hot-path statement, its own non-durable transaction (see :func:`autocommit_engine`)."""
    return execute_one(statement, params, durable=False)


def take(task_id: uuid.UUID | str, worker: str, ttl: float, org_cap: int = 2147483647) -> Lease | Refused:
    """Take the lease and record the attempt in one statement; :attr:`Refused.HELD` when another
    worker holds the task (or it is done, or never committed), :attr:`Refused.OVER_CAPACITY` when
    the org's or the job's running tasks are at their cap. A task not there yet may have been
    enqueued ahead of its commit (runs.create_enqueued_run): the take then waits for its creator
    and looks again."""
    attempt_id = uuid.uuid4()
    params = {"task_id": str(task_id), "worker": worker, "ttl": ttl, "attempt_id": attempt_id, "org_cap": org_cap}
    row = _fast(sql.TAKE, params)
    if row is not None and row["verdict"] == LeaseVerdict.UNSEEN:  # enqueued before its commit: wait for its creator
        try:
            with batches(durable=False) as transaction:
                row = transaction.commit(sql.WAIT_FOR_CREATOR, sql.CREATION_LOCK, sql.TAKE, params=params)
        except LockNotAvailable:
            log.warning("task %s: its creator's transaction is still open; the reaper will send it again", task_id)
            return Refused.HELD
    if row is not None and row["verdict"] == LeaseVerdict.MISSING:  # the first lease of a new org or job
        _fast(sql.ADD_COUNTERS, {"task_id": str(task_id)})
        row = _fast(sql.TAKE, params)
    assert row is not None
    if row["verdict"] == LeaseVerdict.FULL:
        return Refused.OVER_CAPACITY
    if row["verdict"] != LeaseVerdict.OK or row["id"] is None:
        return Refused.HELD
    return Lease(task_id=row["id"], org_id=row["org_id"], run_id=row["run_id"], job_id=row["job_id"],
                 job_name=row["job_name"], fence=row["fence"], attempt_id=attempt_id,
                 attempt_number=row["attempts_count"], max_retries=row["max_retries"], worker=worker,
                 operator=row["operator"], job_spec=row["spec"], config_overrides=row["config_overrides"],
                 parameters=row["parameters"], window=row["window"])


def renew(lease: Lease, ttl: float) -> None:
    """Extend a live lease (the heartbeat of a long operator)."""
    result = db.session.execute(sql.RENEW, {"task_id": lease.task_id, "fence": lease.fence, "ttl": ttl})
    if result.rowcount == 0:  # type: ignore[attr-defined]
        _refuse(lease.task_id, lease.fence)
    db.session.commit()


def assert_current(task_id: uuid.UUID, fence: int) -> None:
    """Inside a writer's transaction: refuse unless ``fence`` holds a live lease.

    The share lock keeps the lease from moving until the writer commits.
    """
    if db.session.execute(sql.ASSERT_CURRENT, {"task_id": task_id, "fence": fence}).first() is None:
        _refuse(task_id, fence)


@dataclass(frozen=True)
class Closed:
    """What recording a success answers."""

    run_state: str | None  # the run's new state if this task finished it
    named_by_composite: bool  # a composite trigger of the org names the job: evaluate it now


def succeed(lease: Lease, result: Any = None, *, peak_memory_bytes: int | None = None,
            log_location: str | None = None) -> Closed:
    """Record success."""
    row = _close(lease, task_state=TaskState.SUCCEEDED, attempt_state=AttemptState.SUCCEEDED,
                 exit_reason=ExitReason.OK, result=result,
                 peak_memory_bytes=peak_memory_bytes, log_location=log_location)
    return Closed(run_state=row["run_state"], named_by_composite=row["named_by_composite"])


def fail(lease: Lease, failure: Failure, *, base_delay: float, max_delay: float,
         peak_memory_bytes: int | None = None, log_location: str | None = None) -> float | None:
    """Record a failed attempt; answers the retry delay, or None when the task is dead-lettered."""
    delay = retry_delay(lease.attempt_number, base_delay, max_delay)
    retry = failure.retryable and lease.attempt_number <= lease.max_retries
    _close(lease, task_state=TaskState.RETRYING if retry else TaskState.DEAD_LETTER, attempt_state=AttemptState.FAILED,
           exit_reason=failure.exit_reason, error_type=failure.error_type, error_message=failure.message,
           stack_trace=failure.stack_trace, delay=delay, peak_memory_bytes=peak_memory_bytes,
           log_location=log_location)
    return delay if retry else None


def retry_delay(attempt_number: int, base: float, cap: float) -> float:
    """Exponential backoff with equal jitter: each delay lies in [d/2, d], d = base * 2**(n-1),
    then capped.

    Half fixed, half random keeps retries of many tasks apart while each task's delays
    never shrink (the cap comes after the jitter).
    """
    ceiling = base * 2 ** (attempt_number - 1)
    return min(cap, ceiling / 2 + random.uniform(0, ceiling / 2))


def _close(lease: Lease, *, task_state: TaskState, attempt_state: AttemptState, exit_reason: str, result: Any = None,
           error_type: str | None = None, error_message: str | None = None, stack_trace: str | None = None,
           delay: float = 0.0, peak_memory_bytes: int | None = None,
           log_location: str | None = None) -> dict[str, Any]:
    # Whatever an operator answers or raises may quote a credential: the last net before it is stored
    # where every reader of the org sees it (by shape only; the udf operator also knows its token).
    row = _fast(sql.CLOSE, {
        "task_id": lease.task_id, "fence": lease.fence, "job_name": lease.job_name, "task_state": task_state,
        "attempt_state": attempt_state, "exit_reason": exit_reason, "error_type": redact_optional(error_type),
        "error_message": redact_optional(error_message), "stack_trace": redact_optional(stack_trace),
        "delay": delay, "result": None if result is None else redact(json.dumps(result, default=str)),
        "peak_memory_bytes": peak_memory_bytes, "log_location": log_location,
    })
    assert row is not None
    if row["closed"] == 0:
        _refuse(lease.task_id, lease.fence)
    return row


def _refuse(task_id: uuid.UUID, fence: int) -> None:
    db.session.rollback()
    db.session.execute(sql.FENCED, {"task_id": task_id, "fence": fence})
    db.session.commit()
    raise StaleFence(f"fence {fence} of task {task_id} is stale: a newer attempt holds the task or the lease expired",
                     details={"task_id": str(task_id), "fence": fence})


def reap(stale_after: float) -> list[uuid.UUID]:
    """Hand expired leases back to the queue; answers the task ids to enqueue again.

    Also answers queued or retrying tasks whose message seems lost (older than
    ``stale_after``): a duplicate message is harmless, the lease dedupes it.
    """
    return [task_id for task_id, _ in reap_with_orgs(stale_after)]


def reap_with_orgs(stale_after: float) -> list[tuple[uuid.UUID, uuid.UUID]]:
    """:func:`reap`, answering (task id, org id): a reaped task goes back onto its org's queue."""
    rows = db.session.execute(sql.REAP, {"stale": stale_after}).all()
    for row in rows:
        if row.state == TaskState.DEAD_LETTER:
            db.session.execute(sql.COUNT_DEAD_TASK, {"run_id": row.run_id})
    db.session.commit()
    return [(row.id, row.org_id) for row in rows if row.state == TaskState.QUEUED]
