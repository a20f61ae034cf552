"""Composite triggers: trees of ``{job}``, ``{all_of: [...]}``, ``{any_of: [...], timeout_s}`` and
``{when: sql}`` nodes, nested at will, fired once per window.

Windows ("rounds"): round ``r`` of a composite job runs from its firing ``r - 1`` (round 0: from
the job's creation) until its firing ``r``, the ledger row keyed ``composite:<r>``
(``scheduler/ledger.py``), inserted with the run under the job's lock: a duplicate delivery, the
beat's sweep racing a worker's hook, or a timeout racing a completion fires a round once.

What each node means within the current round (since its start ``S``):

* ``{job: A}``: a task of A, in a run created after ``S``, succeeded. Tasks of a DAG run that
  also runs the composite job do not count: that DAG run runs it already.
* ``all_of``: every child holds. ``any_of``: some child holds, or its ``timeout`` passed since the
  round opened: round 0 opens at the job's creation, a later round at the first upstream activity
  after ``S`` (a run of a job below the node, or a new version of an input), so without activity
  the timeout does not repeat.
* ``{when: sql}``: some input dataset of the job has a new version since ``S`` and the condition
  (``scheduler/conditions.py``) holds now. Conditions are evaluated last, and only when the
  rest of the tree leaves them deciding.

The evaluation is a function of the database, so every path runs the same code: a worker after
a task succeeds (inside DAG runs too), the ``dataset_updated`` hook for trees with conditions, and
the beat's sweep, which is what makes a lost hook a delay instead of a lost firing.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select, text

from tracecore.dags.catalog import Job
from tracecore.dags.trigger_spec import trigger_jobs
from tracecore.dags.triggers import TriggerFiring
from tracecore.db.engine import db
from tracecore.exceptions import NotFound

from . import conditions
from .ledger import fire_once, lock_job

log = logging.getLogger(__name__)

PREFIX = "composite:"

_LEAVES = text("""
SELECT j.name, min(t.created_at) AS first_at, bool_or(t.state = 'succeeded') AS succeeded
FROM tasks AS t JOIN jobs AS j ON j.id = t.job_id
WHERE j.org_id = :org_id AND j.name = ANY(:names) AND j.deleted_at IS NULL AND t.created_at > :since
  AND NOT EXISTS (SELECT 1 FROM tasks AS own WHERE own.run_id = t.run_id AND own.job_id = :job_id)
GROUP BY j.name
""")

_FIRST_VERSION = text("SELECT min(created_at) FROM dataset_versions "
                      "WHERE dataset_id = ANY(:ids) AND created_at > :since")


@dataclass
class _Round:
    """What one evaluation knows: the round, its start, upstream activity, and the clock."""

    job: Job
    number: int
    since: datetime
    now: datetime
    leaves: dict[str, tuple[datetime, bool]]
    first_version: datetime | None

    def opened(self, node: dict[str, Any]) -> datetime | None:
        """The first upstream activity below ``node`` in this round (no SQL conditions run)."""
        if "job" in node:
            found = self.leaves.get(node["job"])
            return found[0] if found else None
        if "when" in node:
            return self.first_version
        times = [self.opened(child) for child in node.get("all_of") or node.get("any_of") or ()]
        return min((at for at in times if at is not None), default=None)

    def holds(self, node: dict[str, Any]) -> tuple[bool, str]:
        """(fires?, why), cheapest children first, conditions last."""
        if "job" in node:
            found = self.leaves.get(node["job"])
            return bool(found and found[1]), f"{node['job']} succeeded"
        if "when" in node:
            if self.first_version is None:
                return False, "no new input version"
            return conditions.holds(self.job, node["when"]), "condition true"
        children = sorted(node.get("all_of") or node.get("any_of") or (), key=lambda child: _has_condition(child))
        if "all_of" in node:
            for child in children:
                ok, _ = self.holds(child)
                if not ok:
                    return False, ""
            return True, "all succeeded"
        for child in children:
            ok, why = self.holds(child)
            if ok:
                return True, why
        timeout = node.get("timeout_s")
        if timeout:
            start = self.job.created_at if self.number == 0 else self.opened(node)
            if start is not None and self.now >= start + timedelta(seconds=float(timeout)):
                return True, "timeout"
        return False, ""


def _has_condition(node: dict[str, Any]) -> bool:
    return "when" in node or any(_has_condition(child) for child in node.get("all_of") or node.get("any_of") or ())


def condition_tree_holds(job: Job, node: dict[str, Any]) -> bool:
    """A reactive job's gate: its tree of ``when`` nodes, evaluated now (no rounds, no timeouts)."""
    if "when" in node:
        return conditions.holds(job, node["when"])
    children = node.get("all_of") or node.get("any_of") or ()
    test = all if "all_of" in node else any
    return test(condition_tree_holds(job, child) for child in children)


