"""The thin dispatcher: lease, run the operator, record the outcome, schedule a retry.

User-code errors and platform errors are told apart here (the boundary): an operator
that raises is recorded as ``error`` with its stack trace and retried by policy; a
fence that moved on means another attempt owns the task, and this one stops quietly.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import threading
import traceback
import uuid
from collections.abc import Callable
from enum import StrEnum

from flask import Flask

from tracecore.events import emit, task_succeeded
from tracecore.exceptions import PlatformError, StaleFence, TraceError, UserCodeError
from tracecore.execution import lease as leases
from tracecore.execution.operators import CATALOG
from tracecore.execution.states import ExitReason, Refused
from tracecore.settings import Settings, current_settings

from .operators import AttemptFailed, OperatorContext, OperatorResult

log = logging.getLogger(__name__)

# Seconds before a task refused for capacity (org cap or job max_concurrency) is delivered again
# (jittered up to twice this, so waiting tasks do not come back in lockstep).
CAPACITY_COUNTDOWN = 0.1

def worker_name() -> str:
    """host:pid of the process that runs the task (a prefork child, not the parent),
    which is what the sandbox reaper checks for liveness."""
    return f"{socket.gethostname()}:{os.getpid()}"


class Heartbeat:
    """One thread per worker process that keeps every running lease alive.

    Operators run for up to an hour; without renewal the reaper would hand their
    task to another worker after ``lease_ttl``.
    """

    def __init__(self, app: Flask) -> None:
        self._app = app
        self._leases: dict[uuid.UUID, leases.Lease] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def add(self, lease: leases.Lease) -> None:
        with self._lock:
            self._leases[lease.task_id] = lease
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="trace-heartbeat", daemon=True)
                self._thread.start()

    def remove(self, lease: leases.Lease) -> None:
        with self._lock:
            self._leases.pop(lease.task_id, None)

    def _loop(self) -> None:
        ttl = current_settings(self._app).lease_ttl
        stop = threading.Event()
        while not stop.wait(ttl / 3):
            with self._lock:
                live = list(self._leases.values())
            with self._app.app_context():
                for held in live:
                    try:
                        leases.renew(held, ttl)
                    except StaleFence:
                        log.warning("lease of task %s (fence %s) was lost", held.task_id, held.fence)
                        self.remove(held)


_heartbeats: dict[int, Heartbeat] = {}


def _heartbeat(app: Flask) -> Heartbeat:
    beat = _heartbeats.get(id(app))
    if beat is None:
        beat = _heartbeats[id(app)] = Heartbeat(app)
    return beat


class Dispatched(StrEnum):
    """What one delivery of a task came to (for the canvas, logs and tests)."""

    SUCCEEDED = "succeeded"
    RETRYING = "retrying"  # the attempt failed; the task was enqueued again after its backoff
    DEAD_LETTER = "dead_letter"  # the attempt failed and no retry is left
    NOT_LEASED = "not_leased"  # another delivery holds the task, or it is done
    OVER_CAPACITY = "over_capacity"  # a cap is reached: enqueued again shortly
    FENCED = "fenced"  # the lease moved on while the operator ran: another attempt owns the task


def execute(app: Flask, task_id: str, enqueue: Callable[[str, float], None]) -> Dispatched:
    """Run one delivery of ``execute_task``."""
    settings = current_settings(app)
    held = leases.take(task_id, worker_name(), settings.lease_ttl, org_cap=settings.org_max_running)
    if held is Refused.OVER_CAPACITY:  # the task waits, never lost: deliver it again shortly
        enqueue(task_id, CAPACITY_COUNTDOWN * random.uniform(1, 2))
        return Dispatched.OVER_CAPACITY
    if held is Refused.HELD:
        return Dispatched.NOT_LEASED
    heartbeat = _heartbeat(app)
    heartbeat.add(held)
    try:
        try:
            outcome = _run_operator(OperatorContext(lease=held, settings=settings, app=app))
        finally:
            heartbeat.remove(held)
    except AttemptFailed as failed:
        return _record_failure(held, failed, settings, enqueue)
    try:
        closed = leases.succeed(held, outcome.value, peak_memory_bytes=outcome.peak_memory_bytes,
                                log_location=outcome.log_location)
    except StaleFence:
        log.warning("task %s: attempt with fence %s was fenced off", held.task_id, held.fence)
        return Dispatched.FENCED
    emit(task_succeeded, app, org_id=held.org_id, task_id=held.task_id, job_name=held.job_name,
         named_by_composite=closed.named_by_composite)
    return Dispatched.SUCCEEDED


def _record_failure(held: leases.Lease, failed: AttemptFailed, settings: Settings,
                    enqueue: Callable[[str, float], None]) -> Dispatched:
    try:
        delay = leases.fail(held, failed.failure, base_delay=settings.retry_base_delay,
                            max_delay=settings.retry_max_delay, peak_memory_bytes=failed.peak_memory_bytes,
                            log_location=failed.log_location)
    except StaleFence:
        log.warning("task %s: attempt with fence %s was fenced off", held.task_id, held.fence)
        return Dispatched.FENCED
    if delay is None:
        return Dispatched.DEAD_LETTER
    enqueue(str(held.task_id), delay)
    return Dispatched.RETRYING


def _run_operator(context: OperatorContext) -> OperatorResult:
    """Run the operator behind the user-code boundary: whatever it raises becomes
    :class:`AttemptFailed`, carrying the failure to record."""
    info = CATALOG.get(context.lease.operator)
    try:
        if info is None:
            raise PlatformError(f"operator {context.lease.operator!r} is not in this worker's catalog",
                                code="unknown_operator")
        value = info.load()(context)
        return value if isinstance(value, OperatorResult) else OperatorResult(value)
    except AttemptFailed:
        raise
    except UserCodeError as exc:
        failure = leases.Failure(ExitReason.ERROR, exc.error_type, exc.message,
                                 exc.stack_trace or traceback.format_exc())
    except TraceError as exc:
        failure = leases.Failure(exc.code, type(exc).__name__, exc.message, traceback.format_exc())
    except Exception as exc:  # an operator's own bug: recorded on the attempt, retried by policy
        failure = leases.Failure(ExitReason.ERROR, type(exc).__name__, str(exc), traceback.format_exc())
    raise AttemptFailed(failure)
