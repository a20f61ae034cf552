"""Runs: trigger a job by hand, list runs, read one with its tasks and attempts."""

from __future__ import annotations

import psycopg
from flask import current_app
from flask.typing import ResponseReturnValue
from marshmallow import Schema, fields, validate

from tracecore.dags import catalog as dags
from tracecore.db.engine import db, libpq_url
from tracecore.execution import runs
from tracecore.execution.lease import RUN_FINISHED_CHANNEL
from tracecore.execution.runs import RUN_TRANSITIONS, TERMINAL_RUN_STATES
from tracecore.settings import current_settings
from tracecore.tenancy.orgs import Role
from workers.app import enqueue

from ..auth import current
from ..long_polls import SLOTS, WaitCaps
from . import NAME_MAX, Blueprint
from .triggers import rate_limited_runs

blp = Blueprint("runs", __name__, url_prefix="/v1", description="Runs, their tasks and attempts")


class RunCreate(Schema):
    config = fields.Dict(load_default=dict, metadata={"description": "Overrides of the job's config block"})
    parameters = fields.Dict(load_default=dict)


class RunCreated(Schema):
    run_id = fields.UUID()


class RunQuery(Schema):
    job = fields.String(load_default=None, validate=validate.Length(1, NAME_MAX))
    status = fields.String(load_default=None, validate=validate.OneOf(list(RUN_TRANSITIONS)))
    limit = fields.Integer(load_default=50, validate=validate.Range(1, 500))


class RunWait(Schema):
    wait = fields.Float(load_default=0, validate=validate.Range(0, 30),
                        metadata={"description": "Seconds to wait for the run to finish before answering. Waits "
                                                 "are capped per user, per org and per API process: past a cap "
                                                 "the run is answered at once (header Trace-Wait: refused)"})


class AttemptOut(Schema):
    id = fields.UUID()
    number = fields.Integer()
    fence = fields.Integer()
    worker = fields.String()
    status = fields.String(attribute="state")
    exit_reason = fields.String(allow_none=True)
    error_type = fields.String(allow_none=True)
    error_message = fields.String(allow_none=True)
    stack_trace = fields.String(allow_none=True)
    result = fields.Raw(allow_none=True)
    started_at = fields.DateTime()
    finished_at = fields.DateTime(allow_none=True)
    duration_ms = fields.Float(allow_none=True)
    peak_memory_bytes = fields.Integer(allow_none=True)
    log_location = fields.String(allow_none=True)


class TaskOut(Schema):
    id = fields.UUID()
    job = fields.String()
    status = fields.String(attribute="state")
    fence = fields.Integer()
    lease_owner = fields.String(allow_none=True)
    lease_expires_at = fields.DateTime(allow_none=True)
    attempts_count = fields.Integer()
    max_retries = fields.Integer()
    next_attempt_at = fields.DateTime(allow_none=True)
    last_error = fields.String(allow_none=True)
    window = fields.Dict()
    created_at = fields.DateTime()
    finished_at = fields.DateTime(allow_none=True)
    attempts = fields.List(fields.Nested(AttemptOut))


class RunOut(Schema):
    id = fields.UUID()
    job = fields.String(allow_none=True)
    cause = fields.String()
    status = fields.String(attribute="state")
    triggered_by = fields.UUID(allow_none=True)
    parameters = fields.Dict()
    config_overrides = fields.Dict()
    created_at = fields.DateTime()
    started_at = fields.DateTime(allow_none=True)
    finished_at = fields.DateTime(allow_none=True)
    tasks = fields.List(fields.Nested(TaskOut))


def _job_names(job_ids: set) -> dict:
    if not job_ids:
        return {}
    rows = db.session.execute(db.select(dags.Job.id, dags.Job.name).where(dags.Job.id.in_(job_ids)))
    return dict(rows.all())


