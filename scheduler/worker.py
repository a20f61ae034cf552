"""The worker process's composition root (`trace worker`, or ``celery -A scheduler.worker:create_worker_app``).

A worker runs the worker's tasks (``workers/tasks.py``) and the scheduler's (``scheduler/tasks.py``),
and its dispatcher and publishes send domain events the scheduler reacts to. Neither ``workers``
nor ``tracecore`` may import the scheduler (docs/architecture.md), so this module, one layer up,
puts them together: it names the scheduler's task modules to the Celery app (its ``include``
setting) and connects the scheduler's receivers (``scheduler/hooks.py``).
"""

from __future__ import annotations

from celery import Celery

from tracecore.settings import Settings
from workers import app as worker_app
from workers import main as worker_main

from . import hooks

# Task modules of this layer that the worker runs (imported by the Celery app, by name).
TASK_MODULES = ("scheduler.tasks",)


def create_worker_app() -> Celery:
    """The worker's Celery app with every task it runs, and the scheduler's receivers connected."""
    hooks.connect()
    return worker_app.create_worker_app(include=TASK_MODULES)


def run(settings: Settings, *, concurrency: int | None = None, pool: str = "prefork",
        name: str | None = None) -> None:
    """`trace worker`: a Celery worker on the ``trace`` queue and the org queues (workers/main.py)."""
    worker_main.run(create_worker_app(), settings, concurrency=concurrency, pool=pool, name=name)
