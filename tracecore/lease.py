"""Leases and fences: the only way a worker may act on a task.

Delivery is at least once, so any number of workers may hold a message for the same
task. Exactly one wins the lease (the single UPDATE in :func:`take`); every lease
bumps ``tasks.fence``, and every write made on behalf of a task names the fence it
was given. A write whose fence is no longer the task's current one, or whose lease
has lapsed, is refused with :class:`StaleFence` and its attempt is recorded as
``fenced``: a zombie worker can never overwrite the work of its successor.
"""

from __future__ import annotations

import json
import random
import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, text

from .db import db
from .exceptions import StaleFence
from .runs import TERMINAL_TASK_STATES

# PostgreSQL NOTIFY channel: payload "<run id> <state>" when a run finishes.
RUN_FINISHED_CHANNEL = "trace_run_finished"

_TERMINAL = ", ".join(repr(state) for state in TERMINAL_TASK_STATES)

# One task of a run reached a terminal state: count it; the last one finishes the run.
_COUNT_CLOSED_TASK = """
  UPDATE runs SET open_tasks = open_tasks - 1, failed_tasks = failed_tasks + {failed},
         state = CASE WHEN open_tasks > 1 THEN state
                      WHEN failed_tasks + {failed} > 0 THEN 'failed' ELSE 'succeeded' END,
         finished_at = CASE WHEN open_tasks > 1 THEN finished_at ELSE now() END
  WHERE id = {run_id} AND state NOT IN ('succeeded', 'failed', 'canceled') {only_if}
  RETURNING id, state, finished_at IS NOT NULL AS finished"""

_CLOSE_RUN = _COUNT_CLOSED_TASK.format(
    run_id="(SELECT run_id FROM closed)",
    failed="CASE WHEN CAST(:task_state AS varchar) = 'succeeded' THEN 0 ELSE 1 END",
    only_if=f"AND CAST(:task_state AS varchar) IN ({_TERMINAL}) AND EXISTS (SELECT 1 FROM closed)")

_TAKE = text("""
WITH leased AS (
  UPDATE tasks SET fence = fence + 1, lease_owner = :worker,
         lease_expires_at = now() + make_interval(secs => :ttl), state = 'running',
         attempts_count = attempts_count + 1, next_attempt_at = NULL, updated_at = now()
  WHERE id = :task_id AND (state IN ('queued', 'retrying') OR (state = 'running' AND lease_expires_at < now()))
    -- Fairness: the org's and the job's running tasks (live leases) must be below their caps.
    -- Counted under the org's advisory lock, taken by take() before this statement.
    AND (SELECT count(*) FROM tasks AS busy WHERE busy.org_id = tasks.org_id AND busy.state = 'running'
           AND busy.lease_expires_at > now()) < :org_cap
    AND (SELECT count(*) FROM tasks AS busy WHERE busy.job_id = tasks.job_id AND busy.state = 'running'
           AND busy.lease_expires_at > now())
        < COALESCE((SELECT CAST(spec->>'max_concurrency' AS integer) FROM jobs WHERE jobs.id = tasks.job_id),
                   2147483647)
  RETURNING id, org_id, run_id, job_id, fence, attempts_count, max_retries, "window"
), lost AS (
  UPDATE attempts SET state = 'lost', exit_reason = 'worker_lost', finished_at = clock_timestamp(),
         error_message = 'the lease expired before the attempt finished'
  WHERE task_id = :task_id AND state = 'running' AND EXISTS (SELECT 1 FROM leased)
), started AS (
  UPDATE runs SET state = 'running', started_at = now()
  WHERE id = (SELECT run_id FROM leased) AND state = 'queued'
), recorded AS (
  -- Skipped when a stale attempt is still marked running: the unique index on live
  -- attempts would see it, so take() records this one after `lost` has committed.
  INSERT INTO attempts (id, org_id, task_id, number, fence, worker, state)
  SELECT :attempt_id, org_id, id, attempts_count, fence, :worker, 'running' FROM leased
  WHERE NOT EXISTS (SELECT 1 FROM attempts WHERE task_id = :task_id AND state = 'running')
  RETURNING id
)
SELECT leased.*, jobs.name AS job_name, jobs.operator, jobs.spec, runs.config_overrides, runs.parameters,
       EXISTS (SELECT 1 FROM recorded) AS recorded
FROM leased JOIN jobs ON jobs.id = leased.job_id JOIN runs ON runs.id = leased.run_id
""")

# Serializes the leases of one org (released at commit), so the caps' counts in _TAKE
# see every lease committed before: two workers cannot both take the last free slot.
_LOCK_ORG = text("""
SELECT pg_advisory_xact_lock(hashtext('trace-org-cap'), hashtext(CAST(org_id AS text))) FROM tasks WHERE id = :task_id
""")

