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

from flask import Flask

from tracecore.appctx import settings_of
from tracecore.exceptions import PlatformError, StaleFence, TraceError, UserCodeError
from tracecore.execution import lease as leases
from tracecore.execution.operators import CATALOG

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
        ttl = settings_of(self._app).lease_ttl
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


def execute(app: Flask, task_id: str, enqueue: Callable[[str, float], None]) -> str:
    """Run one delivery of ``execute_task``; answers what happened, for logs and tests."""
    settings = settings_of(app)
    held = leases.take(task_id, worker_name(), settings.lease_ttl, org_cap=settings.org_max_running)
    if held is None:
        return "not_leased"
    if held == leases.OVER_CAPACITY:  # the task waits, never lost: deliver it again shortly
        enqueue(task_id, CAPACITY_COUNTDOWN * random.uniform(1, 2))
        return "over_capacity"
    assert isinstance(held, leases.Lease)
    heartbeat = _heartbeat(app)
    heartbeat.add(held)
    try:
        outcome = _run_operator(OperatorContext(lease=held, settings=settings, app=app))
    finally:
        heartbeat.remove(held)
    try:
        if isinstance(outcome, OperatorResult):
            closed = leases.succeed(held, outcome.value, peak_memory_bytes=outcome.peak_memory_bytes,
                                    log_location=outcome.log_location)
            if closed.named_by_composite:
                _fire_composites(app, held)
            return "succeeded"
        delay = leases.fail(held, outcome.failure, base_delay=settings.retry_base_delay,
                            max_delay=settings.retry_max_delay, peak_memory_bytes=outcome.peak_memory_bytes,
                            log_location=outcome.log_location)
    except StaleFence:
        log.warning("task %s: attempt with fence %s was fenced off", held.task_id, held.fence)
        return "fenced"
    if delay is None:
        return "dead_letter"
    enqueue(str(held.task_id), delay)
    return "retrying"


def _fire_composites(app: Flask, lease: leases.Lease) -> None:
    """Composite triggers this success completes, at once; best effort: the beat's sweep fires
    whatever this misses."""
    from scheduler.composite import on_task_succeeded

    from .app import enqueue

    try:
        for fired in on_task_succeeded(lease.org_id, lease.job_name):
            enqueue(app, fired)
    except Exception:
        log.warning("composite triggers after task %s failed", lease.task_id, exc_info=True)


def _run_operator(context: OperatorContext) -> OperatorResult | AttemptFailed:
    """Run the operator behind the user-code boundary: whatever it raises becomes a recorded failure."""
    info = CATALOG.get(context.lease.operator)
    try:
        if info is None:
            raise PlatformError(f"operator {context.lease.operator!r} is not in this worker's catalog",
                                code="unknown_operator")
        value = info.load()(context)
        return value if isinstance(value, OperatorResult) else OperatorResult(value)
    except AttemptFailed as failed:
        return failed
    except UserCodeError as exc:
        return AttemptFailed(leases.Failure("error", exc.error_type, exc.message,
                                            exc.stack_trace or traceback.format_exc()))
    except TraceError as exc:
        return AttemptFailed(leases.Failure(exc.code, type(exc).__name__, exc.message, traceback.format_exc()))
    except Exception as exc:  # an operator's own bug: recorded on the attempt, retried by policy
        return AttemptFailed(leases.Failure("error", type(exc).__name__, str(exc), traceback.format_exc()))
