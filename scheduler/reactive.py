"""Data-driven triggers: ``activation: reactive`` (PerUpdate, Batched, ``idle_timeout``, ``when``)
and refresh propagation (``refresh: auto``).

An *update* is a committed dataset version. A job watches the datasets behind its inputs; each
update is consumed by each watching job exactly once, through the trigger ledger
(``scheduler/ledger.py``: a ``trigger_firings`` row keyed ``data:<dataset id>:<version>``).
How a job consumes its pending updates:

* ``PerUpdate`` (the default): one run (cause ``data``) per update, with that update's window
  (dataset, version, partition key, and the block range of a ``blocks:<a>-<b>`` partition).
* ``Batched``: one run for the updates that arrive within ``batch.window`` of the first one
  still waiting, or as soon as ``batch.max_updates`` are waiting; its window lists them.
* ``refresh: auto`` (jobs of other activations): one run (cause ``refresh``) for everything
  pending; an update that arrives while a refresh run still waits in the queue is folded into
  it (that run pins its inputs when it starts, so it reads the new version anyway).

A reactive job's ``trigger: {when: ...}`` gates each run: evaluated (``scheduler/conditions``)
when the run would fire; false consumes the updates as ``skipped``, an error as ``error``.
An update made by a DAG run that also runs the job is ``skipped``: the run covers it.

``idle_timeout`` (reactive jobs): when the job has not run for that long, it runs anyway
(cause ``idle``, window ``{idle_since, idle_timeout_s}``), and again after each further idle
period (deadlines are counted from the last deadline, so a late sweep does not drift them):
the periodic re-evaluation seed 002's alert evaluator relies on when no data arrives.

Two paths evaluate a job, both under its advisory lock: the ``trace.dataset_updated`` hook
sent after a publish commits (immediate), and the beat's sweep (:func:`sweep`), which finds
whatever the hook missed (a lost message, a crashed worker), closes due batches and fires
idle timeouts. A lost message therefore delays a run by one sweep, never loses it.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, or_, select, text

from tracecore.dags.catalog import Job
from tracecore.dags.trigger_spec import Batch
from tracecore.data.datasets import PLATFORM_ORG_ID, Dataset
from tracecore.data.schema import parse_partition_key
from tracecore.db.engine import db
from tracecore.exceptions import NotFound, ValidationError
from tracecore.execution.runs import Run, Task
from tracecore.settings import current_settings

from . import conditions
from .composite import condition_tree_holds
from .ledger import claim, fire_once, lock_job

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Update:
    dataset_id: uuid.UUID
    dataset: str
    version: int
    partition_key: str | None
    created_at: datetime
    run_id: uuid.UUID | None
    extra: dict[str, Any] | None = None  # the version's own window (a chain update: chain, reorg)

    @property
    def key(self) -> str:
        return f"data:{self.dataset_id}:{self.version}"


_PENDING = text("""
SELECT v.dataset_id, d.name AS dataset, v.version, v.partition_key, v.created_at, v.run_id,
       v.metadata -> 'window' AS extra
FROM dataset_versions AS v JOIN datasets AS d ON d.id = v.dataset_id
WHERE v.dataset_id = ANY(:dataset_ids) AND v.created_at > :floor
  AND (CAST(:only_dataset AS uuid) IS NULL OR (v.dataset_id = :only_dataset AND v.version = :only_version))
  AND NOT EXISTS (SELECT 1 FROM trigger_firings AS f
                  WHERE f.job_id = :job_id AND f.key = 'data:' || v.dataset_id || ':' || v.version)