# Why a refused take was refused: still takeable means it was over a cap.
_TAKEABLE = text("""
SELECT 1 FROM tasks WHERE id = :task_id
  AND (state IN ('queued', 'retrying') OR (state = 'running' AND lease_expires_at < now()))
""")

# What take() answers when the task waits for capacity (distinct from None: another worker holds it).
OVER_CAPACITY = "over_capacity"

_RECORD_ATTEMPT = text("""
INSERT INTO attempts (id, org_id, task_id, number, fence, worker, state)
VALUES (:id, :org_id, :task_id, :number, :fence, :worker, 'running')
""")

# Close the task and its attempt; the run's counters make the last task to close
# finish the run in the same statement (row locks order concurrent closers).
_CLOSE = text(f"""
WITH closed AS (
  UPDATE tasks SET state = CAST(:task_state AS varchar),
         finished_at = CASE WHEN CAST(:task_state AS varchar) IN ({_TERMINAL}) THEN now() END,
         next_attempt_at = CASE WHEN CAST(:task_state AS varchar) = 'retrying'
                                THEN now() + make_interval(secs => CAST(:delay AS double precision)) END,
         last_error = :error_message, updated_at = now()
  WHERE id = :task_id AND fence = :fence AND state = 'running' AND lease_expires_at > now()
  RETURNING run_id, state
), attempt AS (
  UPDATE attempts SET state = CAST(:attempt_state AS varchar), exit_reason = :exit_reason,
         error_type = :error_type, error_message = :error_message, stack_trace = :stack_trace,
         result = CAST(:result AS jsonb), finished_at = clock_timestamp(), peak_memory_bytes = :peak_memory_bytes,
         log_location = :log_location, duration_ms = EXTRACT(EPOCH FROM clock_timestamp() - started_at) * 1000
  WHERE task_id = :task_id AND fence = :fence AND EXISTS (SELECT 1 FROM closed)
), run AS ({_CLOSE_RUN}
)
SELECT (SELECT count(*) FROM closed) AS closed, (SELECT state FROM run WHERE finished) AS run_state,
       (SELECT pg_notify('{RUN_FINISHED_CHANNEL}', id::text || ' ' || state) FROM run WHERE finished) AS notified
""")

_FENCED = text("""
UPDATE attempts SET state = 'fenced', exit_reason = 'fenced', finished_at = clock_timestamp(),
       error_message = 'refused: the task was leased to a newer attempt or the lease expired'
WHERE task_id = :task_id AND fence = :fence AND state IN ('running', 'lost')
""")

_RENEW = text("""
UPDATE tasks SET lease_expires_at = now() + make_interval(secs => :ttl)
WHERE id = :task_id AND fence = :fence AND state = 'running' AND lease_expires_at > now()
""")

_ASSERT_CURRENT = text("""
SELECT 1 FROM tasks WHERE id = :task_id AND fence = :fence AND state = 'running' AND lease_expires_at > now()
FOR SHARE
""")


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


def _autocommit() -> Connection:
    """A pooled connection in autocommit: each hot-path statement is its own transaction,
    which saves the BEGIN and COMMIT round trips of a session."""
    return db.engine.connect().execution_options(isolation_level="AUTOCOMMIT")


def take(task_id: uuid.UUID | str, worker: str, ttl: float,
         org_cap: int = 2147483647) -> Lease | str | None:
    """Take the lease and record the attempt; None when another worker holds the task (or it is
    done), :data:`OVER_CAPACITY` when the org's or the job's running tasks are at their cap."""
    attempt_id = uuid.uuid4()
    with db.engine.connect() as connection, connection.begin():
        connection.execute(_LOCK_ORG, {"task_id": str(task_id)})
        row = connection.execute(_TAKE, {"task_id": str(task_id), "worker": worker, "ttl": ttl,
                                         "attempt_id": attempt_id, "org_cap": org_cap}).mappings().first()
        if row is None:
            takeable = connection.execute(_TAKEABLE, {"task_id": str(task_id)}).first() is not None
            return OVER_CAPACITY if takeable else None
        if not row["recorded"]:  # a stale attempt was closed as lost by the statement above
            connection.execute(_RECORD_ATTEMPT, {"id": attempt_id, "org_id": row["org_id"], "task_id": row["id"],
                                                 "number": row["attempts_count"], "fence": row["fence"],
                                                 "worker": worker})
    return Lease(task_id=row["id"], org_id=row["org_id"], run_id=row["run_id"], job_id=row["job_id"],
                 job_name=row["job_name"], fence=row["fence"], attempt_id=attempt_id,
                 attempt_number=row["attempts_count"], max_retries=row["max_retries"], worker=worker,
                 operator=row["operator"], job_spec=row["spec"], config_overrides=row["config_overrides"],
                 parameters=row["parameters"], window=row["window"])