def is_composite(job: Job) -> bool:
    spec = job.spec or {}
    return bool(spec.get("trigger")) and spec.get("activation") != "reactive"


def evaluate(job: Job, now: datetime | None = None) -> uuid.UUID | None:
    """Fire the job's current round if its tree holds, in the caller's transaction; answers the
    task id made. A condition that fails to evaluate counts as false (and is logged)."""
    if not is_composite(job):
        return None
    lock_job(job.id)
    now = now or db.session.execute(select(func.now())).scalar_one()
    firings = list(db.session.scalars(select(TriggerFiring.created_at).where(
        TriggerFiring.job_id == job.id, TriggerFiring.key.startswith(PREFIX)).order_by(TriggerFiring.created_at)))
    since = firings[-1] if firings else job.created_at
    tree = job.spec["trigger"]
    names = list(dict.fromkeys(trigger_jobs(tree)))
    leaves = {row.name: (row.first_at, row.succeeded) for row in db.session.execute(
        _LEAVES, {"org_id": job.org_id, "names": names, "since": since, "job_id": job.id})} if names else {}
    first_version = None
    if _has_condition(tree):
        inputs = [dataset.id for dataset in conditions.input_datasets(job)]
        first_version = db.session.scalar(_FIRST_VERSION, {"ids": inputs, "since": since}) if inputs else None
    round_ = _Round(job, len(firings), since, now, leaves, first_version)
    try:
        fires, why = round_.holds(tree)
    except conditions.ConditionError as exc:
        log.warning("trigger condition of job %s failed: %s", job.name, exc)
        return None
    if not fires:
        return None
    try:
        return fire_once(job.org_id, job, f"{PREFIX}{round_.number}", cause="composite",
                         window={"composite_round": round_.number, "reason": why}, reason=why)
    except NotFound:
        return None


def _composites(org_id: uuid.UUID | None, upstream: str | None = None, *, conditions_only: bool = False
                ) -> list[uuid.UUID]:
    query = select(Job).where(Job.deleted_at.is_(None), Job.spec["trigger"].astext.isnot(None))
    if org_id is not None:
        query = query.where(Job.org_id == org_id)
    found = []
    for job in db.session.scalars(query):
        tree = job.spec.get("trigger")
        if not is_composite(job) or not isinstance(tree, dict) or \
                (upstream is not None and upstream not in set(trigger_jobs(tree))):
            continue
        if not conditions_only or _has_condition(tree):
            found.append(job.id)
    return found


def _evaluate_all(job_ids: list[uuid.UUID], now: datetime | None = None) -> list[uuid.UUID]:
    """Each job in its own transaction: one failure loses no other job's firing."""
    made = []
    db.session.rollback()
    for job_id in job_ids:
        try:
            job = db.session.get(Job, job_id)
            task_id = evaluate(job, now) if job is not None and job.deleted_at is None else None
            db.session.commit()
            made += [task_id] if task_id else []
        except Exception:
            db.session.rollback()
            log.exception("composite trigger of job %s failed; the next sweep tries again", job_id)
    return made


def on_task_succeeded(org_id: uuid.UUID, job_name: str) -> list[uuid.UUID]:
    """After a task of ``job_name`` succeeded (the close statement said a composite of the org names
    it): evaluate those composites; answers the task ids to enqueue."""
    return _evaluate_all(_composites(org_id, job_name))


def on_dataset_updated(org_id: uuid.UUID, dataset_id: uuid.UUID) -> list[uuid.UUID]:
    """After an update of ``dataset_id``: evaluate the org's composites with conditions over it."""
    reading = []
    for job_id in _composites(org_id, conditions_only=True):
        job = db.session.get(Job, job_id)
        if job is not None and dataset_id in {dataset.id for dataset in conditions.input_datasets(job)}:
            reading.append(job_id)
    return _evaluate_all(reading)


def sweep(org_id: uuid.UUID | None = None, now: datetime | None = None) -> list[uuid.UUID]:
    """Every composite job (of ``org_id``, or all): timeouts, and whatever a lost hook did not fire."""
    return _evaluate_all(_composites(org_id), now)


