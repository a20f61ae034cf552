"""The worker's Celery tasks. Each is a few lines: the work lives in the dispatcher and tracecore.

The scheduler's tasks (a DAG run's canvas task, ``dataset_updated``) live in ``scheduler/tasks.py``;
the worker process's composition root (``scheduler/worker.py``) includes both modules.
"""

from __future__ import annotations

import logging
import time

from celery import Task as CeleryTask
from celery import current_app, shared_task
from flask import current_app as flask_app
from sqlalchemy import select

from tracecore.data.publish import publish_with_token
from tracecore.db.engine import db
from tracecore.execution import dag_runs
from tracecore.execution import lease as leases
from tracecore.execution.runs import Run, Task
from tracecore.execution.states import Gate
from tracecore.infra.storage import object_store
from tracecore.settings import current_settings

from . import dispatcher
from .app import (
    BACKFILL_CHUNK,
    BUFFER_PUBLISH,
    CLOCK,
    EXECUTE_DAG_TASK,
    EXECUTE_TASK,
    PING,
    REAP_LEASES,
    REAP_SANDBOXES,
    delivered_on,
    enqueue,
)
from .chain import backfill
from .sandbox.hostile_files import reap_work_dirs
from .sandbox.select import backend_for

log = logging.getLogger(__name__)


def _enqueue(task_id: str, countdown: float) -> None:
    enqueue(flask_app._get_current_object(), task_id, countdown)  # type: ignore[attr-defined]


@shared_task(name=EXECUTE_TASK, ignore_result=True, bind=True)
def execute_task(self: CeleryTask, task_id: str) -> str:
    # A retry or a capacity refusal goes back onto the queue the message came from: its org's.
    queue = delivered_on(self.request)
    app = flask_app._get_current_object()  # type: ignore[attr-defined]

    def again(task_id: str, countdown: float) -> None:
        enqueue(app, task_id, countdown, queue=queue)

    return dispatcher.execute(app, task_id, again)


@shared_task(name=REAP_LEASES, ignore_result=True)
def reap_leases() -> int:
    settings = current_settings()
    reaped = leases.reap_with_orgs(stale_after=settings.lease_ttl)
    in_dags = _tasks_of_dag_runs([task_id for task_id, _ in reaped])
    app = flask_app._get_current_object()  # type: ignore[attr-defined]
    for task_id, org_id in reaped:
        if task_id in in_dags:  # a DAG run's task goes through the dependency gate, never around it;
            # one still waiting for its upstreams is left to its canvas (no polling message per reap)
            if dag_runs.gate(str(task_id)) is Gate.READY:
                current_app.send_task(EXECUTE_DAG_TASK, args=[str(task_id)])
        else:
            enqueue(app, task_id, 0, org_id=org_id)
    return len(reaped)


def _tasks_of_dag_runs(task_ids: list) -> set:
    if not task_ids:
        return set()
    found = set(db.session.scalars(select(Task.id).join(Run, Run.id == Task.run_id)
                                   .where(Task.id.in_(task_ids), Run.dag_id.is_not(None))))
    db.session.rollback()
    return found


@shared_task(name=PING)
def ping() -> str:
    """A task that does nothing: checks a worker answers, and is the raw Celery baseline."""
    return "pong"


@shared_task(name=CLOCK)
def clock() -> list[float]:
    """The worker's wall clock as the task starts and ends: a chain of these is the raw Celery
    hop that benchmarks/chain.py measures beside a DAG run's hand-offs."""
    started = time.time()
    return [started, time.time()]


@shared_task(name=REAP_SANDBOXES, ignore_result=True)
def reap_sandboxes() -> int:
    """Remove sandboxes whose worker died (SIGKILL leaves its container behind, and its work dir's tmpfs)."""
    settings = current_settings()
    try:
        reap_work_dirs(settings.home_path / "sandboxes", settings.max_job_timeout + 300)
    except OSError:
        log.warning("sandbox reaper could not sweep work dirs", exc_info=True)
    try:
        return backend_for(current_settings()).reap_orphans()
    except Exception:  # no engine here (yet): nothing to reap; the next beat tries again
        log.warning("sandbox reaper could not run", exc_info=True)
        return 0


@shared_task(name=BUFFER_PUBLISH)
def buffer_publish(claims_token: str, manifest: dict) -> dict:
    """Publish a batch artifact on behalf of the task the capability token names (its fence
    checked like the gateway's): for publishers with a broker but no gateway socket. Answers the
    route's JSON with ``status`` inside; a refusal (409, 422 ...) is an answer, not a retry."""
    return publish_with_token(claims_token, manifest, current_settings())


@shared_task(name=BACKFILL_CHUNK, ignore_result=True, acks_late=True)
def backfill_chunk(backfill_id: str, start: int) -> str:
    """One chunk of a chain backfill: written as cryo writes it, or skipped when it is already."""
    return backfill.run_chunk(backfill_id, int(start), store=object_store(current_settings()))