def renew(lease: Lease, ttl: float) -> None:
    """Extend a live lease (the heartbeat of a long operator)."""
    result = db.session.execute(_RENEW, {"task_id": lease.task_id, "fence": lease.fence, "ttl": ttl})
    if result.rowcount == 0:  # type: ignore[attr-defined]
        _refuse(lease.task_id, lease.fence)
    db.session.commit()


def assert_current(task_id: uuid.UUID, fence: int) -> None:
    """Inside a writer's transaction: refuse unless ``fence`` holds a live lease.

    The share lock keeps the lease from moving until the writer commits.
    """
    if db.session.execute(_ASSERT_CURRENT, {"task_id": task_id, "fence": fence}).first() is None:
        _refuse(task_id, fence)


def succeed(lease: Lease, result: Any = None, *, peak_memory_bytes: int | None = None,
            log_location: str | None = None) -> str | None:
    """Record success; answers the run's new state if the run finished."""
    return _close(lease, task_state="succeeded", attempt_state="succeeded", exit_reason="ok", result=result,
                  peak_memory_bytes=peak_memory_bytes, log_location=log_location)


def fail(lease: Lease, failure: Failure, *, base_delay: float, max_delay: float,
         peak_memory_bytes: int | None = None, log_location: str | None = None) -> float | None:
    """Record a failed attempt; answers the retry delay, or None when the task is dead-lettered."""
    delay = retry_delay(lease.attempt_number, base_delay, max_delay)
    retry = failure.retryable and lease.attempt_number <= lease.max_retries
    _close(lease, task_state="retrying" if retry else "dead_letter", attempt_state="failed",
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


def _close(lease: Lease, *, task_state: str, attempt_state: str, exit_reason: str, result: Any = None,
           error_type: str | None = None, error_message: str | None = None, stack_trace: str | None = None,
           delay: float = 0.0, peak_memory_bytes: int | None = None, log_location: str | None = None) -> str | None:
    with _autocommit() as connection:
        row = connection.execute(_CLOSE, {
            "task_id": lease.task_id, "fence": lease.fence, "task_state": task_state,
            "attempt_state": attempt_state, "exit_reason": exit_reason, "error_type": error_type,
            "error_message": error_message, "stack_trace": stack_trace, "delay": delay,
            "result": None if result is None else json.dumps(result, default=str),
            "peak_memory_bytes": peak_memory_bytes, "log_location": log_location,
        }).one()
    if row.closed == 0:
        _refuse(lease.task_id, lease.fence)
    return row.run_state


def _refuse(task_id: uuid.UUID, fence: int) -> None:
    db.session.rollback()
    db.session.execute(_FENCED, {"task_id": task_id, "fence": fence})
    db.session.commit()
    raise StaleFence(f"fence {fence} of task {task_id} is stale: a newer attempt holds the task or the lease expired",
                     details={"task_id": str(task_id), "fence": fence})


_REAP = text("""
WITH expired AS (
  SELECT id FROM tasks WHERE state = 'running' AND lease_expires_at < now() FOR UPDATE SKIP LOCKED
), lost AS (
  UPDATE attempts SET state = 'lost', exit_reason = 'worker_lost', finished_at = clock_timestamp(),
         error_message = 'the worker stopped renewing its lease (killed or hung)'
  WHERE task_id IN (SELECT id FROM expired) AND state = 'running'
), requeued AS (
  UPDATE tasks SET state = CASE WHEN attempts_count > max_retries THEN 'dead_letter' ELSE 'queued' END,
         finished_at = CASE WHEN attempts_count > max_retries THEN now() END,
         last_error = 'worker lost: the lease expired', lease_owner = NULL, lease_expires_at = NULL,
         updated_at = now()
  WHERE id IN (SELECT id FROM expired)
  RETURNING id, run_id, state
), forgotten AS (
  UPDATE tasks SET updated_at = now()
  WHERE id IN (SELECT id FROM tasks WHERE (state = 'queued' AND updated_at < now() - make_interval(secs => :stale))
                  OR (state = 'retrying' AND next_attempt_at < now() - make_interval(secs => :stale))
               FOR UPDATE SKIP LOCKED)
  RETURNING id
)
SELECT id, run_id, state FROM requeued UNION ALL SELECT id, NULL, 'queued' FROM forgotten
""")

_COUNT_DEAD_TASK = text(_COUNT_CLOSED_TASK.format(run_id=":run_id", failed="1", only_if=""))


def reap(stale_after: float) -> list[uuid.UUID]:
    """Hand expired leases back to the queue; answers the task ids to enqueue again.

    Also answers queued or retrying tasks whose message seems lost (older than
    ``stale_after``): a duplicate message is harmless, the lease dedupes it.
    """
    rows = db.session.execute(_REAP, {"stale": stale_after}).all()
    for row in rows:
        if row.state == "dead_letter":
            db.session.execute(_COUNT_DEAD_TASK, {"run_id": row.run_id})
    db.session.commit()
    return [row.id for row in rows if row.state == "queued"]
