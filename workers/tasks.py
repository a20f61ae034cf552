"""Celery tasks. Each is a few lines: the work lives in the dispatcher and tracecore."""

from __future__ import annotations

import logging

from celery import current_app, shared_task
from flask import current_app as flask_app

from tracecore import lease as leases

from . import dispatcher
from .app import BUFFER_PUBLISH, EXECUTE_TASK, PING, REAP_LEASES, REAP_SANDBOXES

log = logging.getLogger(__name__)


def _enqueue(task_id: str, countdown: float) -> None:
    current_app.send_task(EXECUTE_TASK, args=[task_id], countdown=countdown, ignore_result=True)


@shared_task(name=EXECUTE_TASK, ignore_result=True)
def execute_task(task_id: str) -> str:
    return dispatcher.execute(flask_app._get_current_object(), task_id, _enqueue)  # type: ignore[attr-defined]


@shared_task(name=REAP_LEASES, ignore_result=True)
def reap_leases() -> int:
    settings = flask_app.config["TRACE_SETTINGS"]
    task_ids = leases.reap(stale_after=settings.lease_ttl)
    for task_id in task_ids:
        current_app.send_task(EXECUTE_TASK, args=[str(task_id)], ignore_result=True)
    return len(task_ids)


@shared_task(name=PING)
def ping() -> str:
    """A task that does nothing: checks a worker answers, and is the raw Celery baseline."""
    return "pong"


@shared_task(name=REAP_SANDBOXES, ignore_result=True)
def reap_sandboxes() -> int:
    """Remove sandboxes whose worker died (SIGKILL leaves its container behind)."""
    from .sandbox.select import backend_for

    try:
        return backend_for(flask_app.config["TRACE_SETTINGS"]).reap_orphans()
    except Exception:  # no engine here (yet): nothing to reap; the next beat tries again
        log.warning("sandbox reaper could not run", exc_info=True)
        return 0


@shared_task(name=BUFFER_PUBLISH)
def buffer_publish(claims_token: str, manifest: dict) -> dict:
    """Publish a batch artifact on behalf of the task the capability token names (its fence
    checked like the gateway's): for publishers with a broker but no gateway socket. Answers the
    route's JSON with ``status`` inside; a refusal (409, 422 ...) is an answer, not a retry."""
    from tracecore.publish import publish_with_token

    return publish_with_token(claims_token, manifest, flask_app.config["TRACE_SETTINGS"])
