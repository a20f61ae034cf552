"""The scheduler's receivers of domain events (``tracecore/events.py``), and :func:`connect`.

The domain and the worker's dispatcher sit below the scheduler and may not call it; they send
events, and these receivers react. Every process that may send one connects them through its
composition root: the API (``web.app.create_app``) and the worker (``scheduler.worker``).
"""

from __future__ import annotations

import uuid
from typing import Any

from flask import Flask

from tracecore import events
from workers import app as celery_app

from . import composite


def on_dataset_version_committed(sender: Flask, *, dataset_id: uuid.UUID, version: int, **_: Any) -> None:
    """Send ``trace.dataset_updated`` (``scheduler/tasks.py``): the reactive jobs and composites
    downstream are evaluated on a worker, not in the publisher's request."""
    celery_app.dataset_updated(sender, dataset_id, version)


def on_task_succeeded(sender: Flask, *, org_id: uuid.UUID, job_name: str, named_by_composite: bool,
                      **_: Any) -> None:
    """Composite triggers this success completes, at once (the beat's sweep fires whatever this
    misses); nothing to do, and no query, unless a composite names the job."""
    if not named_by_composite:
        return
    for fired in composite.on_task_succeeded(org_id, job_name):
        celery_app.enqueue(sender, fired, org_id=org_id)


def connect() -> None:
    """Subscribe the receivers (idempotent: blinker keeps one connection per receiver)."""
    events.dataset_version_committed.connect(on_dataset_version_committed, weak=False)
    events.task_succeeded.connect(on_task_succeeded, weak=False)
