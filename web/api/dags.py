"""DAG definitions and their jobs: PUT/GET /v1/dags, GET /v1/jobs/{name}."""

from __future__ import annotations

from flask import request
from flask.typing import ResponseReturnValue
from marshmallow import Schema, fields

from tracecore.dags import catalog as dags
from tracecore.db.engine import db
from tracecore.tenancy import audit
from tracecore.tenancy.orgs import Role

from ..auth import current
from . import Blueprint

blp = Blueprint("dags", __name__, url_prefix="/v1", description="DAGs, their versions and jobs")

DAG_BODY_DOC = {
    "required": True,
    "description": "A list of jobs (seed 002's schema, plus `schedule` and `trigger`), as YAML or JSON; "
                   "or a mapping with a `jobs` list.",
    "content": {media: {"schema": {"oneOf": [{"type": "array", "items": {"type": "object"}},
                                             {"type": "object"}]}}
                for media in ("application/yaml", "application/json")},
}


class JobOut(Schema):
    name = fields.String()
    dag = fields.String()
    dag_version = fields.Integer()
    operator = fields.String()
    spec = fields.Dict()
    updated_at = fields.DateTime()


class VersionOut(Schema):
    version = fields.Integer()
    created_at = fields.DateTime()
    created_by = fields.UUID(allow_none=True)
    spec = fields.Dict()


class DagOut(Schema):
    name = fields.String()
    current_version = fields.Integer()
    created_at = fields.DateTime()
    updated_at = fields.DateTime()
    jobs = fields.List(fields.Nested(JobOut))
    versions = fields.List(fields.Nested(VersionOut))


def _job_out(job: dags.Job, dag_name: str) -> dict:
    return {"name": job.name, "dag": dag_name, "dag_version": job.dag_version, "operator": job.operator,
            "spec": job.spec, "updated_at": job.updated_at}


def _dag_out(dag: dags.Dag, *, history: bool) -> dict:
    out = {"name": dag.name, "current_version": dag.current_version, "created_at": dag.created_at,
           "updated_at": dag.updated_at, "jobs": [_job_out(job, dag.name) for job in dags.jobs_of(dag)]}
    if history:
        out["versions"] = [{"version": v.version, "created_at": v.created_at, "created_by": v.created_by,
                            "spec": v.spec} for v in dags.versions_of(dag)]
    return out


@blp.route("/dags/<name>", methods=["PUT"])
@blp.doc(requestBody=DAG_BODY_DOC)
@blp.response(200, DagOut)
def put_dag(name: str) -> ResponseReturnValue:
    principal = current(Role.writer)
    dag, version = dags.save_dag(principal.org_id, name, request.get_data(), content_type=request.mimetype,
                                 user_id=principal.user_id)
    audit.record(org_id=principal.org_id, actor_id=principal.user_id, action="dag.save", object_type="dag",
                 object_id=dag.id, name=name, version=version.version)
    db.session.commit()
    return _dag_out(dag, history=False)


@blp.route("/dags")
@blp.response(200, DagOut(many=True))
def list_dags() -> ResponseReturnValue:
    principal = current()
    return [_dag_out(dag, history=False) for dag in dags.list_dags(principal.org_id)]


@blp.route("/dags/<name>")
@blp.response(200, DagOut)
def get_dag(name: str) -> ResponseReturnValue:
    principal = current()
    return _dag_out(dags.get_dag(principal.org_id, name), history=True)


@blp.route("/jobs/<name>")
@blp.response(200, JobOut)
def get_job(name: str) -> ResponseReturnValue:
    principal = current()
    job = dags.get_job(principal.org_id, name)
    return _job_out(job, db.session.get_one(dags.Dag, job.dag_id).name)
