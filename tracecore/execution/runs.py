"""Runs, tasks and attempts, and the one state machine they follow.

A Run is one triggering of a job (or a DAG); its Tasks are the units that get leased;
each lease of a task is an Attempt. The transitions of ``states.py`` are the only ones allowed:
PostgreSQL triggers compiled from them (``all_transition_triggers_sql``) stop a buggy or
stale writer in the database, not only in this module. The first migration holds that SQL
frozen as it was then; a change to the transitions needs a new migration that replaces the
triggers (tests/integration/db/test_schema.py fails until the migrated triggers match).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    Uuid,
    func,
    select,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from tracecore.db.engine import Base, batches, created_at, db, execute_one, uuid_pk
from tracecore.exceptions import NotFound, TraceError, ValidationError
from tracecore.execution import sql
from tracecore.execution.sql import CREATION_LOCK as CREATION_LOCK
from tracecore.execution.states import (
    ATTEMPT_TRANSITIONS,
    RUN_TRANSITIONS,
    TASK_TRANSITIONS,
    TERMINAL_RUN_STATES,
    TERMINAL_TASK_STATES,
    quoted,
)
from tracecore.settings import Settings

RUN_CAUSES = ("schedule", "webhook", "data", "dependency", "composite", "manual", "rerun", "refresh", "idle")

_S = TypeVar("_S", bound=str)


def _in(column: str, values: tuple[str, ...] | list[str]) -> str:
    return f"{column} IN ({quoted(values)})"


class Run(Base):
    __tablename__ = "runs"
    __table_args__ = (
        CheckConstraint(_in("state", list(RUN_TRANSITIONS)), name="state"),
        CheckConstraint(_in("cause", RUN_CAUSES), name="cause"),
        CheckConstraint(f"({_in('state', TERMINAL_RUN_STATES)}) = (finished_at IS NOT NULL)", name="finished"),
        CheckConstraint("open_tasks >= 0 AND failed_tasks >= 0", name="task_counts"),
        Index("ix_runs_org_created", "org_id", "created_at"),
        Index("ix_runs_job_created", "job_id", "created_at"),
    )
    id: Mapped[uuid.UUID] = uuid_pk()
    org_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("orgs.id", ondelete="CASCADE"), nullable=False)
    job_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, ForeignKey("jobs.id"))
    dag_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, ForeignKey("dags.id"))
    cause: Mapped[str] = mapped_column(String(16), nullable=False)
    triggered_by: Mapped[uuid.UUID | None] = mapped_column(Uuid, ForeignKey("users.id"))
    parameters: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False, default=dict)
    config_overrides: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False, default=dict)
    state: Mapped[str] = mapped_column(String(16), nullable=False, default="queued")
    # Kept by the statement that closes each task, so that the last task to close
    # finishes the run in the same atomic UPDATE, however many close at once.
    open_tasks: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    failed_tasks: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    created_at: Mapped[datetime] = created_at()
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Task(Base):
    __tablename__ = "tasks"
    __table_args__ = (
        CheckConstraint(_in("state", list(TASK_TRANSITIONS)), name="state"),
        CheckConstraint("fence >= 0", name="fence"),
        CheckConstraint("state <> 'running' OR (lease_owner IS NOT NULL AND lease_expires_at IS NOT NULL)",
                        name="running_has_lease"),
        CheckConstraint(f"({_in('state', TERMINAL_TASK_STATES)}) = (finished_at IS NOT NULL)", name="finished"),
        CheckConstraint("state <> 'retrying' OR next_attempt_at IS NOT NULL", name="retry_has_time"),
        Index("ix_tasks_run", "run_id"),
        Index("ix_tasks_job_created", "job_id", "created_at"),  # composite triggers, idle timeouts
        # The reaper's scans: only live rows are indexed.
        Index("ix_tasks_lease_expiry", "lease_expires_at", postgresql_where=text("state = 'running'")),
        Index("ix_tasks_waiting", "updated_at", postgresql_where=text("state IN ('queued', 'retrying')")),
    )
    id: Mapped[uuid.UUID] = uuid_pk()
    org_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("orgs.id", ondelete="CASCADE"), nullable=False)
    run_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("runs.id", ondelete="CASCADE"), nullable=False)
    job_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("jobs.id"), nullable=False)
    partition_key: Mapped[str] = mapped_column(String(256), nullable=False, default="")
    window: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False, default=dict)
    state: Mapped[str] = mapped_column(String(16), nullable=False, default="queued")
    fence: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    lease_owner: Mapped[str | None] = mapped_column(String(256))
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    attempts_count: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    max_retries: Mapped[int] = mapped_column(Integer, nullable=False, default=3)
    next_attempt_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = created_at()
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, server_default=func.now())
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Attempt(Base):
    __tablename__ = "attempts"
    __table_args__ = (
        CheckConstraint(_in("state", list(ATTEMPT_TRANSITIONS)), name="state"),
        CheckConstraint("(state = 'running') = (finished_at IS NULL)", name="finished"),
        # One attempt per lease, and at most one live attempt per task.
        Index("uq_attempts_task_fence", "task_id", "fence", unique=True),
        Index("uq_attempts_one_running", "task_id", unique=True, postgresql_where=text("state = 'running'")),
    )
    id: Mapped[uuid.UUID] = uuid_pk()
    org_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("orgs.id", ondelete="CASCADE"), nullable=False)
    task_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("tasks.id", ondelete="CASCADE"), nullable=False)
    number: Mapped[int] = mapped_column(Integer, nullable=False)
    fence: Mapped[int] = mapped_column(BigInteger, nullable=False)
    worker: Mapped[str] = mapped_column(String(256), nullable=False)
    state: Mapped[str] = mapped_column(String(16), nullable=False, default="running")
    exit_reason: Mapped[str | None] = mapped_column(String(32))
    error_type: Mapped[str | None] = mapped_column(String(256))
    error_message: Mapped[str | None] = mapped_column(Text)
    stack_trace: Mapped[str | None] = mapped_column(Text)
    result: Mapped[Any | None] = mapped_column(JSONB)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False,
                                                 server_default=func.clock_timestamp())
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    duration_ms: Mapped[float | None] = mapped_column()
    peak_memory_bytes: Mapped[int | None] = mapped_column(BigInteger)
    log_location: Mapped[str | None] = mapped_column(Text)


def transition_trigger_sql(table: str, transitions: Mapping[_S, tuple[_S, ...]]) -> str:
    """A BEFORE UPDATE trigger that refuses any state change not in ``transitions``.

    Also refuses a fence that goes down, for tables that have one.
    """
    cases = "\n".join(
        f"    WHEN '{state}' THEN allowed := NEW.state IN ({quoted(nexts) or 'NULL'});"
        for state, nexts in transitions.items())
    fence_check = ""
    changed = "NEW.state IS DISTINCT FROM OLD.state"
    if table == "tasks":
        changed += " OR (OLD.state = 'running' AND NEW.fence IS DISTINCT FROM OLD.fence)"
        fence_check = """
  IF NEW.fence < OLD.fence THEN
    RAISE EXCEPTION 'tasks.fence may only grow (% -> %)', OLD.fence, NEW.fence USING ERRCODE = 'check_violation';
  END IF;
  IF OLD.state = 'running' AND NEW.state = 'running' AND NEW.fence = OLD.fence
     AND NEW.lease_owner IS DISTINCT FROM OLD.lease_owner THEN
    RAISE EXCEPTION 'a new lease owner needs a new fence' USING ERRCODE = 'check_violation';
  END IF;"""
    return f"""
