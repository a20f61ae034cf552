"""Datasets: the catalog, one dataset's versions and lineage, rollback, redaction, grants.

GET /v1/datasets?search=, GET /v1/datasets/{name}, POST /v1/datasets/{name}/rollback,
DELETE /v1/datasets/{name}/rows, POST /v1/datasets/{name}/pii-grants, POST /v1/grants,
GET /v1/lineage?asset=. Reading needs the reader role; rollback the writer role; redaction
and grants the admin role of the owning org. A dataset granted to the caller's org is read
(never changed) as ``<owner org>__<name>``; another org's dataset is 404.
"""

from __future__ import annotations

from typing import Any

from flask.typing import ResponseReturnValue
from marshmallow import Schema, fields, validate

from tracecore.dags.catalog import Job
from tracecore.data import admin as dataset_admin
from tracecore.data import datasets, lineage
from tracecore.db.engine import db
from tracecore.tenancy import audit
from tracecore.tenancy.orgs import Org, Role

from ..auth import current
from . import EMAIL_MAX, INT32_MAX, NAME_MAX, ORG_NAME_MAX, SEARCH_MAX, Blueprint

blp = Blueprint("datasets", __name__, url_prefix="/v1", description="Datasets: catalog, versions, lineage, grants")


class DatasetSearchQuery(Schema):
    search = fields.String(load_default=None, validate=validate.Length(max=SEARCH_MAX),
                           metadata={"description": "Matches name or description, any case"})


class DatasetSummaryOut(Schema):
    name = fields.String(metadata={"description": "As this org names it: `<owner org>__<name>` when granted"})
    owner = fields.String(allow_none=True, metadata={"description": "The owning org, for a granted dataset"})
    kind = fields.String()
    pii = fields.Boolean()
    description = fields.String()
    current_version = fields.Integer(allow_none=True)
    rows = fields.Integer(allow_none=True, metadata={"description": "Rows of the current version"})
    updated_at = fields.DateTime()


class DatasetColumnOut(Schema):
    name = fields.String()
    type = fields.String(metadata={"description": "Arrow type, e.g. int64, timestamp[us, tz=UTC]"})
    nullable = fields.Boolean()


class LineageInputOut(Schema):
    dataset = fields.String(allow_none=True)
    version = fields.Integer(allow_none=True)
    source = fields.String(allow_none=True, metadata={"description": "A platform source such as block_follower"})


class DatasetVersionOut(Schema):
    version = fields.Integer()
    current = fields.Boolean()
    created_at = fields.DateTime()
    rows = fields.Integer()
    bytes = fields.Integer()
    files = fields.Integer(metadata={"description": "Files in the version's manifest"})
    schema_fingerprint = fields.String(allow_none=True)
    partition_key = fields.String(allow_none=True)
    metadata = fields.Dict(metadata={"description": "Materialization: rows, bytes, duration_ms, custom entries"})
    attempt_id = fields.UUID(allow_none=True)
    task_id = fields.UUID(allow_none=True)
    run_id = fields.UUID(allow_none=True)
    inputs = fields.List(fields.Nested(LineageInputOut))


class DatasetPartitionOut(Schema):
    key = fields.String()
    kind = fields.String()
    range_start = fields.String()
    range_end = fields.String()
    latest_version = fields.Integer()
    rows = fields.Integer()
    updated_at = fields.DateTime()


class LineageUpstreamOut(Schema):
    dataset = fields.String(allow_none=True)
    source = fields.String(allow_none=True)
    job = fields.String(allow_none=True)


class LineageDownstreamOut(Schema):
    dataset = fields.String()
    job = fields.String(allow_none=True)


class LineageNeighborsOut(Schema):
    upstream = fields.List(fields.Nested(LineageUpstreamOut))
    downstream = fields.List(fields.Nested(LineageDownstreamOut))


class DatasetOut(DatasetSummaryOut):
    columns = fields.List(fields.Nested(DatasetColumnOut), data_key="schema", allow_none=True)
    schema_fingerprint = fields.String(allow_none=True)
    unique_key = fields.List(fields.String())
    latest_version = fields.Integer()
    producer_job = fields.String(allow_none=True)
    created_at = fields.DateTime()
    versions = fields.List(fields.Nested(DatasetVersionOut), metadata={"description": "Newest first"})
    partitions = fields.List(fields.Nested(DatasetPartitionOut))
    lineage = fields.Nested(LineageNeighborsOut)


