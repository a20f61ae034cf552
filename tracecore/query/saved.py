"""The Query Service's stateful half: saved queries, downloads, PII audit, and the two entry points.

``tracecore.query.engine`` is the engine (pure: SQL, views and a store in, rows or a file out). This
module is what surrounds it on behalf of a caller, once for both callers so they cannot drift:

- who may read what: a user reads ``datasets.views_for_user`` (own and granted datasets at
  their current versions, PII only with a grant); a task reads ``datasets.views_for_capability``
  (exactly its token's inputs at their pinned versions);
- the limits, from settings (``TRACE_QUERY_*``);
- exports: a ``csv``/``parquet`` request, or a JSON answer over ``query_export_threshold`` rows,
  becomes a file in the store and a ``Download`` row (org-scoped; ``GET /v1/downloads/{id}``);
- the PII audit: every successful query that read a ``pii`` dataset writes one ``audit_log`` row
  per such dataset (``dataset.read_pii``: who, dataset, SHA-256 of the SQL, rows returned), in
  the transaction that records the download, if any.

It registers ``POST /v1/task/query`` with the task API (listed in ``task_api.ROUTE_MODULES``),
so the worker's gateway and the public ``/v1/task/`` blueprint answer it identically.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    ForeignKey,
    Index,
    String,
    Text,
    UniqueConstraint,
    Uuid,
    or_,
    select,
)
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Mapped, mapped_column

from tracecore.data.datasets import views_for_capability, views_for_user
from tracecore.db.engine import Base, created_at, db, libpq_url, uuid_pk
from tracecore.exceptions import Conflict, NotFound, ValidationError
from tracecore.execution.tokens import Capability
from tracecore.infra.storage import ObjectStore, object_store
from tracecore.query import engine as query
from tracecore.query.policy import MAX_SQL_CHARS
from tracecore.settings import Settings, current_settings
from tracecore.taskapi.calls import register
from tracecore.tenancy import audit

FORMATS = ("json", "csv", "parquet")
MEDIA_TYPES = {"parquet": "application/vnd.apache.parquet", "csv": "text/csv; charset=utf-8"}
MAX_NAME = 128


class SavedQuery(Base):
    """A named SQL text: private to its owner, or shared with the owner's org."""

    __tablename__ = "saved_queries"
    __table_args__ = (UniqueConstraint("org_id", "owner_id", "name"), Index("ix_saved_queries_org_shared", "org_id",
                                                                            "shared"))
    id: Mapped[uuid.UUID] = uuid_pk()
    org_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("orgs.id", ondelete="CASCADE"), nullable=False)
    owner_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("users.id", ondelete="CASCADE"), nullable=False)
    name: Mapped[str] = mapped_column(String(MAX_NAME), nullable=False)
    sql: Mapped[str] = mapped_column(Text, nullable=False)
    shared: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    created_at: Mapped[datetime] = created_at()


class Download(Base):
    """An exported query result in the object store; readable by its org only (another org's is 404)."""

    __tablename__ = "downloads"
    __table_args__ = (CheckConstraint("format IN ('parquet', 'csv')", name="format"),
                      Index("ix_downloads_org_created", "org_id", "created_at"))
    id: Mapped[uuid.UUID] = uuid_pk()
    org_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("orgs.id", ondelete="CASCADE"), nullable=False)
    created_by: Mapped[uuid.UUID | None] = mapped_column(Uuid, ForeignKey("users.id", ondelete="SET NULL"))
    task_id: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    key: Mapped[str] = mapped_column(String(1024), nullable=False)
    format: Mapped[str] = mapped_column(String(16), nullable=False)
    row_count: Mapped[int] = mapped_column(BigInteger, nullable=False)
    bytes: Mapped[int] = mapped_column(BigInteger, nullable=False)
    truncated: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    sql_sha256: Mapped[str] = mapped_column(String(64), nullable=False)
    created_at: Mapped[datetime] = created_at()


# -- running a query for a caller --------------------------------------------------


def sql_sha256(sql: str) -> str:
    return hashlib.sha256(sql.encode()).hexdigest()


