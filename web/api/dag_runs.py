"""DAG runs and re-runs: POST /v1/dags/{name}/runs, POST /v1/runs/{id}/rerun."""

from __future__ import annotations

from flask import current_app
from flask.typing import ResponseReturnValue
from marshmallow import Schema, fields, validate

from scheduler import canvas
from tracecore.db.engine import db
from tracecore.execution import dag_runs, runs
from tracecore.tenancy.orgs import Role

from ..auth import current
from . import NAME_MAX, Blueprint
from .triggers import rate_limited_runs

blp = Blueprint("dag_runs", __name__, url_prefix="/v1", description="Runs of whole DAGs, and re-runs")


class DagRunCreate(Schema):
    parameters = fields.Dict(load_default=dict)


class RerunCreate(Schema):
    scope = fields.String(required=True, validate=validate.OneOf(dag_runs.RERUN_SCOPES),
                          metadata={"description": "self: the job alone, without its upstream; downstream: the job "
                                                   "and everything downstream of it; failed: the tasks that ended "
                                                   "dead_letter or canceled, and their downstream"})
    job = fields.String(load_default=None, validate=validate.Length(1, NAME_MAX),
                        metadata={"description": "The job (self, downstream); required when the run has several jobs"})


class DagRunCreated(Schema):
    run_id = fields.UUID()


@blp.route("/dags/<name>/runs", methods=["POST"])
@rate_limited_runs
@blp.arguments(DagRunCreate)
@blp.response(202, DagRunCreated)
@blp.alt_response(429, description="Past the org's rate limit of API-triggered runs (Retry-After)")
def run_dag(body: dict, name: str, rate: runs.RateLimit) -> ResponseReturnValue:
    principal = current(Role.writer)
    runs.count_api_run(principal.org_id, rate)
    run_id, task_ids, spec = dag_runs.start_dag(principal.org_id, name, triggered_by=principal.user_id,
                                                parameters=body["parameters"])
    db.session.commit()
    canvas.start(current_app.extensions["celery"], spec, task_ids)
    return {"run_id": run_id}


@blp.route("/runs/<run_id>/rerun", methods=["POST"])
@rate_limited_runs
@blp.arguments(RerunCreate)
@blp.response(202, DagRunCreated)
@blp.alt_response(429, description="Past the org's rate limit of API-triggered runs (Retry-After)")
def rerun(body: dict, run_id: str, rate: runs.RateLimit) -> ResponseReturnValue:
    principal = current(Role.writer)
    runs.count_api_run(principal.org_id, rate)
    new_id, task_ids, spec = dag_runs.rerun(org_id=principal.org_id, run_id=run_id, scope=body["scope"],
                                            job=body["job"], triggered_by=principal.user_id)
    db.session.commit()
    canvas.start(current_app.extensions["celery"], spec, task_ids)
    return {"run_id": new_id}
