"""DAG runs as a Celery canvas, and the canvas task that runs one task of a DAG run.

The canvas follows :func:`tracecore.execution.dag_runs.shape`: a series is a chain, a parallel step a
group, so jobs whose inputs are satisfied run as a group and a job with several upstreams is
the callback of a chord over them (a group followed by a step is a chord in Celery). A part
of the DAG with no exact layout runs level by level. All signatures are immutable (``.si``):
results are not passed along, the database holds them.

Correctness under at-least-once delivery does not rest on the chord:

* ``execute_dag_task`` first asks the database (:func:`tracecore.execution.dag_runs.gate`) whether
  every upstream task of the same run succeeded. A chord fired early (a header message
  delivered twice counts twice in the Redis backend) finds an upstream still open and
  retries itself later instead of running.
* A task that fails an attempt and will be retried does not go back to the plain
  ``execute_task`` queue: the canvas task retries *itself* (``self.retry`` with the lease's
  backoff), so the chord keeps waiting for it; a Celery retry is not a chord completion.
* A duplicate delivery that does not win the lease waits (retries itself) until the task
  is terminal, then answers as the task ended.
* A dead-lettered task cancels its downstream tasks in the database (counted as failed, so
  the run finishes ``failed``), then raises so the chord does not fire; any remaining
  open tasks of the run (independent branches behind the halted chain) are sent again as
  standalone canvas tasks, which the gate orders.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from celery import Celery, chain, group
from celery.canvas import Signature
from flask import Flask

from tracecore.dags.spec import DagSpec
from tracecore.execution import dag_runs
from tracecore.execution.states import Gate, TaskState
from workers import dispatcher
from workers.app import EXECUTE_DAG_TASK
from workers.dispatcher import Dispatched

log = logging.getLogger(__name__)

WAIT_COUNTDOWN = 0.2


class DagTaskFailed(RuntimeError):
    """Raised by the canvas task when its task did not succeed: the chord must not fire."""


def build(celery: Celery, spec: DagSpec, task_ids: dict[str, uuid.UUID]) -> Signature:
    """The canvas of a DAG run over the jobs of ``task_ids``."""

    def canvas(step: dag_runs.Shape) -> Signature:
        if isinstance(step, str):
            return celery.signature(EXECUTE_DAG_TASK, args=[str(task_ids[step])], immutable=True)
        steps = [canvas(inner) for inner in step.steps]
        return chain(*steps, app=celery) if isinstance(step, dag_runs.Series) else group(steps, app=celery)

    return canvas(dag_runs.shape(spec, list(task_ids)))


def start(celery: Celery, spec: DagSpec, task_ids: dict[str, uuid.UUID]) -> None:
    """Send the canvas of a committed DAG run.

    Nobody here waits on its results: stop tracking them now, so the Redis result consumer
    does not keep (and later unsubscribe from) one channel per task.
    """
    _forget_pending(celery, build(celery, spec, task_ids).apply_async())
    # The chord's header tasks were subscribed to as they were sent, behind results we never see.
    consumer = getattr(celery.backend, "result_consumer", None)
    prefix = getattr(celery.backend, "task_keyprefix", b"")
    for key in list(getattr(consumer, "subscribed_to", ())):
        consumer.cancel_for((key[len(prefix):] if key.startswith(prefix) else key).decode())  # type: ignore[union-attr]


def _forget_pending(celery: Celery, result: Any) -> None:
    stack, seen = [result], set()
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if getattr(current, "id", None) is not None and hasattr(celery.backend, "remove_pending_result"):
            celery.backend.remove_pending_result(current)
        stack.append(getattr(current, "parent", None))
        stack.extend(getattr(current, "results", None) or [])


def run_dag_task(app: Flask, task: Any, task_id: str) -> str:
    """The body of ``execute_dag_task``; ``task`` is the bound Celery task (for ``retry``)."""
    verdict = dag_runs.gate(task_id)
    if verdict is Gate.WAIT:
        raise task.retry(countdown=_backoff(task), max_retries=None)
    if verdict is Gate.BLOCKED:  # an upstream failed before this task was canceled with it
        _fail(task, task_id, include_self=True)
    if verdict is Gate.DONE:
        return _settled(task, task_id)
    delays: list[float] = []
    outcome = dispatcher.execute(app, task_id, lambda _task_id, delay: delays.append(delay))
    if outcome is Dispatched.SUCCEEDED:
        return outcome
    if outcome is Dispatched.RETRYING:
        raise task.retry(countdown=delays[-1] if delays else WAIT_COUNTDOWN, max_retries=None)
    if outcome is Dispatched.DEAD_LETTER:
        _fail(task, task_id, resend=True)
    return _settled(task, task_id)  # not leased, fenced (another delivery holds the task), over capacity


def _settled(task: Any, task_id: str) -> str:
    state = dag_runs.task_state(task_id)
    if state == TaskState.SUCCEEDED:
        return TaskState.SUCCEEDED
    if state in dag_runs.FAILED_TASK_STATES:
        _fail(task, task_id)
    raise task.retry(countdown=_backoff(task), max_retries=None)


def _backoff(task: Any) -> float:
    """Waiting on another delivery or an upstream: poll the database, slower and slower (up to 2 s)."""
    return min(2.0, WAIT_COUNTDOWN * 1.5 ** (task.request.retries or 0))


def _fail(task: Any, task_id: str, *, resend: bool = False, include_self: bool = False) -> None:
    canceled = dag_runs.cancel_downstream(task_id, include_self=include_self)
    if resend:  # once, by the delivery that dead-lettered the task: the halted chain may hold
        # independent branches; send them standalone and let the gate order them
        for open_id in dag_runs.queued_tasks_of_run(task_id):
            task.app.send_task(EXECUTE_DAG_TASK, args=[open_id])
    raise DagTaskFailed(f"task {task_id} did not succeed; {canceled} downstream task(s) canceled")
