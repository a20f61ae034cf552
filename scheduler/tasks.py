"""The scheduler's Celery tasks: a DAG run's canvas task, and the reaction to a new dataset version.

They run in the worker process (``scheduler/worker.py`` includes this module); their names are
the message contract in ``workers/app.py``, so that senders below the scheduler need only a name.
"""

from __future__ import annotations

import uuid

from celery import shared_task
from flask import current_app as flask_app

from tracecore.data.datasets import Dataset
from tracecore.db.engine import db
from workers.app import DATASET_UPDATED, EXECUTE_DAG_TASK, enqueue

from . import composite, reactive
from .canvas import run_dag_task


@shared_task(name=EXECUTE_DAG_TASK, bind=True, max_retries=None)
def execute_dag_task(self, task_id: str) -> str:
    """One task of a DAG run inside its canvas: raises unless the task succeeded (see scheduler/canvas.py)."""
    return run_dag_task(flask_app._get_current_object(), self, task_id)  # type: ignore[attr-defined]


@shared_task(name=DATASET_UPDATED, ignore_result=True)
def dataset_updated(dataset_id: str, version: int) -> int:
    """The jobs watching the dataset (reactive, refresh: auto) and the composites with conditions,
    at once (each update fires once, so a duplicate delivery makes nothing; the beat's sweep
    fires whatever this misses); answers how many runs it made."""
    task_ids = reactive.on_dataset_updated(dataset_id, version)
    dataset = db.session.get(Dataset, uuid.UUID(dataset_id))
    composites = [] if dataset is None else composite.on_dataset_updated(dataset.org_id, dataset.id)
    app = flask_app._get_current_object()  # type: ignore[attr-defined]
    for task_id in task_ids:  # watchers may be of other orgs (a platform dataset): the shared queue
        enqueue(app, task_id, 0)
    for task_id in composites:  # the dataset's org's own composites: its org queue
        enqueue(app, task_id, 0, org_id=dataset.org_id if dataset is not None else None)
    return len(task_ids) + len(composites)
