"""Datasets: named, versioned assets with a schema, a manifest per version, partitions, grants.

Kinds (seed 003, "Versioning and rollback"):

- ``raw`` and ``derived`` datasets are Parquet files in the object store. A version's manifest
  is a full snapshot (every file the version consists of, with SHA-256 and row counts), so a
  reader needs only the current version, and a rollback is moving one pointer: nothing is
  ever deleted. ``add_version(mode="append")`` carries the previous files over, ``"replace"``
  does not; with a partition key, ``replace`` replaces that partition's files only.
- ``buffered`` datasets (``alert_events``) are PostgreSQL tables, one per dataset
  (``hot_table_name``), with the schema's columns plus ``org_id``, ``_version`` (the version
  whose publish inserted the row) and ``_inserted_at``. Their versions' manifests list the
  batch artifacts published (provenance), not the data: rows visible at version ``v`` are the
  hot rows with ``_version <= v``. A publisher calls ``add_version`` first and inserts its rows
  with ``_version = version.version`` in the same transaction. They are the redactable kind
  (PII): ``tracecore.data.admin.redact_rows``.

Derived Parquet datasets are not redactable here (409 ``not_redactable``): their files are
content-addressed, SHA-256-pinned artifacts, and rewriting them would break every manifest
that names them. Personal data belongs in a buffered dataset; a derived dataset is cleaned
by re-running its job, which writes a new version.

Platform datasets (kind ``chain``: a registered chain's ``<chain>_blocks``, ``_transactions``,
``_logs``) belong to the platform org (``PLATFORM_ORG_ID``, made by the migrations) and every org
may read them under their own names; an org's own dataset of the same name wins. Their views
come from the room that owns their data (``register_view_source``: ``tracecore.chain.datasets``).

Cross-org sharing is a ``DatasetGrant`` (the whole dataset, to an org; made by
``tracecore.data.admin``); a granted dataset is named ``<owner org name>__<dataset name>``
by the org it is granted to. PII datasets are visible to a user only with a ``PiiGrant`` for
that user.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    Uuid,
    and_,
    func,
    or_,
    select,
    text,
    tuple_,
    update,
)
from sqlalchemy.dialects.postgresql import JSONB, insert
from sqlalchemy.orm import Mapped, mapped_column

from tracecore.data import sql
from tracecore.data.schema import (
    DATASET_NAME_RE,
    KINDS,
    check_manifest,
    normalize_schema,
    parse_partition_key,
    pg_column_type,
    schema_change_problem,
)
from tracecore.data.schema import schema_fingerprint as fingerprint_of
from tracecore.db.engine import Base, created_at, db, uuid_pk
from tracecore.exceptions import NotFound, PermissionDenied, ValidationError
from tracecore.tenancy.orgs import Org

PARTITION_KINDS = ("block_range", "date")
PLATFORM_ORG_ID = uuid.UUID("00000000-0000-0000-0000-000000000001")  # owns platform datasets (migration 0012)
PLATFORM_KINDS = ("chain",)
UPDATE_MODES = ("append", "replace")
GRANT_SEPARATOR = "__"


class Dataset(Base):
    __tablename__ = "datasets"
    __table_args__ = (
        UniqueConstraint("org_id", "name"),
        CheckConstraint("kind IN ('raw', 'derived', 'buffered', 'chain')", name="kind"),
        CheckConstraint("latest_version >= 0", name="latest_version"),
        CheckConstraint("current_version IS NULL OR (current_version >= 1 AND current_version <= latest_version)",
                        name="current_version"),
        Index("ix_datasets_producer_job_id", "producer_job_id"),
    )
    id: Mapped[uuid.UUID] = uuid_pk()
    org_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("orgs.id", ondelete="CASCADE"), nullable=False)
    name: Mapped[str] = mapped_column(String(128), nullable=False)
    kind: Mapped[str] = mapped_column(String(16), nullable=False)
    # Normalized columns (dataset_schema); None until declared: a schema is optional until the first publish.
    schema: Mapped[list[dict[str, Any]] | None] = mapped_column(JSONB)
    schema_fingerprint: Mapped[str | None] = mapped_column(String(64))
    unique_key: Mapped[list[str]] = mapped_column(JSONB, nullable=False, default=list)
    pii: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    # The version readers see; moves back on rollback. latest_version only grows: the next
    # version number is latest_version + 1 even after a rollback, so versions never collide.
    current_version: Mapped[int | None] = mapped_column(Integer)
    latest_version: Mapped[int] = mapped_column(Integer, nullable=False, default=0, server_default=text("0"))
    producer_job_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, ForeignKey("jobs.id", ondelete="SET NULL"))
    description: Mapped[str] = mapped_column(Text, nullable=False, default="")
    created_at: Mapped[datetime] = created_at()
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, server_default=func.now())


class DatasetVersion(Base):
    __tablename__ = "dataset_versions"
    __table_args__ = (
        UniqueConstraint("dataset_id", "version"),
        CheckConstraint("version >= 1", name="version"),
        CheckConstraint("rows >= 0 AND bytes >= 0", name="sizes"),
        Index("ix_dataset_versions_dataset_created", "dataset_id", "created_at"),  # data triggers' scans
    )
    id: Mapped[uuid.UUID] = uuid_pk()
    dataset_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("datasets.id", ondelete="CASCADE"), nullable=False)
    org_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("orgs.id", ondelete="CASCADE"), nullable=False)
    version: Mapped[int] = mapped_column(Integer, nullable=False)
    # {"files": [{"key", "sha256", "rows", "bytes", "partition"?}], "rows", "bytes"}
    manifest: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)
    rows: Mapped[int] = mapped_column(BigInteger, nullable=False)
    bytes: Mapped[int] = mapped_column(BigInteger, nullable=False)
    schema_fingerprint: Mapped[str | None] = mapped_column(String(64))
    attempt_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, ForeignKey("attempts.id", ondelete="SET NULL"))
    task_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, ForeignKey("tasks.id", ondelete="SET NULL"))
    run_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, ForeignKey("runs.id", ondelete="SET NULL"))
    partition_key: Mapped[str | None] = mapped_column(String(256))
    # Materialization metadata: rows, bytes, duration_ms and the UDF's custom entries.
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", JSONB, nullable=False, default=dict)
    created_at: Mapped[datetime] = created_at()


class Partition(Base):
    __tablename__ = "partitions"
    __table_args__ = (
        UniqueConstraint("dataset_id", "key"),
        CheckConstraint("kind IN ('block_range', 'date')", name="kind"),
    )
    id: Mapped[uuid.UUID] = uuid_pk()
    dataset_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("datasets.id", ondelete="CASCADE"), nullable=False)
    org_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("orgs.id", ondelete="CASCADE"), nullable=False)
    key: Mapped[str] = mapped_column(String(256), nullable=False)
    kind: Mapped[str] = mapped_column(String(16), nullable=False)
    range_start: Mapped[str] = mapped_column(String(64), nullable=False)
    range_end: Mapped[str] = mapped_column(String(64), nullable=False)
    latest_version: Mapped[int] = mapped_column(Integer, nullable=False)
    rows: Mapped[int] = mapped_column(BigInteger, nullable=False)
    created_at: Mapped[datetime] = created_at()
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, server_default=func.now())


class DatasetGrant(Base):
    """The owning org (``org_id``) lets ``grantee_org_id`` read the whole dataset."""

    __tablename__ = "dataset_grants"
    __table_args__ = (UniqueConstraint("dataset_id", "grantee_org_id"),)
    id: Mapped[uuid.UUID] = uuid_pk()
    dataset_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("datasets.id", ondelete="CASCADE"), nullable=False)
    org_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("orgs.id", ondelete="CASCADE"), nullable=False)
    grantee_org_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("orgs.id", ondelete="CASCADE"),
                                                      nullable=False)
    granted_by: Mapped[uuid.UUID | None] = mapped_column(Uuid, ForeignKey("users.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = created_at()

    is_new = False  # not a column: True when grant_dataset inserted the row


class PiiGrant(Base):
    """One user may read one PII dataset (of ``org_id``, or granted to the user's org)."""

    __tablename__ = "pii_grants"
    __table_args__ = (UniqueConstraint("dataset_id", "user_id"),)
    id: Mapped[uuid.UUID] = uuid_pk()
    dataset_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("datasets.id", ondelete="CASCADE"), nullable=False)
    org_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("orgs.id", ondelete="CASCADE"), nullable=False)
    user_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("users.id", ondelete="CASCADE"), nullable=False)
    granted_by: Mapped[uuid.UUID | None] = mapped_column(Uuid, ForeignKey("users.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = created_at()

    is_new = False  # not a column: True when grant_pii inserted the row


@dataclass(frozen=True)
class DatasetView:
    """What the Query Service may read of one dataset (the visibility contract).

    ``parquet_keys`` are the files of ``version`` (cold); ``hot_table`` holds a buffered
    dataset's rows: read those with ``org_id = view.org_id AND _version <= view.version``
    (none when ``version`` is None). Columns match by name.
    """

    dataset_id: uuid.UUID
    org_id: uuid.UUID
    name: str
    version: int | None
    parquet_keys: tuple[str, ...]
    hot_table: str | None
    columns: tuple[tuple[str, str], ...]
    pii: bool
    # Rows read from PostgreSQL as they are (SQL text, parameters), for platform datasets whose
    # hot rows are not a buffered dataset's table (chain data above its cold boundary).
    hot_sql: tuple[str, tuple[Any, ...]] | None = None


ViewSource = Callable[[str, "Dataset"], DatasetView]
_VIEW_SOURCES: dict[str, ViewSource] = {}


def register_view_source(kind: str, source: ViewSource) -> None:
    """The room that owns a platform kind's data tells the Query Service how to read it."""
    _VIEW_SOURCES[kind] = source


def platform_datasets() -> dict[str, Dataset]:
    """The datasets every org may read, by name."""
    return {dataset.name: dataset for dataset in db.session.scalars(
        select(Dataset).where(Dataset.org_id == PLATFORM_ORG_ID, Dataset.kind.in_(PLATFORM_KINDS)))}


@dataclass(frozen=True)
class CatalogEntry:
    """One row of the catalog: a dataset under the name the searching org uses for it."""

    dataset: Dataset
    name: str
    owner: str | None  # the owning org's name for a granted dataset; None for the org's own
    rows: int | None  # rows of the current version


# -- declaring -------------------------------------------------------------------


def _check_name(name: str, path: str = "name") -> None:
    if not isinstance(name, str) or not DATASET_NAME_RE.fullmatch(name):
        raise ValidationError(f"dataset name {name!r} must match ^[a-z][a-z0-9_-]{{0,127}}$", path=path)


def declare_dataset(org_id: uuid.UUID, name: str, kind: str, schema: Sequence[Mapping[str, Any]] | None,
                    unique_key: Sequence[str] = (), pii: bool = False, producer_job_id: uuid.UUID | None = None,
                    *, description: str = "") -> Dataset:
    """Create the dataset, or bring an existing one in line with this declaration.

    Changes are free until the first version. After it, the kind is fixed, a buffered
    dataset's unique key is fixed (it is the hot table's constraint), and the schema may
    only change compatibly (``dataset_schema.schema_change_problem``); otherwise
    ValidationError ``schema_conflict``. ``schema`` None keeps the declared schema; ``pii``
    is sticky (a declaration never clears it); ``producer_job_id`` None keeps the producer.
    A buffered dataset with a schema gets its hot table here, in the same transaction.
    """
    _check_name(name)
    if kind not in KINDS:
        raise ValidationError(f"kind {kind!r} is not one of {', '.join(KINDS)}", path="kind", code="unknown_kind")
    columns = normalize_schema(list(schema)) if schema is not None else None
    keys = list(unique_key)
    if columns is not None:
        known = {column["name"] for column in columns}
        for index, key in enumerate(keys):
            if key not in known:
                raise ValidationError(f"unique key column {key!r} is not in the schema",
                                      path=f"unique_key[{index}]", code="unknown_column")
    db.session.execute(insert(Dataset).values(id=uuid.uuid4(), org_id=org_id, name=name, kind=kind, unique_key=keys,
                                              pii=pii, description=description, latest_version=0)
                       .on_conflict_do_nothing(index_elements=["org_id", "name"]))
    dataset = db.session.scalar(select(Dataset).where(Dataset.org_id == org_id, Dataset.name == name)
                                .with_for_update().execution_options(populate_existing=True))
    assert dataset is not None  # inserted above, or by an earlier declaration; never deleted here
    published = dataset.latest_version > 0
    if published and kind != dataset.kind:
        raise ValidationError(f"dataset {name!r} has versions as {dataset.kind}; it cannot become {kind}",
                              path="kind", code="schema_conflict")
    if published and kind == "buffered" and keys != list(dataset.unique_key):
        raise ValidationError(f"dataset {name!r} has versions; its unique key {dataset.unique_key} is its hot "
                              "table's constraint and cannot change", path="unique_key", code="schema_conflict")
    if columns is not None and published and dataset.schema is not None:
        problem = schema_change_problem(dataset.schema, columns)
        if problem is not None:
            raise ValidationError(f"dataset {name!r} has versions and {problem}", path="schema",
                                  code="schema_conflict", details={"fingerprint": dataset.schema_fingerprint})
    dataset.kind = kind
    dataset.unique_key = keys
    dataset.pii = dataset.pii or pii
    if description:
        dataset.description = description
    if producer_job_id is not None:
        dataset.producer_job_id = producer_job_id
    if columns is not None and columns != dataset.schema:
        dataset.schema = columns
        dataset.schema_fingerprint = fingerprint_of(columns)
    dataset.updated_at = func.now()
    db.session.flush()
    if dataset.kind == "buffered" and dataset.schema is not None:
        ensure_hot_table(dataset)
    return dataset


# -- hot tables (buffered datasets) ------------------------------------------------


def hot_table_name(dataset: Dataset) -> str:
    """The PostgreSQL table holding a buffered dataset's rows: ``ds_<dataset id hex>``."""
    return f"ds_{dataset.id.hex}"


def ensure_hot_table(dataset: Dataset) -> str:
    """Create (or bring in line) the hot table of a buffered dataset; answers its name.

    Columns: the schema's (Arrow types mapped by ``dataset_schema.pg_type``), then
    ``org_id uuid``, ``_version int`` and ``_inserted_at``; ``UNIQUE (org_id, <unique key>)``
    when the dataset has a unique key, which is what ``INSERT ... ON CONFLICT DO NOTHING``
    deduplicates on. Before the first version the table is empty by construction and is
    simply rebuilt; after it, changes are compatible by ``declare_dataset``'s rules, so they
    are added nullable columns and relaxed NOT NULLs. The table's comment records what it was
    built from, so an unchanged declaration costs one catalog lookup.
    """
    if dataset.kind != "buffered" or dataset.schema is None:
        raise ValidationError(f"dataset {dataset.name!r} is not a buffered dataset with a schema",
                              path="kind", code="not_buffered")
    table = hot_table_name(dataset)
    signature = json.dumps({"schema": dataset.schema_fingerprint, "unique_key": list(dataset.unique_key)})
    row = db.session.execute(sql.HOT_TABLE_STATE, {"t": table}).one()
    if row.present and row.signature == signature:
        return table
    empty = not row.present or db.session.scalar(sql.table_is_empty(table))
    if row.present and empty and dataset.latest_version == 0:
        db.session.execute(sql.drop_table(table))
    if not row.present or (empty and dataset.latest_version == 0):
        _create_hot_table(dataset, table)
    else:
        _evolve_hot_table(dataset, table)
    db.session.execute(sql.comment_on_table(table, signature))
    return table


def _column_ddl(column: Mapping[str, Any]) -> str:
    return sql.column_ddl(column["name"], pg_column_type(column["type"]), nullable=column["nullable"])


def _create_hot_table(dataset: Dataset, table: str) -> None:
    assert dataset.schema is not None
    for statement in sql.create_hot_table(table, [_column_ddl(column) for column in dataset.schema],
                                          dataset.unique_key):
        db.session.execute(statement)


def _evolve_hot_table(dataset: Dataset, table: str) -> None:
    assert dataset.schema is not None
    existing = {row.attname: row.attnotnull for row in db.session.execute(sql.HOT_TABLE_COLUMNS, {"t": table})}
    for column in dataset.schema:
        if column["name"] not in existing:
            db.session.execute(sql.add_column(table, _column_ddl(column)))
        elif column["nullable"] and existing[column["name"]]:
            db.session.execute(sql.drop_not_null(table, column["name"]))


# -- reading ---------------------------------------------------------------------


def get_dataset(org_id: uuid.UUID, name: str) -> Dataset:
    """The org's own dataset named ``name``; NotFound otherwise (another org's looks the same)."""
    dataset = db.session.scalar(select(Dataset).where(Dataset.org_id == org_id, Dataset.name == name))
    if dataset is None:
        raise NotFound(f"no dataset named {name!r}")
    return dataset


def granted_datasets(org_id: uuid.UUID) -> dict[str, Dataset]:
    """Datasets of other orgs granted to ``org_id``, by the name the org uses for them."""
    rows = db.session.execute(select(Dataset, Org.name).join(DatasetGrant, DatasetGrant.dataset_id == Dataset.id)
                              .join(Org, Org.id == Dataset.org_id).where(DatasetGrant.grantee_org_id == org_id))
    return {f"{owner}{GRANT_SEPARATOR}{dataset.name}": dataset for dataset, owner in rows}


def find_visible(org_id: uuid.UUID, name: str) -> Dataset:
    """An own dataset by name, else a granted one by ``<owner org>__<name>``; NotFound otherwise.

    An own name wins over a granted one spelled the same."""
    own = db.session.scalar(select(Dataset).where(Dataset.org_id == org_id, Dataset.name == name))
    if own is not None:
        return own
    platform = db.session.scalar(select(Dataset).where(Dataset.org_id == PLATFORM_ORG_ID, Dataset.name == name,
                                                       Dataset.kind.in_(PLATFORM_KINDS)))
    if platform is not None:
        return platform
    if GRANT_SEPARATOR in name and (granted := granted_datasets(org_id).get(name)) is not None:
        return granted
    raise NotFound(f"no dataset named {name!r}")


def _escape_like(value: str) -> str:
    return value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def search_datasets(org_id: uuid.UUID, query: str | None = None) -> list[CatalogEntry]:
    """The catalog: own datasets and those granted to the org, whose name or description
    contains ``query`` (case-insensitive; everything when empty), by name."""
    owner = Org.name.label("owner")
    stmt = (select(Dataset, owner, DatasetVersion.rows)
            .join(Org, Org.id == Dataset.org_id)
            .outerjoin(DatasetVersion, (DatasetVersion.dataset_id == Dataset.id)
                       & (DatasetVersion.version == Dataset.current_version))
            .where(or_(Dataset.org_id == org_id, Dataset.org_id == PLATFORM_ORG_ID, Dataset.id.in_(
                select(DatasetGrant.dataset_id).where(DatasetGrant.grantee_org_id == org_id)))))
    if query:
        pattern = f"%{_escape_like(query)}%"
        stmt = stmt.where(or_(Dataset.name.ilike(pattern, escape="\\"), Dataset.description.ilike(pattern, escape="\\"),
                              and_(Dataset.org_id != org_id,
                                   (Org.name + GRANT_SEPARATOR + Dataset.name).ilike(pattern, escape="\\"))))
    entries = []
    for dataset, owner_name, rows in db.session.execute(stmt):
        own = dataset.org_id in (org_id, PLATFORM_ORG_ID)
        entries.append(CatalogEntry(dataset, dataset.name if own else f"{owner_name}{GRANT_SEPARATOR}{dataset.name}",
                                    None if own else owner_name, rows))
    return sorted(entries, key=lambda entry: entry.name)


def versions_of(dataset: Dataset) -> list[DatasetVersion]:
    """Every version, newest first (rolled-back ones included: nothing is deleted)."""
    return list(db.session.scalars(select(DatasetVersion).where(DatasetVersion.dataset_id == dataset.id)
                                   .order_by(DatasetVersion.version.desc())))


def partitions_of(dataset: Dataset) -> list[Partition]:
    return list(db.session.scalars(select(Partition).where(Partition.dataset_id == dataset.id)
                                   .order_by(Partition.kind, Partition.key)))


def get_version(dataset: Dataset, version: int) -> DatasetVersion:
    row = db.session.scalar(select(DatasetVersion).where(DatasetVersion.dataset_id == dataset.id,
                                                         DatasetVersion.version == version))
    if row is None:
        raise ValidationError(f"dataset {dataset.name!r} has no version {version}", path="version",
                              code="unknown_version")
    return row


# -- versions --------------------------------------------------------------------


def add_version(dataset: Dataset, manifest: Mapping[str, Any], *, attempt_id: uuid.UUID | None = None,
                task_id: uuid.UUID | None = None, run_id: uuid.UUID | None = None,
                partition_key: str | None = None, metadata: Mapping[str, Any] | None = None,
                mode: str = "replace") -> DatasetVersion:
    """Record a new version made from ``manifest`` (the files this materialization wrote) and
    make it current. Flushes, never commits: call it in the publish's transaction.

    The number comes from one atomic ``UPDATE datasets SET latest_version = latest_version + 1,
    current_version = latest_version + 1 ... RETURNING``: concurrent publishers serialize on the
    dataset's row and never share a number, and after a rollback the next version is still new.
    For raw and derived datasets the stored manifest is the full snapshot (see the module
    docstring; ``mode`` append or replace, per partition when ``partition_key`` is given); for
    buffered ones it is this batch, and ``rows`` counts the rows inserted so far
    (``metadata["inserted"]`` when given, else the batch's rows). ``metadata`` is the
    materialization's: rows and bytes written (filled in from the manifest), duration_ms,
    custom entries.
    """
    if mode not in UPDATE_MODES:
        raise ValidationError(f"mode {mode!r} is not one of {', '.join(UPDATE_MODES)}", path="mode")
    partition_key = partition_key or None  # a task without a partition has ""
    partition = parse_partition_key(partition_key) if partition_key else None
    written = check_manifest(manifest, partition_key)
    written_rows, written_bytes = sum(f["rows"] for f in written), sum(f["bytes"] for f in written)
    # Lock the row first: the snapshot must build on the version that is current under the lock,
    # or two concurrent appends would each miss the other's files.
    current = db.session.execute(select(Dataset.current_version).where(Dataset.id == dataset.id)
                                 .with_for_update()).scalar_one()
    previous = get_version(dataset, current) if current is not None else None
    number = db.session.execute(
        update(Dataset).where(Dataset.id == dataset.id)
        .values(latest_version=Dataset.latest_version + 1, current_version=Dataset.latest_version + 1,
                updated_at=func.now())
        .returning(Dataset.latest_version)).scalar_one()
    db.session.refresh(dataset)
    if dataset.kind == "buffered":
        files = written
        inserted = (metadata or {}).get("inserted", written_rows)
        total_rows = (previous.rows if previous is not None else 0) + (inserted if isinstance(inserted, int) else 0)
    else:
        kept = []
        if previous is not None and (mode == "append" or partition_key is not None):
            kept = [f for f in previous.manifest["files"] if mode == "append" or f.get("partition") != partition_key]
        files = kept + written
        total_rows = sum(f["rows"] for f in files)
    total_bytes = sum(f["bytes"] for f in files)
    meta = {**(metadata or {}), "rows": written_rows, "bytes": written_bytes}
    version = DatasetVersion(dataset_id=dataset.id, org_id=dataset.org_id, version=number,
                             manifest={"files": files, "rows": sum(f["rows"] for f in files), "bytes": total_bytes},
                             rows=total_rows, bytes=total_bytes, schema_fingerprint=dataset.schema_fingerprint,
                             attempt_id=attempt_id, task_id=task_id, run_id=run_id, partition_key=partition_key,
                             meta=meta)
    db.session.add(version)
    if partition is not None:
        partition_rows = sum(f["rows"] for f in files if f.get("partition") == partition_key)
        db.session.execute(insert(Partition).values(
            id=uuid.uuid4(), dataset_id=dataset.id, org_id=dataset.org_id, key=partition_key, kind=partition[0],
            range_start=partition[1], range_end=partition[2], latest_version=number, rows=partition_rows)
            .on_conflict_do_update(index_elements=["dataset_id", "key"],
                                   set_={"latest_version": number, "rows": partition_rows, "updated_at": func.now()}))
    db.session.flush()
    return version


def rollback(org_id: uuid.UUID, name: str, version: int) -> Dataset:
    """Make ``version`` current again; later versions stay (a later rollback can return to them).

    ValidationError ``unknown_version`` when the dataset has no such version."""
    dataset = db.session.scalar(select(Dataset).where(Dataset.org_id == org_id, Dataset.name == name)
                                .with_for_update())
    if dataset is None:
        raise NotFound(f"no dataset named {name!r}")
    get_version(dataset, version)
    dataset.current_version = version
    dataset.updated_at = func.now()
    db.session.flush()
    return dataset


# -- the visibility contract (Query Service) ------------------------------------------


def views_for_user(org_id: uuid.UUID, user_id: uuid.UUID) -> list[DatasetView]:
    """Every dataset a user of ``org_id`` may query, at its current version: the org's own
    and those granted to it (named ``<owner org>__<name>``). PII datasets only with a
    PiiGrant for this user, else omitted. Datasets without a schema are omitted (nothing
    to read yet). The caller has checked the user's membership (the API token did)."""
    allowed_pii = set(db.session.scalars(select(PiiGrant.dataset_id).where(PiiGrant.user_id == user_id)))
    own = db.session.scalars(select(Dataset).where(Dataset.org_id == org_id)).all()
    named = [(dataset.name, dataset) for dataset in own] + list(granted_datasets(org_id).items())
    taken = {name for name, _ in named}
    named += [(name, dataset) for name, dataset in platform_datasets().items() if name not in taken]
    pins = [(name, dataset, dataset.current_version) for name, dataset in named
            if dataset.schema is not None and (not dataset.pii or dataset.id in allowed_pii)]
    return _views(pins)


def views_for_capability(capability: Any) -> list[DatasetView]:
    """Exactly the datasets of ``capability.inputs`` (``[{dataset, version, ...}]``, a
    ``tracecore.execution.tokens.Capability``) at their pinned versions, nothing else.

    ``dataset`` is a name of the capability's org or a granted ``<owner org>__<name>``
    (``dataset_id``, when an input carries it, wins). An unknown dataset or version is
    NotFound: the token was minted from the database, so it means something was lost.
    The pinned version decides the files; an input's ``partition`` narrows nothing here.
    """
    org_id = uuid.UUID(str(capability.org_id))
    granted: dict[str, Dataset] | None = None
    pins: dict[str, tuple[str, Dataset, int | None]] = {}
    for item in capability.inputs:
        if item.get("source") and not (item.get("dataset") or item.get("dataset_id")):
            continue  # a platform source (block_follower): lineage only, nothing to query yet
        name, version = str(item.get("dataset", "")), item.get("version")
        if item.get("dataset_id"):
            dataset = db.session.get(Dataset, uuid.UUID(str(item["dataset_id"])))
            if dataset is not None and dataset.org_id not in (org_id, PLATFORM_ORG_ID):
                granted = granted if granted is not None else granted_datasets(org_id)
                dataset = dataset if dataset.id in {d.id for d in granted.values()} else None
        else:
            dataset = db.session.scalar(select(Dataset).where(Dataset.org_id == org_id, Dataset.name == name))
            if dataset is None:
                granted = granted if granted is not None else granted_datasets(org_id)
                dataset = granted.get(name) or db.session.scalar(select(Dataset).where(
                    Dataset.org_id == PLATFORM_ORG_ID, Dataset.name == name, Dataset.kind.in_(PLATFORM_KINDS)))
        if dataset is None:
            raise NotFound(f"the token names dataset {name!r}, which this org cannot read", code="dataset_not_found")
        if name in pins and pins[name][2] != version:
            raise ValidationError(f"dataset {name!r} is pinned twice, at versions {pins[name][2]} and {version}",
                                  path="inputs", code="conflicting_pins")
        pins[name or dataset.name] = (name or dataset.name, dataset, version)
    pii = [dataset for _, dataset, _ in pins.values() if dataset.pii]
    if pii:
        _check_task_pii(capability, pii)
    return _views(list(pins.values()))


def views_for_condition(org_id: uuid.UUID, dataset_ids: Sequence[uuid.UUID], user_id: uuid.UUID | None
                        ) -> list[DatasetView]:
    """A trigger's ``when`` condition reads the job's input datasets at their current versions,
    named as the job's tasks see them; a PII input needs a grant for ``user_id`` (who saved the
    job's DAG version: no one triggers a condition), as a task's read would."""
    found = db.session.scalars(select(Dataset).where(Dataset.id.in_(list(dataset_ids)))).all()
    owned = [dataset for dataset in found if dataset.org_id in (org_id, PLATFORM_ORG_ID)]
    pii = [dataset for dataset in owned if dataset.pii]
    granted = set() if user_id is None or not pii else set(db.session.scalars(
        select(PiiGrant.dataset_id).where(PiiGrant.user_id == user_id, PiiGrant.dataset_id.in_([d.id for d in pii]))))
    missing = [dataset.name for dataset in pii if dataset.id not in granted]
    if missing:
        raise PermissionDenied(f"PII dataset(s) {', '.join(missing)} need a PII grant for the user who saved this "
                               "job's DAG", code="pii_not_granted")
    return _views([(dataset.name, dataset, dataset.current_version) for dataset in owned
                   if dataset.schema is not None])


def _check_task_pii(capability: Any, pii: list[Dataset]) -> None:
    """A task reads a PII dataset only on behalf of a user who holds a grant for it: whoever
    triggered the run, or, for runs no one triggered (schedules, data), whoever saved the
    job's DAG version. No such grant: 403, nothing read."""
    try:
        run_id = uuid.UUID(str(capability.run_id))
    except ValueError:
        run_id = None
    user_id = db.session.scalar(sql.ACCOUNTABLE_USER, {"run_id": run_id}) if run_id else None
    granted = set() if user_id is None else set(db.session.scalars(
        select(PiiGrant.dataset_id).where(PiiGrant.user_id == user_id,
                                          PiiGrant.dataset_id.in_([d.id for d in pii]))))
    missing = [d.name for d in pii if d.id not in granted]
    if missing:
        raise PermissionDenied(f"PII dataset(s) {', '.join(missing)} need a PII grant for the user this task runs "
                               "for (who triggered the run, or who saved its DAG)", code="pii_not_granted")


def _views(pins: Sequence[tuple[str, Dataset, int | None]]) -> list[DatasetView]:
    """Views of (name, dataset, version) triples, with two queries for all of them."""
    wanted = [(dataset.id, version) for _, dataset, version in pins
              if version is not None and dataset.kind not in _VIEW_SOURCES]
    manifests = {(row.dataset_id, row.version): row.manifest for row in db.session.execute(
        select(DatasetVersion.dataset_id, DatasetVersion.version, DatasetVersion.manifest)
        .where(tuple_(DatasetVersion.dataset_id, DatasetVersion.version).in_(wanted)))} if wanted else {}
    hot_names = [hot_table_name(dataset) for _, dataset, _ in pins if dataset.kind == "buffered"]
    present = set(db.session.scalars(sql.PRESENT_TABLES, {"names": hot_names})) if hot_names else set()
    views = []
    for name, dataset, version in pins:
        if dataset.kind in _VIEW_SOURCES:
            views.append(_VIEW_SOURCES[dataset.kind](name, dataset))
            continue
        if version is not None and (dataset.id, version) not in manifests:
            raise NotFound(f"dataset {name!r} has no version {version}", code="unknown_version")
        buffered = dataset.kind == "buffered"
        manifest = manifests.get((dataset.id, version), {"files": []})
        files = () if buffered else tuple(f["key"] for f in manifest["files"])
        hot = hot_table_name(dataset) if buffered and hot_table_name(dataset) in present else None
        views.append(DatasetView(dataset_id=dataset.id, org_id=dataset.org_id, name=name, version=version,
                                 parquet_keys=files, hot_table=hot,
                                 columns=tuple((c["name"], c["type"]) for c in dataset.schema or ()),
                                 pii=dataset.pii))
    return sorted(views, key=lambda view: view.name)
