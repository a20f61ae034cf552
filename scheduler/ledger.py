"""The trigger ledger: claiming an update or a round for a job, once, with the run it fires.

Every data, refresh, idle and composite trigger goes through here. A claim is a
``trigger_firings`` row keyed ``(job_id, key)`` (UNIQUE) inserted with ``ON CONFLICT DO
NOTHING`` in the transaction that creates the run, so a message delivered twice, or a
worker's hook racing the beat's sweep, fires nothing twice. Evaluations of one job are
also serialized by a transaction-scoped advisory lock on the job (:func:`lock_job`), so two
evaluators never both decide from the same, not yet claimed, state (a batch, a round).
"""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import text

from tracecore.dags.catalog import Job
from tracecore.db.engine import db
from tracecore.execution import runs

_CLAIM = text("INSERT INTO trigger_firings (id, org_id, job_id, key, run_id, outcome, detail) "
              "VALUES (:id, :org_id, :job_id, :key, :run_id, :outcome, :detail) "
              "ON CONFLICT (job_id, key) DO NOTHING RETURNING id")


def lock_job(job_id: uuid.UUID) -> None:
    """Serialize trigger evaluations of one job until the caller's transaction ends."""
    db.session.execute(text("SELECT pg_advisory_xact_lock(hashtextextended(CAST(:job AS text), 7))"),
                       {"job": job_id})


def claim(org_id: uuid.UUID, job_id: uuid.UUID, key: str, *, outcome: str = "fired",
          run_id: uuid.UUID | None = None, detail: str | None = None) -> bool:
    """Record ``key`` as consumed by the job; False when it already was."""
    return db.session.execute(_CLAIM, {"id": uuid.uuid4(), "org_id": org_id, "job_id": job_id, "key": key,
                                       "run_id": run_id, "outcome": outcome,
                                       "detail": detail[:2000] if detail else None}).scalar() is not None


def fire_once(org_id: uuid.UUID, job: Job, key: str, *, cause: str, window: dict[str, Any] | None = None,
              parameters: dict[str, Any] | None = None, also: list[str] | tuple[str, ...] = (),
              reason: str | None = None) -> uuid.UUID | None:
    """Claim ``key`` (and the ``also`` keys: the updates a batch consumes) and create the run,
    in the caller's transaction; answers the task id, or None when ``key`` was already claimed
    (the caller commits, then enqueues). A missing job is NotFound."""
    if not claim(org_id, job.id, key, detail=reason):
        return None
    run_id, task_id = runs.create_run(org_id=org_id, job_name=job.name, cause=cause, triggered_by=None,
                                      parameters=parameters, window=window)
    db.session.execute(text("UPDATE trigger_firings SET run_id = :run_id WHERE job_id = :job_id AND key = :key"),
                       {"run_id": run_id, "job_id": job.id, "key": key})
    for other in also:
        claim(org_id, job.id, other, run_id=run_id, detail=reason)
    return task_id