ORDER BY v.created_at, v.version
LIMIT :most
""")

_COVERED = text("SELECT EXISTS (SELECT 1 FROM tasks WHERE run_id = :run_id AND job_id = :job_id)")


def watching(job: Job) -> str | None:
    """How ``job`` consumes updates: ``PerUpdate``, ``Batched``, ``refresh``, or None (it does not)."""
    spec = job.spec or {}
    if spec.get("activation") == "reactive":
        return spec.get("execution_strategy") or "PerUpdate"
    return "refresh" if spec.get("refresh") == "auto" else None


def _watchers(org_id: uuid.UUID | None = None) -> list[Job]:
    query = select(Job).where(Job.deleted_at.is_(None), or_(Job.spec["activation"].astext == "reactive",
                                                           Job.spec["refresh"].astext == "auto"))
    if org_id is not None:
        query = query.where(Job.org_id == org_id)
    return list(db.session.scalars(query))


def pending(job: Job, dataset_ids: Sequence[uuid.UUID], now: datetime, *, most: int = 10_000,
            only: tuple[uuid.UUID, int] | None = None) -> list[Update]:
    """The job's updates not yet consumed, oldest first: versions of its input datasets made after
    the job existed (and within ``TRACE_TRIGGER_LOOKBACK``)."""
    if not dataset_ids:
        return []
    lookback = timedelta(seconds=current_settings().trigger_lookback)
    rows = db.session.execute(_PENDING, {
        "dataset_ids": list(dataset_ids), "floor": max(job.created_at, now - lookback), "job_id": job.id,
        "only_dataset": only[0] if only else None, "only_version": only[1] if only else None, "most": most})
    return [Update(**row._mapping) for row in rows]


def update_window(update: Update) -> dict[str, Any]:
    window: dict[str, Any] = {"dataset": update.dataset, "version": update.version,
                              "partition_key": update.partition_key}
    window.update(_block_range(update.partition_key))
    if update.extra:
        window.update({key: value for key, value in update.extra.items() if key in ("chain", "reorg")})
    return window


def _block_range(partition_key: str | None) -> dict[str, int]:
    if not partition_key:
        return {}
    try:
        kind, start, end = parse_partition_key(partition_key)
    except ValidationError:
        return {}
    return {"block_start": int(start), "block_end": int(end)} if kind == "block_range" else {}


def batch_window(updates: Sequence[Update]) -> dict[str, Any]:
    """The window of a run that consumes several updates: which versions of which datasets,
    when they arrived, and the block range they span (when their partitions are block ranges)."""
    by_dataset: dict[str, list[int]] = {}
    for update in updates:
        by_dataset.setdefault(update.dataset, []).append(update.version)
    window: dict[str, Any] = {"updates": len(updates), "datasets": by_dataset,
                              "first_at": updates[0].created_at.isoformat(),
                              "last_at": updates[-1].created_at.isoformat()}
    ranges = [_block_range(update.partition_key) for update in updates]
    if ranges and all(ranges):
        window["block_start"] = min(r["block_start"] for r in ranges)
        window["block_end"] = max(r["block_end"] for r in ranges)
    reorgs = [update.extra["reorg"] for update in updates if update.extra and "reorg" in update.extra]
    if reorgs:  # every reorg the batch covers, oldest first: a consumer re-evaluates from the lowest fork
        window["reorgs"] = reorgs
    return window


def _gate(job: Job) -> tuple[bool, str | None]:
    """(fire?, why not) from the job's ``when`` condition; no condition: fire."""
    trigger = (job.spec or {}).get("trigger")
    if not trigger:
        return True, None
    try:
        return (True, None) if condition_tree_holds(job, trigger) else (False, "condition false")
    except conditions.ConditionError as exc:
        log.warning("trigger condition of job %s failed: %s", job.name, exc)
        return False, str(exc)


def _consume(job: Job, updates: Sequence[Update], *, mode: str, now: datetime) -> list[uuid.UUID]:
    """Fire (or skip) what ``mode`` makes of ``updates``; answers the task ids made."""
    fresh: list[Update] = []
    for update in updates:
        if update.run_id is not None and db.session.scalar(_COVERED, {"run_id": update.run_id, "job_id": job.id}):
            claim(job.org_id, job.id, update.key, outcome="skipped", detail="made by a DAG run that runs this job")
        else:
            fresh.append(update)
    if not fresh:
        return []
    if mode == "PerUpdate":
        made = []
        for update in fresh:
            task_id = _fire(job, [update], cause="data", window=update_window(update))
            made += [task_id] if task_id else []
        return made
    if mode == "Batched":
        batch = Batch(**job.spec["batch"]) if job.spec.get("batch") else Batch()
        fresh = fresh[:batch.max_updates]
        if len(fresh) < batch.max_updates and now < fresh[0].created_at + timedelta(seconds=batch.window_s):
            return []  # the batch is still open
        task_id = _fire(job, fresh, cause="data", window=batch_window(fresh))
        return [task_id] if task_id else []
    queued = _queued_refresh(job)
    if queued is not None:  # it pins its inputs when it starts: the new versions are read anyway
        for update in fresh:
            claim(job.org_id, job.id, update.key, run_id=queued, detail="folded into a queued refresh run")
        return []
    task_id = _fire(job, fresh, cause="refresh", window={"refresh": True, **batch_window(fresh)})
    return [task_id] if task_id else []


