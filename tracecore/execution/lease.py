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
from sqlalchemy import TextClause, text

from tracecore.db.engine import batches, db, execute_one
from tracecore.exceptions import StaleFence
from tracecore.execution.redaction import redact, redact_optional
from tracecore.execution.runs import CREATION_LOCK, TERMINAL_TASK_STATES
from tracecore.execution.states import AttemptState, ExitReason, LeaseVerdict, Refused, TaskState, quoted

log = logging.getLogger(__name__)

# PostgreSQL NOTIFY channel: payload "<run id> <state>" when a run finishes.
RUN_FINISHED_CHANNEL = "trace_run_finished"

_TERMINAL = quoted(TERMINAL_TASK_STATES)

# One task of a run reached a terminal state: count it; the last one finishes the run.
_COUNT_CLOSED_TASK = """
  UPDATE runs SET open_tasks = open_tasks - 1, failed_tasks = failed_tasks + {failed},
         state = CASE WHEN open_tasks > 1 THEN state
                      WHEN failed_tasks + {failed} > 0 THEN 'failed' ELSE 'succeeded' END,
         finished_at = CASE WHEN open_tasks > 1 THEN finished_at ELSE now() END
  WHERE id = {run_id} AND state NOT IN ('succeeded', 'failed', 'canceled') {only_if}
  RETURNING id, state, finished_at IS NOT NULL AS finished"""

_CLOSE_RUN = _COUNT_CLOSED_TASK.format(
    run_id="(SELECT run_id FROM freed)",
    failed="CASE WHEN CAST(:task_state AS varchar) = 'succeeded' THEN 0 ELSE 1 END",
    only_if=f"AND CAST(:task_state AS varchar) IN ({_TERMINAL}) AND EXISTS (SELECT 1 FROM closed)")

# Lock order, in every statement that touches them: the task row(s), then org_running rows,
# then job_running rows (each by id), then the run row. Dependencies between the CTEs below
# force that order (PostgreSQL runs CTEs on demand), so concurrent leases never deadlock.
_TAKEABLE_WHERE = "(state IN ('queued', 'retrying') OR (state = 'running' AND lease_expires_at < now()))"

# The lease in one statement. A task taken over from an expired lease keeps its slot (it was
# counted when first leased); any other take needs a free slot in its org's counter row and its
# job's, both locked (FOR UPDATE) before the check, so two workers never share the last slot.
# ``verdict``: ok, gone (another worker holds it, or it is done), full (a cap is reached: the
# task waits), missing (a counter row does not exist yet: take() creates it and tries again),
# unseen (no such task: its creator has not committed yet, or rolled back; take() waits on the
# creation lock and tries again).
_TAKE = text(f"""
WITH candidate AS MATERIALIZED (
  SELECT id, org_id, job_id, state = 'running' AS transfer FROM tasks
  WHERE id = :task_id AND {_TAKEABLE_WHERE} FOR UPDATE
), org_slot AS MATERIALIZED (
  SELECT org_id, running FROM org_running
  WHERE org_id = (SELECT org_id FROM candidate WHERE NOT transfer) FOR UPDATE
), job_slot AS MATERIALIZED (
  SELECT job_running.job_id, job_running.running,
         COALESCE(CAST(jobs.spec->>'max_concurrency' AS integer), 2147483647) AS cap
  FROM job_running JOIN jobs ON jobs.id = job_running.job_id
  WHERE job_running.job_id = (SELECT job_id FROM candidate WHERE NOT transfer)
    AND (SELECT running FROM org_slot) < :org_cap
  FOR UPDATE OF job_running
), verdict AS MATERIALIZED (
  SELECT CASE WHEN NOT EXISTS (SELECT 1 FROM candidate)
              THEN CASE WHEN EXISTS (SELECT 1 FROM tasks WHERE id = :task_id) THEN 'gone' ELSE 'unseen' END
              WHEN (SELECT transfer FROM candidate) THEN 'ok'
              WHEN NOT EXISTS (SELECT 1 FROM org_slot) THEN 'missing'
              WHEN (SELECT running FROM org_slot) >= :org_cap THEN 'full'
              WHEN NOT EXISTS (SELECT 1 FROM job_slot) THEN 'missing'
              WHEN (SELECT running >= cap FROM job_slot) THEN 'full'
              ELSE 'ok' END AS verdict
), org_bump AS (
  UPDATE org_running SET running = running + 1
  WHERE org_id = (SELECT org_id FROM org_slot) AND (SELECT verdict FROM verdict) = 'ok'
), job_bump AS (
  UPDATE job_running SET running = running + 1
  WHERE job_id = (SELECT job_id FROM job_slot) AND (SELECT verdict FROM verdict) = 'ok'
), leased AS (
  UPDATE tasks SET fence = fence + 1, lease_owner = :worker,
         lease_expires_at = now() + make_interval(secs => :ttl), state = 'running',
         attempts_count = attempts_count + 1, next_attempt_at = NULL, updated_at = now()
  WHERE id = (SELECT id FROM candidate) AND (SELECT verdict FROM verdict) = 'ok'
  RETURNING id, org_id, run_id, job_id, fence, attempts_count, max_retries, "window"
), lost AS (
  UPDATE attempts SET state = 'lost', exit_reason = 'worker_lost', finished_at = clock_timestamp(),
         error_message = 'the lease expired before the attempt finished'
  WHERE task_id = :task_id AND state = 'running' AND EXISTS (SELECT 1 FROM leased)
  RETURNING id
), started AS (
  UPDATE runs SET state = 'running', started_at = now()
  WHERE id = (SELECT run_id FROM leased) AND state = 'queued'
), recorded AS (
  -- After `lost` (the count forces it to run first): the stale attempt it closed is no
  -- longer live for the unique index on running attempts.
  INSERT INTO attempts (id, org_id, task_id, number, fence, worker, state)
  SELECT :attempt_id, org_id, id, attempts_count, fence, :worker, 'running' FROM leased
  WHERE (SELECT count(*) FROM lost) >= 0
  RETURNING id
)
SELECT verdict.verdict, leased.*, jobs.name AS job_name, jobs.operator, jobs.spec, runs.config_overrides,
       runs.parameters, (SELECT count(*) FROM recorded) AS recorded
FROM verdict LEFT JOIN (leased JOIN jobs ON jobs.id = leased.job_id JOIN runs ON runs.id = leased.run_id) ON true
""")

