"""The Celery app, bound to a Flask app so every task runs inside an app context.

Delivery is at least once (``acks_late`` + ``task_reject_on_worker_lost``, prefetch 1),
so a message may arrive twice or after its worker died; the lease makes that safe.
The broker's visibility timeout outlasts the longest job, so Redis never hands a
message that is still being worked on to a second worker.
"""

from __future__ import annotations

import gc
import importlib
import uuid
from collections.abc import Sequence
from typing import Any

from celery import Celery, Task
from celery.signals import worker_process_init
from flask import Flask
from kombu import Exchange, Queue

from tracecore.appctx import create_base_app
from tracecore.infra import embedded
from tracecore.settings import configure, current_settings

from . import messages

# The message names of the app: senders need only these. The tasks behind them are defined by the package
# that owns them: workers/tasks.py, and scheduler/tasks.py (EXECUTE_DAG_TASK, DATASET_UPDATED).
EXECUTE_TASK = "trace.execute_task"
# One task of a DAG run, as a signature of the run's canvas (scheduler/canvas.py); keeps its result (chords).
EXECUTE_DAG_TASK = "trace.execute_dag_task"
REAP_LEASES = "trace.reap_leases"
PING = "trace.ping"
# The worker's wall clock at a task's start and end: the raw Celery chain baseline of benchmarks/chain.py.
CLOCK = "trace.clock"
REAP_SANDBOXES = "trace.reap_sandboxes"
BUFFER_PUBLISH = "trace.buffer_publish"
# A dataset got a new version (sent after its commit): enqueue the reactive jobs downstream.
DATASET_UPDATED = "trace.dataset_updated"
# One aligned 1000-block chunk of a chain backfill (workers/chain/backfill.py).
BACKFILL_CHUNK = "trace.backfill_chunk"


def make_celery(flask_app: Flask) -> Celery:
    settings = current_settings(flask_app)

    class FlaskTask(Task):
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            with flask_app.app_context():
                return self.run(*args, **kwargs)

    celery: Celery = Celery("trace", task_cls=FlaskTask, set_as_current=False)
    celery.conf.update(
        broker_url=settings.broker_url,
        result_backend=settings.broker_url,
        broker_connection_retry_on_startup=True,
        # round_robin (kombu's default, stated): after a message is taken from a queue, that queue goes
        # last in the next BRPOP, so an org queue holding a backlog cannot starve the others.
        broker_transport_options={"visibility_timeout": settings.broker_visibility_timeout,
                                  "queue_order_strategy": "round_robin"},
        result_backend_transport_options={"visibility_timeout": settings.broker_visibility_timeout},
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_default_queue="trace",
        # The default queue and the org queues (workers/messages.py): what a worker consumes when
        # started without --queues (`trace worker` names them too).
        task_queues=[Queue(name, Exchange(name), routing_key=name)
                     for name in messages.queue_names("trace", settings.broker_org_queues)],
        task_serializer="json",
        accept_content=["json"],
        result_expires=3600,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        beat_schedule={
            "reap-leases": {"task": REAP_LEASES, "schedule": settings.reaper_interval},
            "reap-sandboxes": {"task": REAP_SANDBOXES, "schedule": max(60.0, settings.reaper_interval)},
        },
    )
    flask_app.extensions["celery"] = celery
    # Where enqueue() may LPUSH directly (None: through send_task); the configuration is fixed from here on.
    flask_app.extensions["trace_direct_queue"] = messages.direct_queue(celery)
    flask_app.extensions["trace_org_queues"] = settings.broker_org_queues
    flask_app.extensions["trace_queues"] = frozenset(messages.queue_names("trace", settings.broker_org_queues))
    return celery


def enqueue(flask_app: Flask, task_id: uuid.UUID | str, countdown: float | None = None, *,
            org_id: uuid.UUID | str | None = None, queue: str | None = None) -> None:
    """Send ``execute_task`` for a committed task row (straight onto a Redis queue when it can:
    workers/messages.py), onto its org's queue (``org_id``), or onto ``queue``, one of the app's
    (:func:`delivered_on`); without either, the default queue."""
    celery: Celery = flask_app.extensions["celery"]
    if queue is None or queue not in flask_app.extensions["trace_queues"]:
        queue = messages.org_queue("trace", flask_app.extensions["trace_org_queues"], org_id)
    direct = None if countdown else flask_app.extensions.get("trace_direct_queue")
    if direct is not None:
        messages.publish(celery, queue, EXECUTE_TASK, [str(task_id)])
    else:
        celery.send_task(EXECUTE_TASK, args=[str(task_id)], countdown=countdown, ignore_result=True,
                         queue=None if queue == "trace" else queue)


def delivered_on(request: Any) -> str | None:
    """The queue a task's message came from (its routing key), to send the same task again onto
    the same org queue without asking the database whose it is."""
    info = getattr(request, "delivery_info", None) or {}
    key = info.get("routing_key")
    return str(key) if key else None


def dataset_updated(flask_app: Flask, dataset_id: uuid.UUID | str, version: int) -> None:
    """Send ``dataset_updated`` for a committed dataset version (no-op without a Celery app)."""
    celery: Celery | None = flask_app.extensions.get("celery")
    if celery is not None:
        celery.send_task(DATASET_UPDATED, args=[str(dataset_id), int(version)], ignore_result=True)


def enqueue_backfill(flask_app: Flask, backfill_id: uuid.UUID | str, start: int) -> None:
    """Send one chunk of a committed backfill (no-op without a Celery app)."""
    celery: Celery | None = flask_app.extensions.get("celery")
    if celery is not None:
        celery.send_task(BACKFILL_CHUNK, args=[str(backfill_id), int(start)], ignore_result=True)


def create_worker_app(include: Sequence[str] = ()) -> Celery:
    """The worker's Celery app with the worker's tasks and the task modules ``include`` names (the
    layers above add theirs by name: see scheduler/worker.py, the worker's composition root)."""
    settings = configure(embedded.attach(current_settings()))
    flask_app = create_base_app(settings, name="trace-worker")
    celery = make_celery(flask_app)
    celery.conf.include = ["workers.tasks", *include]
    for module in celery.conf.include:  # registered now, before the collector freeze below
        importlib.import_module(module)

    # Long-lived objects leave the collector's generations (see web/server.py), before the pool
    # forks (children share the pages) and again in each child after its own start-up.
    gc.freeze()
    worker_process_init.connect(lambda **_: gc.freeze(), weak=False)
    return celery