class DatasetRollbackIn(Schema):
    version = fields.Integer(required=True, strict=True, validate=validate.Range(1, INT32_MAX))


class DatasetRedactIn(Schema):
    key = fields.Dict(required=True, metadata={"description": "The unique-key columns and their values, exactly"})


class DatasetRedactOut(Schema):
    deleted = fields.Integer()


class DatasetGrantIn(Schema):
    dataset = fields.String(required=True, validate=validate.Length(1, NAME_MAX))
    org = fields.String(required=True, validate=validate.Length(1, ORG_NAME_MAX),
                        metadata={"description": "The name of the org to share with"})


class DatasetGrantOut(Schema):
    dataset = fields.String()
    org = fields.String()
    created_at = fields.DateTime()


class PiiGrantIn(Schema):
    email = fields.String(required=True, validate=validate.Length(1, EMAIL_MAX))


class PiiGrantOut(Schema):
    dataset = fields.String()
    email = fields.String()
    created_at = fields.DateTime()


class LineageQuery(Schema):
    asset = fields.String(load_default=None, validate=validate.Length(1, NAME_MAX),
                          metadata={"description": "A dataset name; none: the org's whole graph"})


class LineageOut(Schema):
    asset = fields.String(allow_none=True)
    nodes = fields.List(fields.Dict())
    edges = fields.List(fields.Dict())
    truncated = fields.Boolean()


def _catalog_out(entry: datasets.CatalogEntry) -> dict[str, Any]:
    dataset = entry.dataset
    return {"name": entry.name, "owner": entry.owner, "kind": dataset.kind, "pii": dataset.pii,
            "description": dataset.description, "current_version": dataset.current_version, "rows": entry.rows,
            "updated_at": dataset.updated_at}


def _detail(org_id: Any, name: str) -> dict[str, Any]:
    dataset = datasets.find_visible(org_id, name)
    versions = datasets.versions_of(dataset)
    own = dataset.org_id == org_id
    # A grantee reads the data, not the owner's runs: attempts and inputs stay the owner's.
    inputs = lineage.inputs_by_version(dataset) if own else {}
    owner_org = db.session.get(Org, dataset.org_id)
    owner = None if own or owner_org is None else owner_org.name
    current_rows = next((v.rows for v in versions if v.version == dataset.current_version), None)
    producer = db.session.get(Job, dataset.producer_job_id) if dataset.producer_job_id else None
    return {
        "name": name, "owner": owner, "kind": dataset.kind, "pii": dataset.pii, "description": dataset.description,
        "current_version": dataset.current_version, "latest_version": dataset.latest_version, "rows": current_rows,
        "columns": dataset.schema, "schema_fingerprint": dataset.schema_fingerprint,
        "unique_key": list(dataset.unique_key),
        "producer_job": producer.name if producer is not None and own else None,
        "created_at": dataset.created_at, "updated_at": dataset.updated_at,
        "versions": [{"version": v.version, "current": v.version == dataset.current_version,
                      "created_at": v.created_at, "rows": v.rows, "bytes": v.bytes, "files": len(v.manifest["files"]),
                      "schema_fingerprint": v.schema_fingerprint, "partition_key": v.partition_key,
                      "metadata": v.meta, "attempt_id": v.attempt_id if own else None,
                      "task_id": v.task_id if own else None, "run_id": v.run_id if own else None,
                      "inputs": inputs.get(v.version, [])} for v in versions],
        "partitions": datasets.partitions_of(dataset),
        "lineage": lineage.neighbors(org_id, dataset),
    }


@blp.route("/datasets")
@blp.arguments(DatasetSearchQuery, location="query")
@blp.response(200, DatasetSummaryOut(many=True))
def list_datasets(query: dict[str, Any]) -> ResponseReturnValue:
    """The catalog: the org's datasets and those granted to it, by name."""
    principal = current()
    return [_catalog_out(entry) for entry in datasets.search_datasets(principal.org_id, query["search"])]


