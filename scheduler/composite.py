"""Composite triggers: ``trigger: {any_of: [...]}``, ``{all_of: [...]}``, ``{any_of: [...], timeout}``.

Windows ("rounds"): round ``r`` of a composite job is the time between its firing ``r - 1`` (or
its creation) and its firing ``r``; firing ``r`` is the ``trigger_firings`` row keyed
``(job_id, "composite:<r>")`` (UNIQUE), inserted with the run in one transaction, so a duplicate
Celery delivery, or the timeout racing a completion, fires a round exactly once.

* ``any_of``: an upstream run that succeeds fires the round it was created in (a run created
  before the last firing belongs to a round that already fired: nothing).
* ``all_of``: fires the current round once every listed job has a run created since the last
  firing that succeeded.
* ``any_of`` + ``timeout_s``: also fires the current round when its window is older than the
  timeout; round 0 opens at the job's creation, a later round at the first upstream run created
  after the last firing (no upstream activity, no new window: the timeout does not repeat).

Only flat trees (job leaves) are handled; nested trees and ``when`` are not yet.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select

from scheduler.reactive import fire_once
from tracecore.dags import Job
from tracecore.db import db
from tracecore.exceptions import NotFound
from tracecore.runs import Run, Task
from tracecore.triggers import TriggerFiring

PREFIX = "composite:"


def _leaves(trigger: Any) -> tuple[str, list[str], float | None] | None:
    """(kind, upstream job names, timeout) of a flat composite trigger, else None."""
    if not isinstance(trigger, dict):
        return None
    for kind in ("any_of", "all_of"):
        children = trigger.get(kind)
        if isinstance(children, list) and children and all(isinstance(c, dict) and "job" in c for c in children):
            return kind, [c["job"] for c in children], trigger.get("timeout_s")
    return None


def _composites(org_id: uuid.UUID, upstream: str | None = None) -> list[tuple[Job, str, list[str], float | None]]:
    query = select(Job).where(Job.org_id == org_id, Job.deleted_at.is_(None), Job.spec["trigger"].astext.isnot(None))
    found = []
    for job in db.session.scalars(query):
        leaves = _leaves(job.spec.get("trigger"))
        if leaves is not None and (upstream is None or upstream in leaves[1]):
            found.append((job, *leaves))
    return found


def _firings(job: Job) -> list[datetime]:
    return list(db.session.scalars(select(TriggerFiring.created_at).where(
        TriggerFiring.job_id == job.id, TriggerFiring.key.startswith(PREFIX)).order_by(TriggerFiring.created_at)))


def _upstream_runs(org_id: uuid.UUID, names: list[str], since: datetime | None, state: str | None = None):
    query = (select(Job.name, func.min(Run.created_at)).join(Run, Run.job_id == Job.id)
             .where(Run.org_id == org_id, Job.name.in_(names), Job.deleted_at.is_(None)).group_by(Job.name))
    if since is not None:
        query = query.where(Run.created_at > since)
    if state is not None:
        query = query.where(Run.state == state)
    return dict(db.session.execute(query).all())


def _fire(org_id: uuid.UUID, job: Job, round_: int, reason: str) -> uuid.UUID | None:
    try:
        return fire_once(org_id, job, f"{PREFIX}{round_}", cause="composite",
                         window={"composite_round": round_, "reason": reason})
    except NotFound:
        return None


def on_task_succeeded(task_id: uuid.UUID | str) -> list[uuid.UUID]:
    """After a task succeeded: if its run succeeded, fire the composites it completes (committed);
    answers the task ids to enqueue."""
    try:
        row = db.session.execute(select(Run.id, Run.org_id, Run.state, Run.created_at, Job.name)
                                 .join(Task, Task.run_id == Run.id).join(Job, Job.id == Run.job_id)
                                 .where(Task.id == uuid.UUID(str(task_id)))).first()
        if row is None or row.state != "succeeded":
            db.session.rollback()
            return []
        task_ids = []
        for job, kind, names, _timeout in _composites(row.org_id, row.name):
            firings = _firings(job)
            if kind == "any_of":
                round_ = sum(1 for fired in firings if fired <= row.created_at)
                task_id_ = _fire(row.org_id, job, round_, f"{row.name} succeeded")
            else:
                since = firings[-1] if firings else None
                done = _upstream_runs(row.org_id, names, since, state="succeeded")
                task_id_ = _fire(row.org_id, job, len(firings), "all succeeded") if set(names) <= set(done) else None
            if task_id_ is not None:
                task_ids.append(task_id_)
        db.session.commit()
        return task_ids
    except BaseException:
        db.session.rollback()
        raise


def fire_timeouts(org_id: uuid.UUID | None = None, now: datetime | None = None) -> list[uuid.UUID]:
    """Fire every ``any_of`` with a timeout whose current window is older than it (committed);
    answers the task ids to enqueue. Called on every beat poll."""
    try:
        now = now or db.session.scalar(select(func.now()))
        orgs = [org_id] if org_id is not None else list(db.session.scalars(
            select(Job.org_id).where(Job.deleted_at.is_(None), Job.spec["trigger"]["timeout_s"].astext.isnot(None))
            .distinct()))
        task_ids = []
        for org in orgs:
            for job, kind, names, timeout in _composites(org):
                if kind != "any_of" or not timeout:
                    continue
                firings = _firings(job)
                if firings:
                    opened = _upstream_runs(org, names, firings[-1])
                    start = min(opened.values()) if opened else None
                else:
                    start = job.created_at
                if start is not None and now >= start + timedelta(seconds=float(timeout)):
                    task_id = _fire(org, job, len(firings), "timeout")
                    if task_id is not None:
                        task_ids.append(task_id)
        db.session.commit()
        return task_ids
    except BaseException:
        db.session.rollback()
        raise