# Counter rows are made on first need (a new org or job), then never again.
_ADD_COUNTERS = text("""
WITH task AS (SELECT org_id, job_id FROM tasks WHERE id = :task_id), org AS (
  INSERT INTO org_running (org_id) SELECT org_id FROM task ON CONFLICT DO NOTHING
)
INSERT INTO job_running (job_id) SELECT job_id FROM task ON CONFLICT DO NOTHING
""")

# How long take() waits for the creator of a task it cannot see yet (runs.create_enqueued_run)
# to end its transaction, which normally takes a fraction of a millisecond. Past it the message
# is dropped: the reaper's sweep sends a task that stays queued again.
_WAIT_FOR_CREATOR = text("SELECT set_config('lock_timeout', '10s', true)")

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
  RETURNING run_id, state, org_id, job_id
), org_free AS (
  UPDATE org_running SET running = running - 1 WHERE org_id = (SELECT org_id FROM closed)
  RETURNING org_id
), job_free AS (
  UPDATE job_running SET running = running - 1
  WHERE job_id = (SELECT job_id FROM closed) AND (SELECT count(*) FROM org_free) >= 0
  RETURNING job_id
), freed AS (
  -- The run row is locked last (see the lock order above _TAKE).
  SELECT run_id FROM closed WHERE (SELECT count(*) FROM job_free) >= 0
), attempt AS (
  UPDATE attempts SET state = CAST(:attempt_state AS varchar), exit_reason = :exit_reason,
         error_type = :error_type, error_message = :error_message, stack_trace = :stack_trace,
         result = CAST(:result AS jsonb), finished_at = clock_timestamp(), peak_memory_bytes = :peak_memory_bytes,
         log_location = :log_location, duration_ms = EXTRACT(EPOCH FROM clock_timestamp() - started_at) * 1000
  WHERE task_id = :task_id AND fence = :fence AND EXISTS (SELECT 1 FROM closed)
), run AS ({_CLOSE_RUN}
)
SELECT (SELECT count(*) FROM closed) AS closed, (SELECT state FROM run WHERE finished) AS run_state,
       (SELECT pg_notify('{RUN_FINISHED_CHANNEL}', id::text || ' ' || state) FROM run WHERE finished) AS notified,
       -- whether a live composite trigger of the org names the job (confirmed by the caller on the
       -- parsed tree): the after-success hook then has work to do, else it costs nothing
       EXISTS (SELECT 1 FROM closed JOIN jobs AS c ON c.org_id = closed.org_id
               WHERE closed.state = 'succeeded' AND c.deleted_at IS NULL
                 AND jsonb_typeof(c.spec->'trigger') = 'object'
                 AND position(CAST(to_jsonb(CAST(:job_name AS text)) AS text) IN CAST(c.spec->'trigger' AS text)) > 0
       ) AS named_by_composite
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
    row = _fast(_TAKE, params)
    if row is not None and row["verdict"] == LeaseVerdict.UNSEEN:  # enqueued before its commit: wait for its creator
        try:
            with batches(durable=False) as transaction:
                row = transaction.commit(_WAIT_FOR_CREATOR, CREATION_LOCK, _TAKE, params=params)
        except LockNotAvailable:
            log.warning("task %s: its creator's transaction is still open; the reaper will send it again", task_id)
            return Refused.HELD
    if row is not None and row["verdict"] == LeaseVerdict.MISSING:  # the first lease of a new org or job
        _fast(_ADD_COUNTERS, {"task_id": str(task_id)})
        row = _fast(_TAKE, params)
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
    row = _fast(_CLOSE, {
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
  RETURNING id, run_id, state, org_id, job_id
), org_lock AS MATERIALIZED (  -- counter rows locked in id order (see the lock order above _TAKE)
  SELECT org_id FROM org_running WHERE org_id IN (SELECT org_id FROM requeued) ORDER BY org_id FOR UPDATE
), org_free AS (
  UPDATE org_running SET running = running - freed.n
  FROM (SELECT org_id, count(*) AS n FROM requeued GROUP BY org_id) AS freed
  WHERE org_running.org_id = freed.org_id AND org_running.org_id IN (SELECT org_id FROM org_lock)
  RETURNING org_running.org_id
), job_lock AS MATERIALIZED (
  SELECT job_id FROM job_running WHERE job_id IN (SELECT job_id FROM requeued)
    AND (SELECT count(*) FROM org_free) >= 0
  ORDER BY job_id FOR UPDATE
), job_free AS (
  UPDATE job_running SET running = running - freed.n
  FROM (SELECT job_id, count(*) AS n FROM requeued GROUP BY job_id) AS freed
  WHERE job_running.job_id = freed.job_id AND job_running.job_id IN (SELECT job_id FROM job_lock)
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
        if row.state == TaskState.DEAD_LETTER:
            db.session.execute(_COUNT_DEAD_TASK, {"run_id": row.run_id})
    db.session.commit()
    return [row.id for row in rows if row.state == TaskState.QUEUED]