CREATE OR REPLACE FUNCTION trace_{table}_transition() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE allowed boolean;
BEGIN
  IF {changed} THEN
    CASE OLD.state
{cases}
    ELSE allowed := false;
    END CASE;
    IF NOT coalesce(allowed, false) THEN
      RAISE EXCEPTION '{table}: illegal state transition % -> %', OLD.state, NEW.state
        USING ERRCODE = 'check_violation';
    END IF;
  END IF;{fence_check}
  RETURN NEW;
END $$;
DROP TRIGGER IF EXISTS trace_{table}_transition ON {table};
CREATE TRIGGER trace_{table}_transition BEFORE UPDATE ON {table}
  FOR EACH ROW EXECUTE FUNCTION trace_{table}_transition();
"""


def all_transition_triggers_sql() -> str:
    return (transition_trigger_sql("runs", RUN_TRANSITIONS) + transition_trigger_sql("tasks", TASK_TRANSITIONS)
            + transition_trigger_sql("attempts", ATTEMPT_TRANSITIONS))


def get_run(org_id: uuid.UUID, run_id: uuid.UUID | str) -> Run:
    try:
        run_uuid = run_id if isinstance(run_id, uuid.UUID) else uuid.UUID(str(run_id))
    except ValueError:
        raise NotFound("no such run") from None
    run = db.session.scalar(select(Run).where(Run.id == run_uuid, Run.org_id == org_id)
                            .execution_options(populate_existing=True))
    if run is None:
        raise NotFound("no such run")
    return run


def list_runs(org_id: uuid.UUID, *, job_id: uuid.UUID | None = None, state: str | None = None,
              limit: int = 50) -> list[Run]:
    if state is not None and state not in RUN_TRANSITIONS:
        raise ValidationError(f"unknown run status {state!r}", path="status", code="unknown_status",
                              details={"known": list(RUN_TRANSITIONS)})
    query = select(Run).where(Run.org_id == org_id)
    if job_id is not None:
        query = query.where(Run.job_id == job_id)
    if state is not None:
        query = query.where(Run.state == state)
    return list(db.session.scalars(query.order_by(Run.created_at.desc()).limit(limit)))


def tasks_of(run: Run) -> list[Task]:
    return list(db.session.scalars(select(Task).where(Task.run_id == run.id).order_by(Task.created_at)))


def attempts_of(task_ids: list[uuid.UUID]) -> list[Attempt]:
    if not task_ids:
        return []
    return list(db.session.scalars(select(Attempt).where(Attempt.task_id.in_(task_ids))
                                   .order_by(Attempt.task_id, Attempt.number)))


class RateLimited(TraceError):
    """Past the org's limit of API-triggered runs (TRACE_RUN_RATE_LIMIT per TRACE_RUN_RATE_WINDOW)."""

    code = "rate_limited"
    http_status = 429

    def __init__(self, retry_after: int, limit: int, window: int) -> None:
        super().__init__(f"more than {limit} API-triggered runs in {window} s for this org; retry later",
                         details={"retry_after": retry_after, "limit": limit, "window_s": window})
        self.retry_after = retry_after


