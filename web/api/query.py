"""The Query Service for users: POST /v1/query, saved queries, downloads of exported results.

``POST /v1/query`` runs one SELECT over the datasets the caller may read (own, granted, PII
only with a grant) at their current versions; the engine and its refusals are
``tracecore.query.engine``. ``format`` json answers the rows inline, up to the export threshold; a
larger result, or ``format`` csv / parquet, is written to the object store and answered with
``{"download": "/v1/downloads/<id>"}``, which streams the file to a member of the same org
(another org's download is 404). Sandboxes use ``POST /v1/task/query`` instead (the task API).
"""

from __future__ import annotations

from collections.abc import Iterator

from flask import Response, stream_with_context
from flask.typing import ResponseReturnValue
from marshmallow import Schema, fields, validate

from tracecore.db.engine import db
from tracecore.infra.storage import object_store
from tracecore.query import saved as saved_queries
from tracecore.query.policy import MAX_SQL_CHARS
from tracecore.settings import current_settings

from ..auth import current
from . import INT32_MAX, Blueprint

blp = Blueprint("query", __name__, url_prefix="/v1",
                description="The Query Service: read-only SQL over datasets, saved queries, downloads")

_ERROR = {"description": "`{\"error\": {\"code\", \"message\", \"details\"}}`"}
_CHUNK = 256 * 1024


class QueryIn(Schema):
    sql = fields.String(required=True, validate=validate.Length(1, MAX_SQL_CHARS),
                        metadata={"description": "Exactly one SELECT; datasets are tables named as in the catalog"})
    limit = fields.Integer(load_default=None, validate=validate.Range(1, INT32_MAX),
                           metadata={"description": "Most rows to answer (capped by TRACE_QUERY_ROW_LIMIT)"})
    format = fields.String(load_default="json", validate=validate.OneOf(saved_queries.FORMATS),
                           metadata={"description": "json: rows inline (a large result becomes a download); "
                                                    "csv or parquet: always a download"})


class ColumnOut(Schema):
    name = fields.String()
    type = fields.String(metadata={"description": "DuckDB type, e.g. BIGINT, VARCHAR, TIMESTAMP WITH TIME ZONE"})


class QueryOut(Schema):
    columns = fields.List(fields.Nested(ColumnOut))
    rows = fields.List(fields.Dict(), metadata={"description": "Rows as objects keyed by column name (json, inline)"})
    row_count = fields.Integer()
    truncated = fields.Boolean(metadata={"description": "More rows existed than the limit let through"})
    elapsed_ms = fields.Float()
    download = fields.String(metadata={"description": "Where to fetch an exported result: /v1/downloads/<id>"})
    format = fields.String(metadata={"description": "Format of the download: parquet or csv"})
    bytes = fields.Integer(metadata={"description": "Size of the download"})


class SavedQueryIn(Schema):
    name = fields.String(required=True, validate=validate.Length(1, saved_queries.MAX_NAME))
    sql = fields.String(required=True, validate=validate.Length(1, MAX_SQL_CHARS))
    shared = fields.Boolean(load_default=False, metadata={"description": "Visible to every member of the org"})


class SavedQueryOut(Schema):
    id = fields.UUID()
    name = fields.String()
    sql = fields.String()
    shared = fields.Boolean()
    owner_id = fields.UUID()
    created_at = fields.DateTime()


@blp.route("/query", methods=["POST"])
@blp.arguments(QueryIn)
@blp.response(200, QueryOut, description="Rows inline, or a download of the exported result")
@blp.doc(responses={"400": _ERROR, "403": _ERROR, "408": _ERROR, "422": _ERROR})
def run_query(body: dict) -> ResponseReturnValue:
    """Run one SELECT. Refusals: 400 ``not_select`` (not exactly one SELECT), 403
    ``forbidden_function`` (file-reading table functions, paths), 400 ``query_error`` (DuckDB's
    message: syntax, unknown table or column), 408 ``query_timeout``, 422 ``query_resource_limit``.
    Reading a PII dataset is audited (``dataset.read_pii``)."""
    principal = current()
    return saved_queries.user_query(principal.org_id, principal.user_id, body, current_settings())


@blp.route("/saved-queries", methods=["POST"])
@blp.arguments(SavedQueryIn)
@blp.response(201, SavedQueryOut)
@blp.doc(responses={"400": _ERROR, "409": _ERROR})
def save_query(body: dict) -> saved_queries.SavedQuery:
    """Save a query, private to the caller or ``shared`` with the org. The SQL must be one
    SELECT (400 ``not_select``); a name already used by the caller is 409 ``saved_query_exists``."""
    principal = current()
    saved = saved_queries.save_query(principal.org_id, principal.user_id, body["name"], body["sql"], body["shared"])
    db.session.commit()
    return saved


@blp.route("/saved-queries")
@blp.response(200, SavedQueryOut(many=True))
def list_saved_queries() -> ResponseReturnValue:
    """The caller's saved queries and those shared in the org, newest first."""
    principal = current()
    return saved_queries.list_saved(principal.org_id, principal.user_id)


@blp.route("/downloads/<download_id>")
@blp.doc(responses={"200": {"description": "The exported result", "content": {
    media: {"schema": {"type": "string", "format": "binary"}} for media in saved_queries.MEDIA_TYPES.values()}},
    "404": _ERROR})
def get_download(download_id: str) -> ResponseReturnValue:
    """Stream an exported result (Parquet or CSV). Another org's download is 404."""
    principal = current()
    download = saved_queries.get_download(principal.org_id, download_id)
    name, media, size = f"{download.id}.{download.format}", saved_queries.MEDIA_TYPES[download.format], download.bytes
    handle = object_store(current_settings()).open_read(download.key)
    db.session.rollback()  # nothing held open while the file streams

    def chunks() -> Iterator[bytes]:
        with handle:
            while chunk := handle.read(_CHUNK):
                yield chunk

    return Response(stream_with_context(chunks()), content_type=media,
                    headers={"Content-Disposition": f'attachment; filename="{name}"', "Content-Length": str(size),
                             "Cache-Control": "no-store"})
