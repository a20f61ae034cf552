"""Triggers: pause and resume a job's schedule, create webhook triggers, receive signed webhooks.

``POST /v1/hooks/{trigger_id}`` carries no bearer token: it is authenticated by its
HMAC-SHA256 signature (``web.auth`` skips ``/v1/hooks/``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import redis
from flask import current_app, jsonify, request
from flask.typing import ResponseReturnValue
from marshmallow import Schema, fields, validate
from sqlalchemy import select

from tracecore.dags import triggers
from tracecore.dags.catalog import Job, get_job
from tracecore.db.engine import db
from tracecore.exceptions import NotFound, PlatformError
from tracecore.execution import runs
from tracecore.settings import current_settings
from tracecore.tenancy.orgs import Role
from workers.app import enqueue

from ..auth import current
from . import Blueprint

blp = Blueprint("triggers", __name__, url_prefix="/v1", description="Schedules and webhook triggers")


class ScheduleOut(Schema):
    job = fields.String()
    paused = fields.Boolean()
    cron = fields.String(allow_none=True)
    every_s = fields.Float(allow_none=True)
    timezone = fields.String()
    catch_up = fields.Integer()


class WebhookCreated(Schema):
    id = fields.UUID()
    job = fields.String()
    secret = fields.String(metadata={"description": "Shown once: sign requests with it"})
    url = fields.String()


class HookAccepted(Schema):
    run_id = fields.UUID()


class FiringOut(Schema):
    key = fields.String(metadata={"description": "data:<dataset id>:<version>, composite:<round>, idle:<since>"})
    outcome = fields.String(metadata={"description": "fired | skipped | error"})
    detail = fields.String(allow_none=True, metadata={"description": "Why: the reason it fired, or did not"})
    run_id = fields.UUID(allow_none=True)
    created_at = fields.DateTime()


class FiringQuery(Schema):
    # A validator that returns False does not fail in marshmallow 4: Range raises.
    limit = fields.Integer(load_default=100, validate=validate.Range(1, 1000))


def _redis() -> redis.Redis:
    client = current_app.extensions.get("trace_redis")
    if client is None:
        url = current_settings().broker_url
        if url is None:  # the replay guard keeps its nonces in Redis
            raise PlatformError("no broker is configured: webhooks cannot be verified")
        client = redis.Redis.from_url(url)
        current_app.extensions["trace_redis"] = client
    return client


def rate_limit_response(exc: runs.RateLimited) -> ResponseReturnValue:
    response = jsonify({"error": exc.to_dict()})
    response.status_code = 429
    response.headers["Retry-After"] = str(exc.retry_after)
    return response


def rate_limited_runs(view: Callable[..., Any]) -> Callable[..., Any]:
    """Per-org rate limit on API-triggered runs: 429 with Retry-After past the limit. The view
    gets ``rate`` and counts the run itself (the manual trigger in its run insert, the others
    with :func:`runs.count_api_run`)."""

    @functools.wraps(view)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        current(Role.writer)
        try:
            return view(*args, rate=runs.RateLimit.of(current_settings()), **kwargs)
        except runs.RateLimited as exc:
            return rate_limit_response(exc)

    return wrapped


def _schedule_out(name: str, row: triggers.Schedule) -> dict:
    return {"job": name, "paused": row.paused, "cron": row.cron, "every_s": row.every_s,
            "timezone": row.timezone, "catch_up": row.catch_up}


def _set_paused(name: str, paused: bool) -> dict:
    principal = current(Role.writer)
    row = triggers.set_paused(principal.org_id, name, paused)
    db.session.commit()
    return _schedule_out(name, row)


@blp.route("/jobs/<name>/schedule/pause", methods=["POST"])
@blp.response(200, ScheduleOut)
def pause_schedule(name: str) -> ResponseReturnValue:
    return _set_paused(name, True)


@blp.route("/jobs/<name>/schedule/resume", methods=["POST"])
@blp.response(200, ScheduleOut)
def resume_schedule(name: str) -> ResponseReturnValue:
    return _set_paused(name, False)


@blp.route("/jobs/<name>/firings", methods=["GET"])
@blp.arguments(FiringQuery, location="query")
@blp.response(200, FiringOut(many=True))
@blp.doc(description="The trigger ledger of a job, newest first: every update, batch, round and idle "
                     "period its data, refresh, idle and composite triggers consumed, and what became of it.")
def list_firings(query: dict, name: str) -> Sequence[triggers.TriggerFiring]:
    principal = current(Role.reader)
    job = get_job(principal.org_id, name)
    return db.session.scalars(select(triggers.TriggerFiring).where(triggers.TriggerFiring.job_id == job.id)
                              .order_by(triggers.TriggerFiring.created_at.desc(), triggers.TriggerFiring.key)
                              .limit(query["limit"])).all()


@blp.route("/jobs/<name>/webhooks", methods=["POST"])
@blp.response(201, WebhookCreated)
def create_webhook(name: str) -> ResponseReturnValue:
    principal = current(Role.writer)
    trigger, secret = triggers.create_webhook(current_settings(), principal.org_id, name,
                                              principal.user_id)
    db.session.commit()
    return {"id": trigger.id, "job": name, "secret": secret, "url": f"/v1/hooks/{trigger.id}"}


@blp.route("/hooks/<trigger_id>", methods=["POST"])
@blp.response(202, HookAccepted)
@blp.doc(security=[], description="Signed with X-Trace-Timestamp and X-Trace-Signature "
                                  "(sha256=<hex HMAC-SHA256(secret, timestamp + '.' + body)>); no bearer token.")
def receive_hook(trigger_id: str) -> ResponseReturnValue:
    settings = current_settings()
    trigger = triggers.get_webhook(trigger_id)
    body = request.get_data(cache=True)
    triggers.verify_webhook(settings, trigger, request.headers.get("X-Trace-Timestamp"),
                            request.headers.get("X-Trace-Signature"), body, _redis())
    parameters = triggers.parse_body(body)
    job = db.session.get(Job, trigger.job_id)
    if job is None or job.deleted_at is not None:
        raise NotFound("the trigger's job no longer exists")
    db.session.rollback()  # the run is made in its own transaction, as a manual trigger's
    app = current_app._get_current_object()  # type: ignore[attr-defined]
    try:
        run_id, _ = runs.create_enqueued_run(org_id=trigger.org_id, job_name=job.name, cause="webhook",
                                             triggered_by=None, parameters=parameters,
                                             rate=runs.RateLimit.of(settings),
                                             enqueue=lambda task_id: enqueue(app, task_id, org_id=trigger.org_id))
    except runs.RateLimited as exc:
        return rate_limit_response(exc)
    return {"run_id": run_id}