def _engine_options(settings: Settings) -> dict[str, Any]:
    return {"timeout_s": settings.query_timeout, "memory_limit": settings.query_memory_limit,
            "threads": settings.query_threads, "pg_conninfo": libpq_url(settings.database_url or "")}


def parse_request(body: dict[str, Any]) -> tuple[str, int | None, str]:
    """(sql, limit, format) of a query body; the task API has no schema layer, so it is checked here."""
    sql, limit, fmt = body.get("sql"), body.get("limit"), body.get("format") or "json"
    if not isinstance(sql, str) or not sql.strip():
        raise ValidationError("sql must be a non-empty string", path="sql")
    if len(sql) > MAX_SQL_CHARS:
        raise ValidationError(f"sql is longer than {MAX_SQL_CHARS} characters", path="sql")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValidationError("limit must be a positive integer", path="limit")
    if fmt not in FORMATS:
        raise ValidationError(f"format must be one of {', '.join(FORMATS)}", path="format")
    return sql, limit, fmt


def answer(sql: str, views: Sequence[query.DatasetViewLike], *, limit: int | None, fmt: str, org_id: uuid.UUID,
           user_id: uuid.UUID | None, settings: Settings, store: ObjectStore, export_prefix: str,
           spill: bool, audit_details: dict[str, Any]) -> tuple[dict[str, Any], query.QueryResult]:
    """Run the query for one caller: its JSON body and the result; commits the download and audit rows.

    ``spill``: a JSON result over ``query_export_threshold`` rows or ``query_max_result_bytes``
    is exported (users). Without it the rows are cut at the threshold and the answer says
    ``truncated`` (tasks, whose SDK reads ``rows``), and rows past the byte cap are 422
    ``query_result_too_large``. Every export stops at ``query_max_export_bytes`` (422, nothing
    stored). ``export_prefix`` is where exports go (``exports/<org>/`` for users, the
    task's scratch prefix for tasks, which the credential broker lets the sandbox read).
    """
    cap = min(limit or settings.query_row_limit, settings.query_row_limit)
    threshold = settings.query_export_threshold
    download_id = uuid.uuid4()
    options = _engine_options(settings)
    inline_bytes, export_bytes = settings.query_max_result_bytes, settings.query_max_export_bytes
    if fmt == "json" and not spill:
        result = query.run_query(sql, views, store=store, limit=min(cap, threshold), max_bytes=inline_bytes,
                                 **options)
    elif fmt == "json":
        result = query.run_query(sql, views, store=store, limit=cap, export_over=threshold,
                                 export_key=f"{export_prefix}{download_id}.parquet", max_bytes=inline_bytes,
                                 export_max_bytes=export_bytes, **options)
    else:
        result = query.export_query(sql, views, store=store, key=f"{export_prefix}{download_id}.{fmt}", fmt=fmt,
                                    limit=cap, max_bytes=export_bytes, **options)
    digest = sql_sha256(sql)
    body = result.to_json()
    if result.export is not None:
        task_id = audit_details.get("task_id")
        db.session.add(Download(id=download_id, org_id=org_id, created_by=user_id,
                                task_id=uuid.UUID(task_id) if task_id else None, key=result.export.key,
                                format=result.export.format, row_count=result.row_count, bytes=result.export.bytes,
                                truncated=result.truncated, sql_sha256=digest))
        del body["rows"]
        body.update(download=f"/v1/downloads/{download_id}", format=result.export.format, bytes=result.export.bytes)
    audit_pii(result, org_id=org_id, actor_id=user_id, sql_digest=digest, **audit_details)
    db.session.commit()
    return body, result


def audit_pii(result: query.QueryResult, *, org_id: uuid.UUID, actor_id: uuid.UUID | None, sql_digest: str,
              **details: Any) -> None:
    """One ``dataset.read_pii`` audit row per PII dataset the query read (not yet committed)."""
    for view in result.views:
        if view.pii:
            audit.record(org_id=org_id, actor_id=actor_id, action="dataset.read_pii", object_type="dataset",
                         object_id=view.dataset_id, dataset=view.name, owner_org_id=str(view.org_id),
                         version=view.version, sql_sha256=sql_digest, rows=result.row_count,
                         download=result.export is not None, **details)