def _fire(job: Job, updates: Sequence[Update], *, cause: str, window: dict[str, Any]) -> uuid.UUID | None:
    fire, why_not = _gate(job)
    if not fire:
        outcome = "skipped" if why_not == "condition false" else "error"
        for update in updates:
            claim(job.org_id, job.id, update.key, outcome=outcome, detail=why_not)
        return None
    try:
        return fire_once(job.org_id, job, updates[0].key, cause=cause, window=window,
                         also=[update.key for update in updates[1:]], reason=f"{len(updates)} update(s)")
    except NotFound:
        return None


def _queued_refresh(job: Job) -> uuid.UUID | None:
    return db.session.scalar(select(Run.id).join(Task, Task.run_id == Run.id).where(
        Run.job_id == job.id, Run.cause == "refresh", Task.state == "queued").limit(1))


_LAST_ACTIVITY = text("""
SELECT greatest(
  (SELECT max(t.created_at) FROM tasks AS t JOIN runs AS r ON r.id = t.run_id
   WHERE t.job_id = :job_id AND r.cause <> 'idle'),
  (SELECT max(CAST(substr(key, 6) AS timestamptz)) FROM trigger_firings WHERE job_id = :job_id AND key LIKE 'idle:%'))
""")


def _fire_idle(job: Job, now: datetime) -> uuid.UUID | None:
    """Idle since the last run (other than an idle one) or the last idle deadline: fire once per
    deadline, keyed ``idle:<deadline>``, so the next deadline is one idle period later."""
    idle = (job.spec or {}).get("idle_timeout_s")
    if not idle or (job.spec or {}).get("activation") != "reactive":
        return None
    last = db.session.scalar(_LAST_ACTIVITY, {"job_id": job.id})
    since = max(filter(None, (last, job.created_at)))
    deadline = since + timedelta(seconds=float(idle))
    if now < deadline:
        return None
    try:
        return fire_once(job.org_id, job, f"idle:{deadline.isoformat()}", cause="idle",
                         window={"idle_since": since.isoformat(), "idle_timeout_s": float(idle)},
                         reason=f"no run for {float(idle):g} s")
    except NotFound:
        return None


def evaluate(job: Job, now: datetime, *, only: tuple[uuid.UUID, int] | None = None,
             inputs: Sequence[uuid.UUID] | None = None) -> list[uuid.UUID]:
    """Consume the job's pending updates (just ``only`` for the PerUpdate hook) and fire its idle
    timeout, under the job's lock, in the caller's transaction; answers the task ids made."""
    mode = watching(job)
    if mode is None:
        return []
    lock_job(job.id)  # from here on, what is pending cannot change under us
    datasets = inputs if inputs is not None else [dataset.id for dataset in conditions.input_datasets(job)]
    found = pending(job, datasets, now, only=only if mode == "PerUpdate" else None)
    made = _consume(job, found, mode=mode, now=now)
    if only is None:
        idle = _fire_idle(job, now)
        made += [idle] if idle else []
    return made


def on_dataset_updated(dataset_id: uuid.UUID | str, version: int) -> list[uuid.UUID]:
    """The hook of one committed update: the runs it makes for the jobs watching the dataset
    (committed); answers the task ids to enqueue (none for a duplicate delivery)."""
    try:
        dataset = db.session.get(Dataset, uuid.UUID(str(dataset_id)))
        if dataset is None:
            return []
        now = db.session.execute(select(func.now())).scalar_one()
        made: list[uuid.UUID] = []
        # A platform dataset (a chain's) is read by every org: every org's watchers may want it.
        for job in _watchers(None if dataset.org_id == PLATFORM_ORG_ID else dataset.org_id):
            inputs = [d.id for d in conditions.input_datasets(job)]
            if dataset.id in inputs:
                made += evaluate(job, now, only=(dataset.id, int(version)), inputs=inputs)
                db.session.commit()
        return made
    except BaseException:
        db.session.rollback()
        raise


def sweep(org_id: uuid.UUID | None = None, now: datetime | None = None) -> list[uuid.UUID]:
    """Every watching job: pending updates, due batches, idle timeouts (each job committed on its
    own, so one job's failure loses no other's runs); answers the task ids to enqueue."""
    made: list[uuid.UUID] = []
    jobs = [job.id for job in _watchers(org_id)]
    db.session.rollback()
    for job_id in jobs:
        try:
            job = db.session.get(Job, job_id)
            if job is not None and job.deleted_at is None:
                made += evaluate(job, now or db.session.execute(select(func.now())).scalar_one())
            db.session.commit()
        except Exception:
            db.session.rollback()
            log.exception("data trigger sweep of job %s failed; retrying at the next sweep", job_id)
    return made