@dataclass(frozen=True)
class RateLimit:
    """Count the run against the org's window of API-triggered runs; refuse it past ``limit``."""

    limit: int
    window: int

    @classmethod
    def of(cls, settings: Settings) -> RateLimit:
        return cls(limit=settings.run_rate_limit, window=max(1, int(settings.run_rate_window)))

    def params(self) -> dict[str, int]:
        return {"rate_limit": self.limit, "rate_window": self.window}

    def check(self, row: dict[str, Any]) -> None:
        if row["runs"] > self.limit:
            raise RateLimited(max(1, row["retry_after"]), self.limit, self.window)


def count_api_run(org_id: uuid.UUID, rate: RateLimit) -> None:
    """Count one API-triggered run that is not a single-job run (a DAG run, a re-run, a webhook's);
    raise RateLimited past the limit. Its own statement: the caller's transaction holds no row lock."""
    row = execute_one(sql.COUNT_RUN, {"org_id": org_id, **rate.params()})
    assert row is not None
    rate.check(row)


def _run_params(run_id: uuid.UUID, task_id: uuid.UUID, *, org_id: uuid.UUID, job_name: str, cause: str,
                triggered_by: uuid.UUID | None, parameters: dict[str, Any] | None,
                config_overrides: dict[str, Any] | None, window: dict[str, Any] | None,
                dag_id: uuid.UUID | None) -> dict[str, Any]:
    return {
        "run_id": run_id, "task_id": task_id, "org_id": org_id, "job_name": job_name, "dag_id": dag_id,
        "cause": cause, "triggered_by": triggered_by, "parameters": json.dumps(parameters or {}),
        "config_overrides": json.dumps(config_overrides or {}), "window": json.dumps(window or {}),
    }


def create_run(*, org_id: uuid.UUID, job_name: str, cause: str, triggered_by: uuid.UUID | None,
               parameters: dict[str, Any] | None = None, config_overrides: dict[str, Any] | None = None,
               window: dict[str, Any] | None = None, dag_id: uuid.UUID | None = None) -> tuple[uuid.UUID, uuid.UUID]:
    """Insert a single-task run of a live job in one statement of the session's transaction;
    answers (run id, task id). The caller commits, then enqueues the task. A missing job (or
    another org's) is NotFound."""
    run_id, task_id = uuid.uuid4(), uuid.uuid4()
    params = _run_params(run_id, task_id, org_id=org_id, job_name=job_name, cause=cause, triggered_by=triggered_by,
                         parameters=parameters, config_overrides=config_overrides, window=window, dag_id=dag_id)
    if db.session.execute(sql.CREATE_RUN, params).first() is None:
        raise NotFound(f"no job named {job_name!r}")
    return run_id, task_id


def create_enqueued_run(*, org_id: uuid.UUID, job_name: str, cause: str, triggered_by: uuid.UUID | None,
                        rate: RateLimit, enqueue: Callable[[uuid.UUID], None],
                        parameters: dict[str, Any] | None = None,
                        config_overrides: dict[str, Any] | None = None) -> tuple[uuid.UUID, uuid.UUID]:
    """Count a run against the org's rate limit, enqueue its task, insert it, commit; answers
    (run id, task id) once the run is durable. A refused trigger (RateLimited, NotFound) is
    counted, inserts no run and enqueues nothing.

    Why enqueue before the insert: the broker's and the worker's share of the dispatch then
    overlaps the insert and its commit instead of following them. The transaction holds
    :data:`CREATION_LOCK` from its first round trip, before the message exists; a worker that
    gets there first finds no task, waits on the lock and looks again once the transaction is
    over, so it runs the task only after its commit and drops the message of a rolled-back one.
    Its own transaction outside the session, in two round trips (psycopg pipelines).
    """
    run_id, task_id = uuid.uuid4(), uuid.uuid4()
    params = {**_run_params(run_id, task_id, org_id=org_id, job_name=job_name, cause=cause,
                            triggered_by=triggered_by, parameters=parameters, config_overrides=config_overrides,
                            window=None, dag_id=None), **rate.params()}
    with batches() as transaction:
        admitted = transaction.send(sql.CREATION_LOCK, sql.ADMIT, params=params)
        assert admitted is not None
        if admitted["runs"] > rate.limit or admitted["job_id"] is None:
            transaction.commit(params=params)  # a refused trigger counts too, as in count_api_run
            rate.check(admitted)
            raise NotFound(f"no job named {job_name!r}")
        enqueue(task_id)
        if transaction.commit(sql.INSERT_ADMITTED, params={**params, "job_id": admitted["job_id"]}) is None:
            raise NotFound(f"no job named {job_name!r}")  # deleted in between: the worker drops the message
    return run_id, task_id