@blp.route("/datasets/<name>")
@blp.response(200, DatasetOut)
def get_dataset(name: str) -> ResponseReturnValue:
    """Schema, unique key, versions (newest first, with manifest summary, metadata, attempt and
    inputs), partitions, and direct upstream and downstream lineage."""
    principal = current()
    return _detail(principal.org_id, name)


@blp.route("/datasets/<name>/rollback", methods=["POST"])
@blp.arguments(DatasetRollbackIn)
@blp.response(200, DatasetOut)
def rollback(body: dict[str, Any], name: str) -> ResponseReturnValue:
    """Make an earlier (or later) version current again. Nothing is deleted: every version
    stays listed and a later rollback can return to it. 400 ``unknown_version``."""
    principal = current(Role.writer)
    before = datasets.get_dataset(principal.org_id, name).current_version
    dataset = datasets.rollback(principal.org_id, name, body["version"])
    audit.record(org_id=principal.org_id, actor_id=principal.user_id, action="dataset.rollback",
                 object_type="dataset", object_id=dataset.id, name=name, from_version=before,
                 to_version=body["version"])
    db.session.commit()
    return _detail(principal.org_id, name)


@blp.route("/datasets/<name>/rows", methods=["DELETE"])
@blp.arguments(DatasetRedactIn)
@blp.response(200, DatasetRedactOut)
def redact(body: dict[str, Any], name: str) -> ResponseReturnValue:
    """Redaction: delete the rows of a buffered dataset whose unique key is ``key``. 400
    ``invalid_key_filter`` unless ``key`` names exactly the unique-key columns; 409
    ``not_redactable`` for Parquet (raw, derived) datasets. Audited."""
    principal = current(Role.admin)
    deleted = dataset_admin.redact_rows(principal.org_id, name, body["key"], actor=principal.user_id)
    db.session.commit()
    return {"deleted": deleted}


@blp.route("/datasets/<name>/pii-grants", methods=["POST"])
@blp.arguments(PiiGrantIn)
@blp.response(201, PiiGrantOut, description="A new grant")
@blp.alt_response(200, schema=PiiGrantOut, description="The user already had the grant")
def grant_pii(body: dict[str, Any], name: str) -> ResponseReturnValue:
    """Let one user (a member of this org or of an org the dataset is granted to) read a PII
    dataset. 404 for an unknown user. Audited."""
    principal = current(Role.admin)
    grant = dataset_admin.grant_pii(principal.org_id, name, body["email"], granted_by=principal.user_id)
    audit.record(org_id=principal.org_id, actor_id=principal.user_id, action="dataset.pii_grant",
                 object_type="dataset", object_id=grant.dataset_id, name=name, user_id=str(grant.user_id),
                 new=grant.is_new)
    db.session.commit()
    return {"dataset": name, "email": body["email"], "created_at": grant.created_at}, 201 if grant.is_new else 200


@blp.route("/grants", methods=["POST"])
@blp.arguments(DatasetGrantIn)
@blp.response(201, DatasetGrantOut, description="A new grant")
@blp.alt_response(200, schema=DatasetGrantOut, description="The org already had the grant")
def grant_dataset(body: dict[str, Any]) -> ResponseReturnValue:
    """Share one of this org's datasets with another org (by name), which then reads it as
    ``<this org>__<dataset>``. 404 for an unknown dataset or org. Audited."""
    principal = current(Role.admin)
    grant = dataset_admin.grant_dataset(principal.org_id, body["dataset"], body["org"], granted_by=principal.user_id)
    audit.record(org_id=principal.org_id, actor_id=principal.user_id, action="dataset.grant", object_type="dataset",
                 object_id=grant.dataset_id, name=body["dataset"], grantee_org=body["org"],
                 grantee_org_id=str(grant.grantee_org_id), new=grant.is_new)
    db.session.commit()
    return {"dataset": body["dataset"], "org": body["org"], "created_at": grant.created_at}, \
        201 if grant.is_new else 200


@blp.route("/lineage")
@blp.arguments(LineageQuery, location="query")
@blp.response(200, LineageOut)
def lineage_graph(query: dict[str, Any]) -> ResponseReturnValue:
    """The lineage graph (datasets, jobs, platform sources; edges the way data flows), upstream
    and downstream of ``asset``, transitively; the org's whole graph without ``asset``."""
    principal = current()
    return lineage.lineage_graph(principal.org_id, query["asset"])