def user_views(org_id: uuid.UUID, user_id: uuid.UUID) -> list[query.DatasetViewLike]:
    """What a user may query: the datasets contract."""
    return list(views_for_user(org_id, user_id))


def task_views(capability: Capability) -> list[query.DatasetViewLike]:
    """Exactly the token's pinned inputs."""
    return list(views_for_capability(capability))


def user_query(org_id: uuid.UUID, user_id: uuid.UUID, body: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """``POST /v1/query`` for a user of ``org_id``."""
    sql, limit, fmt = parse_request(body)
    views = user_views(org_id, user_id)
    db.session.rollback()  # no transaction (and no row lock) held while DuckDB runs
    answered, _ = answer(sql, views, limit=limit, fmt=fmt, org_id=org_id, user_id=user_id, settings=settings,
                         store=object_store(settings), export_prefix=f"exports/{org_id}/", spill=True,
                         audit_details={"via": "api"})
    return answered


@register("POST", "/v1/task/query")
def task_query(capability: Capability, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """``POST /v1/task/query``: the token's inputs at their pinned versions, the same engine and audit."""
    settings = current_settings()
    sql, limit, fmt = parse_request(body)
    views = task_views(capability)
    db.session.rollback()
    scratch = capability.scratch_prefix or f"scratch/{capability.org_id}/{capability.task_id}/"
    answered, result = answer(sql, views, limit=limit, fmt=fmt, org_id=uuid.UUID(capability.org_id), user_id=None,
                              settings=settings, store=object_store(settings), export_prefix=f"{scratch}exports/",
                              spill=False, audit_details={"via": "task", "task_id": capability.task_id,
                                                          "attempt": capability.attempt, "job": capability.job})
    if result.export is not None:
        answered["key"] = result.export.key  # under the scratch prefix: the sandbox may fetch it
    return 200, answered


# -- saved queries -----------------------------------------------------------------


def save_query(org_id: uuid.UUID, owner_id: uuid.UUID, name: str, sql: str, shared: bool) -> SavedQuery:
    """Store a named query. The SQL must be one SELECT (checked now, without data: 400 ``not_select``);
    whether its tables exist is decided when it runs, as the caller's datasets may change."""
    if not isinstance(name, str) or not name.strip() or len(name) > MAX_NAME:
        raise ValidationError(f"name must be 1 to {MAX_NAME} characters", path="name")
    if not isinstance(sql, str) or not sql.strip() or len(sql) > MAX_SQL_CHARS:
        raise ValidationError(f"sql must be 1 to {MAX_SQL_CHARS} characters", path="sql")
    query.check_statement(sql)
    saved_id = db.session.scalar(insert(SavedQuery).values(id=uuid.uuid4(), org_id=org_id, owner_id=owner_id,
                                                           name=name.strip(), sql=sql, shared=bool(shared))
                                 .on_conflict_do_nothing(index_elements=["org_id", "owner_id", "name"])
                                 .returning(SavedQuery.id))
    if saved_id is None:
        raise Conflict(f"you have a saved query named {name.strip()!r}", code="saved_query_exists")
    saved = db.session.get(SavedQuery, saved_id)
    assert saved is not None
    return saved


def list_saved(org_id: uuid.UUID, user_id: uuid.UUID) -> list[SavedQuery]:
    """The caller's own saved queries and those shared in the org, newest first."""
    return list(db.session.scalars(select(SavedQuery).where(
        SavedQuery.org_id == org_id, or_(SavedQuery.owner_id == user_id, SavedQuery.shared.is_(True)))
        .order_by(SavedQuery.created_at.desc(), SavedQuery.name)))


# -- downloads ---------------------------------------------------------------------


def get_download(org_id: uuid.UUID, download_id: str) -> Download:
    """The org's download; another org's, or a malformed id, is NotFound (no existence leak)."""
    try:
        wanted = uuid.UUID(str(download_id))
    except ValueError:
        raise NotFound(f"no download {download_id!r}") from None
    found = db.session.scalar(select(Download).where(Download.id == wanted, Download.org_id == org_id))
    if found is None:
        raise NotFound(f"no download {download_id!r}")
    return found