def _run_out(run: runs.Run, *, detail: bool, names: dict) -> dict:
    out = {column: getattr(run, column) for column in
           ("id", "cause", "state", "triggered_by", "parameters", "config_overrides", "created_at",
            "started_at", "finished_at")}
    out["job"] = names.get(run.job_id)
    if detail:
        tasks = runs.tasks_of(run)
        by_task: dict = {}
        for attempt in runs.attempts_of([task.id for task in tasks]):
            by_task.setdefault(attempt.task_id, []).append(attempt)
        names.update(_job_names({task.job_id for task in tasks} - set(names)))
        out["tasks"] = [{**{column.name: getattr(task, column.name) for column in runs.Task.__table__.columns},
                         "job": names.get(task.job_id), "attempts": by_task.get(task.id, [])} for task in tasks]
    return out


@blp.route("/jobs/<name>/runs", methods=["POST"])
@rate_limited_runs
@blp.arguments(RunCreate)
@blp.response(202, RunCreated)
@blp.alt_response(429, description="Past the org's rate limit of API-triggered runs (Retry-After)")
def trigger_job(body: dict, name: str, rate: runs.RateLimit) -> ResponseReturnValue:
    principal = current(Role.writer)
    app = current_app._get_current_object()  # type: ignore[attr-defined]
    run_id, _ = runs.create_enqueued_run(org_id=principal.org_id, job_name=name, cause="manual",
                                         triggered_by=principal.user_id, parameters=body["parameters"],
                                         config_overrides=body["config"], rate=rate,
                                         enqueue=lambda task_id: enqueue(app, task_id, org_id=principal.org_id))
    return {"run_id": run_id}


@blp.route("/runs")
@blp.arguments(RunQuery, location="query")
@blp.response(200, RunOut(many=True))
def list_runs(query: dict) -> ResponseReturnValue:
    principal = current()
    job_id = dags.get_job(principal.org_id, query["job"]).id if query["job"] else None
    found = runs.list_runs(principal.org_id, job_id=job_id, state=query["status"], limit=query["limit"])
    names = _job_names({run.job_id for run in found if run.job_id})
    return [_run_out(run, detail=False, names=names) for run in found]


@blp.route("/runs/<run_id>")
@blp.arguments(RunWait, location="query")
@blp.response(200, RunOut)
def get_run(query: dict, run_id: str) -> ResponseReturnValue:
    """A run with its tasks and attempts. ``wait`` long-polls for its end, within the caps of
    ``web.long_polls`` (a wait past them answers at once, ``Trace-Wait: refused``, ``Retry-After``)."""
    principal = current()
    run = runs.get_run(principal.org_id, run_id)
    headers: dict[str, str] = {}
    if run.state not in TERMINAL_RUN_STATES and query["wait"] > 0:
        db.session.rollback()  # no transaction held open while waiting
        caps = WaitCaps.of(current_settings())
        with SLOTS.hold(caps, principal.org_id, principal.user_id) as held:
            ended = _wait_for_finish(str(run.id), query["wait"]) if held else ""
        headers = ({"Trace-Wait": "held", "Trace-Wait-End": ended} if held
                   else {"Trace-Wait": "refused", "Retry-After": "1"})
        run = runs.get_run(principal.org_id, run_id)
    return _run_out(run, detail=True, names=_job_names({run.job_id} if run.job_id else set())), 200, headers


def _wait_for_finish(run_id: str, seconds: float) -> str:
    """Block until the run-finished NOTIFY for ``run_id`` arrives or ``seconds`` pass; answers how
    the wait ended (header ``Trace-Wait-End``): ``finished`` (before the wait began), ``notified``
    or ``timeout``, so a client knows whether asking again makes sense.

    LISTEN first, then re-check the row: a run that finished in between is not missed.
    """
    database_url = current_settings().database_url
    assert database_url is not None  # create_base_app refuses an app without one
    url = libpq_url(database_url)
    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute(f"LISTEN {RUN_FINISHED_CHANNEL}")
        finished = connection.execute("SELECT finished_at IS NOT NULL FROM runs WHERE id = %s", (run_id,)).fetchone()
        if finished and finished[0]:
            return "finished"
        for note in connection.notifies(timeout=seconds):
            if note.payload.startswith(run_id):
                return "notified"
    return "timeout"
