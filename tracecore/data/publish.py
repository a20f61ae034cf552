"""Buffer-publish: the one way rows reach a dataset on behalf of a task (DESIGN.md, steps 6 and 8).

A batch is one Parquet file in the object store under the token's output prefix plus a JSON
manifest ``{dataset, schema_fingerprint, row_count, sha256, key, task_id, fence}``. Why each
check, in the order they run:

1. The manifest must belong to the token (its task and fence): a sandbox cannot publish in
   another task's name. Structural problems are 400 ``invalid_manifest``.
2. ``lease.assert_current`` opens the transaction: a zombie attempt (newer fence, lapsed lease)
   gets 409 ``stale_fence`` and writes nothing, not even a dead letter. Its share lock keeps the
   lease from moving until the publish commits.
3. The dataset must be one of the job's declared outputs (403 ``dataset_not_writable``) and the
   file must lie under the token's output prefix (403 ``key_outside_prefix``): a token scopes
   writes exactly as it scopes reads.
4. The stored file's SHA-256, then its columns and types against the dataset's schema, the
   row count, the unique key (present, not null). A malformed batch writes nothing but a row in
   ``dead_letters`` (committed) and answers 422 with the reason as the error code.
5. Writes follow the job's ``update_strategy`` (default ``append``). Buffered datasets go to
   their PostgreSQL hot table: COPY into a temp table, then one ``INSERT ... SELECT ... ON
   CONFLICT (org_id, <key>)`` (DO NOTHING for append, DO UPDATE for upsert); this keeps the
   per-row work in the server, which is what makes a million rows take seconds. Raw and
   derived datasets keep the Parquet file in the store and the new version's manifest lists it.
6. The version records its attempt, and lineage records attempt -> pinned inputs -> output.

A publish that changes nothing (a retried batch whose rows are all duplicates, an upsert of
identical rows) makes no new version: a version means new data, so reactive downstream jobs
do not fire on retries. An upsert moves a hot row to the version that last changed it.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any, Literal, cast

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from flask import current_app
from sqlalchemy import BigInteger, ForeignKey, Index, String, Text, Uuid, select
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from tracecore.dags.catalog import Job
from tracecore.dags.spec import default_output_datasets
from tracecore.data import datasets, sql
from tracecore.data.batches import encode, rows_table
from tracecore.data.lineage import record_lineage
from tracecore.data.schema import arrow_schema, normalize_schema, pg_column_type, type_name
from tracecore.data.schema import schema_fingerprint as fingerprint_of
from tracecore.db.engine import Base, created_at, db, uuid_pk
from tracecore.events import dataset_version_committed, emit
from tracecore.exceptions import NotFound, PermissionDenied, TraceError, UserError, ValidationError
from tracecore.execution import lease, operators
from tracecore.execution.redaction import redact, redact_value
from tracecore.execution.tokens import Capability, secret_key
from tracecore.infra.storage import ObjectStore, check_key, object_store
from tracecore.settings import Settings, current_settings
from tracecore.taskapi.calls import authenticate_token, register

STRATEGIES = ("append", "replace", "upsert")
MANIFEST_FIELDS = ("dataset", "schema_fingerprint", "row_count", "sha256", "key", "task_id", "fence")
_COPY_CHUNK = 1 << 20
_ORD = sql.ORDER_COLUMN


class DeadLetter(Base):
    """A batch refused as malformed: kept with its reason so the author can see what was wrong."""

    __tablename__ = "dead_letters"
    __table_args__ = (Index("ix_dead_letters_org_created", "org_id", "created_at"),
                      Index("ix_dead_letters_task", "task_id"))
    id: Mapped[uuid.UUID] = uuid_pk()
    org_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("orgs.id", ondelete="CASCADE"), nullable=False)
    dataset_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, ForeignKey("datasets.id", ondelete="SET NULL"))
    dataset_name: Mapped[str] = mapped_column(String(128), nullable=False)
    task_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, ForeignKey("tasks.id", ondelete="SET NULL"))
    attempt_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, ForeignKey("attempts.id", ondelete="SET NULL"))
    fence: Mapped[int] = mapped_column(BigInteger, nullable=False)
    reason: Mapped[str] = mapped_column(String(64), nullable=False)
    message: Mapped[str] = mapped_column(Text, nullable=False)
    details: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False, default=dict)
    manifest: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False, default=dict)
    created_at: Mapped[datetime] = created_at()


@dataclass(frozen=True)
class PublishResult:
    """What a publish did. ``duplicates`` = received - inserted (rows already there, in-batch
    repeats, and for upsert the rows that matched an existing key); ``updated`` counts the rows an
    upsert changed; ``version`` is the new version, or the current one when nothing changed."""

    received: int
    inserted: int
    duplicates: int
    dataset: str
    version: int | None
    updated: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class BatchRejected(UserError):
    """A malformed batch: dead-lettered; ``code`` is the reason (``checksum_mismatch`` ...)."""

    http_status = 422


class _Reject(Exception):
    """Internal: the batch is malformed; becomes a dead letter and a BatchRejected."""

    def __init__(self, reason: str, message: str, **details: Any) -> None:
        super().__init__(message)
        self.reason, self.message, self.details = reason, message, details


@dataclass(frozen=True)
class _Target:
    """The task's job as the database has it: what it may write and how."""

    job_id: uuid.UUID
    outputs: tuple[str, ...]
    strategy: str
    partition_key: str | None
    attempt_id: uuid.UUID | None


# -- the publish -------------------------------------------------------------------


def buffer_publish(capability: Capability, manifest: Mapping[str, Any], *, store: ObjectStore) -> PublishResult:
    """Validate the batch ``manifest`` names and write it, in one transaction (module docstring).

    Raises StaleFence (409), PermissionDenied (403), ValidationError (400) or BatchRejected
    (422, after committing the dead letter); commits on success.
    """
    started = time.monotonic()
    checked = _check_manifest(capability, manifest)
    try:
        lease.assert_current(uuid.UUID(capability.task_id), capability.fence)
        target = _target(capability)
        dataset = _writable(capability, target, checked["dataset"])
        if not checked["key"].startswith(capability.output_prefix) or not capability.output_prefix:
            raise PermissionDenied(f"the batch {checked['key']!r} is not under the token's output prefix",
                                   code="key_outside_prefix", details={"output_prefix": capability.output_prefix})
        try:
            table, data_bytes = _load(store, dataset, checked)
            if dataset.schema is None:
                _adopt_schema(dataset, table)
            dataset = _locked(dataset)
            before = dataset.latest_version
            result = _write(capability, target, dataset, table, checked, data_bytes, store, started)
        except _Reject as rejected:
            raise _dead_letter(capability, target, dataset, checked, rejected) from None
        dataset_id = dataset.id
        made = result.version if result.version is not None and result.version > before else None
        db.session.commit()
    except BaseException:
        db.session.rollback()
        raise
    if made is not None:
        _notify_updated(dataset_id, made)
    return result


def _notify_updated(dataset_id: uuid.UUID, version: int) -> None:
    """After the commit: tell whoever listens (the scheduler's reactive hook), best effort (a lost
    event delays that update's reactive run until the beat's sweep, never loses the publish)."""
    emit(dataset_version_committed, current_app._get_current_object(),  # type: ignore[attr-defined]
         dataset_id=dataset_id, version=version)


def publish_rows(capability: Capability, dataset: str | None, rows: Any, *, store: ObjectStore) -> PublishResult:
    """Write ``rows`` (JSON objects) as a Parquet batch under the output prefix, then publish it.

    The batch is typed by the dataset's schema so that a UDF's JSON (ISO timestamps, decimals as
    strings, binary as ``0x`` hex) lands as declared; a value that does not convert keeps its own
    type and is refused by the validation as ``schema_mismatch`` (so a bad row is a dead letter,
    never a 500). A dataset without a schema yet takes the batch's (first publish). ``dataset``
    None means the job's first output. The file name is the content's SHA-256: a retry that
    returns the same rows writes the same object.
    """
    if not isinstance(rows, list) or not all(isinstance(row, Mapping) for row in rows):
        raise ValidationError("rows must be a list of JSON objects", path="rows", code="invalid_rows")
    try:
        lease.assert_current(uuid.UUID(capability.task_id), capability.fence)
        target = _target(capability)
        if dataset is None and not target.outputs:
            raise ValidationError(f"job {capability.job!r} declares no output dataset to publish to",
                                  path="dataset", code="no_output")
        found = _writable(capability, target, dataset if dataset is not None else target.outputs[0])
        name, columns, keys, current = found.name, found.schema, list(found.unique_key), found.current_version
    finally:
        db.session.rollback()  # a read: releases the share lock until buffer_publish takes it again
    table = rows_table(redact_value(rows), columns, keys)  # no token (of any attempt) lands in a dataset
    if columns is None and table.num_columns == 0:
        return PublishResult(0, 0, 0, name, current)
    fingerprint = fingerprint_of(columns if columns is not None else _columns_of(table, strict=False))
    data, digest = encode(table)
    key = f"{capability.output_prefix}batches/{name}/{digest}.parquet"
    store.put(key, data)
    return buffer_publish(capability, {"dataset": name, "schema_fingerprint": fingerprint,
                                       "row_count": table.num_rows, "sha256": digest, "key": key,
                                       "task_id": capability.task_id, "fence": capability.fence}, store=store)


# -- checks --------------------------------------------------------------------------


def _check_manifest(capability: Capability, manifest: Any) -> dict[str, Any]:
    if not isinstance(manifest, Mapping):
        raise ValidationError("the manifest is a JSON object", path="manifest", code="invalid_manifest")
    missing = [name for name in MANIFEST_FIELDS if name not in manifest]
    if missing:
        raise ValidationError(f"the manifest lacks {', '.join(missing)}", path=f"manifest.{missing[0]}",
                              code="invalid_manifest", details={"missing": missing})
    checked = {name: manifest[name] for name in MANIFEST_FIELDS}
    for name in ("dataset", "schema_fingerprint", "sha256", "key", "task_id"):
        if not isinstance(checked[name], str):
            raise ValidationError(f"manifest.{name} must be a string", path=f"manifest.{name}",
                                  code="invalid_manifest")
    for name in ("row_count", "fence"):
        value = checked[name]
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValidationError(f"manifest.{name} must be an integer >= 0", path=f"manifest.{name}",
                                  code="invalid_manifest")
    try:
        check_key(checked["key"])
    except ValueError as exc:
        raise ValidationError(str(exc), path="manifest.key", code="invalid_manifest") from None
    if checked["task_id"] != capability.task_id or checked["fence"] != capability.fence:
        raise PermissionDenied("the manifest names another task or fence than the token",
                               code="manifest_mismatch", details={"task_id": checked["task_id"],
                                                                  "fence": checked["fence"]})
    return checked


def _target(capability: Capability) -> _Target:
    row = db.session.execute(
        sql.PUBLISH_TARGET,
        {"task": uuid.UUID(capability.task_id), "org": uuid.UUID(capability.org_id), "fence": capability.fence}
    ).one_or_none()
    if row is None:
        raise NotFound("the token's task does not exist")
    spec = row.spec or {}
    declared = spec.get("output_datasets") or default_output_datasets(row.name, int(spec.get("outputs") or 0))
    strategy = spec.get("update_strategy") or "append"
    return _Target(job_id=row.job_id, outputs=tuple(item["dataset"] for item in declared),
                   strategy=strategy if strategy in STRATEGIES else "append",
                   partition_key=row.partition_key or None, attempt_id=row.attempt_id)


def _writable(capability: Capability, target: _Target, name: str) -> datasets.Dataset:
    if name not in target.outputs:
        raise PermissionDenied(f"job {capability.job!r} does not declare dataset {name!r} as an output",
                               code="dataset_not_writable", details={"outputs": list(target.outputs)})
    return datasets.get_dataset(uuid.UUID(capability.org_id), name)


def _locked(dataset: datasets.Dataset) -> datasets.Dataset:
    """The dataset row, locked until commit: publishers of one dataset take version numbers in turn."""
    locked = db.session.scalar(select(datasets.Dataset).where(datasets.Dataset.id == dataset.id)
                               .with_for_update().execution_options(populate_existing=True))
    assert locked is not None
    return locked


def _load(store: ObjectStore, dataset: datasets.Dataset, manifest: Mapping[str, Any]) -> tuple[pa.Table, int]:
    """The batch, checked against the manifest and the schema; ``_Reject`` says what is wrong."""
    try:
        data = store.get(manifest["key"])
    except NotFound:
        raise _Reject("file_missing", f"no object {manifest['key']!r} in the store") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != manifest["sha256"]:
        raise _Reject("checksum_mismatch", "the stored file's SHA-256 is not the manifest's",
                      expected=manifest["sha256"], actual=digest)
    try:
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowException, OSError) as exc:
        raise _Reject("unreadable_file", f"the file is not readable Parquet: {exc}") from None
    # A dictionary-encoded column (a pandas categorical) is read as its values.
    table = pa.Table.from_arrays([column.cast(column.type.value_type) if pa.types.is_dictionary(column.type) else column
                                  for column in table.columns], names=table.column_names)
    columns = dataset.schema if dataset.schema is not None else _columns_of(table, strict=True)
    declared = {column["name"]: column for column in columns}
    names = table.column_names
    missing_keys = [key for key in dataset.unique_key if key not in names]
    if missing_keys:
        raise _Reject("unique_key_missing", f"unique key column(s) {', '.join(missing_keys)} missing",
                      columns=missing_keys)
    missing = [name for name in declared if name not in names]
    extra = [name for name in names if name not in declared]
    repeated = sorted({name for name in names if names.count(name) > 1})
    wrong = [{"column": f.name, "expected": declared[f.name]["type"], "actual": type_name(f.type)}
             for f in table.schema if f.name in declared and type_name(f.type) != declared[f.name]["type"]]
    if missing or extra or wrong or repeated:
        raise _Reject("schema_mismatch", "the batch's columns do not match the dataset's schema",
                      missing=missing, extra=extra, wrong_types=wrong, repeated=repeated)
    if manifest["schema_fingerprint"] != fingerprint_of(columns):
        raise _Reject("schema_mismatch", "the manifest was written against another schema",
                      expected=fingerprint_of(columns), actual=manifest["schema_fingerprint"])
    if table.num_rows != manifest["row_count"]:
        raise _Reject("row_count_mismatch", f"the file holds {table.num_rows} rows, the manifest says "
                      f"{manifest['row_count']}", expected=manifest["row_count"], actual=table.num_rows)
    for key in dataset.unique_key:
        if table.column(key).null_count:
            raise _Reject("unique_key_null", f"unique key column {key!r} has {table.column(key).null_count} null(s)",
                          column=key, nulls=table.column(key).null_count)
    nulls = {c["name"]: table.column(c["name"]).null_count for c in columns if not c["nullable"]}
    if any(nulls.values()):
        raise _Reject("schema_mismatch", "NOT NULL columns hold nulls",
                      null_columns={name: count for name, count in nulls.items() if count})
    return table.select(list(declared)), len(data)


def _columns_of(table: pa.Table, *, strict: bool) -> list[dict[str, Any]]:
    """A schema read off a batch (for a dataset's first publish): every column nullable."""
    raw = [{"name": field.name, "type": type_name(field.type), "nullable": True} for field in table.schema]
    try:
        return normalize_schema(raw)
    except ValidationError as exc:
        if not strict:
            return raw
        raise _Reject("schema_mismatch", f"the batch's schema cannot be a dataset schema: {exc.message}",
                      errors=exc.details.get("errors", [])) from None


def _adopt_schema(dataset: datasets.Dataset, table: pa.Table) -> None:
    """A dataset declared without a schema takes its first batch's (and a buffered one its hot table)."""
    datasets.declare_dataset(dataset.org_id, dataset.name, dataset.kind, _columns_of(table, strict=True),
                             dataset.unique_key, dataset.pii, dataset.producer_job_id,
                             description=dataset.description)


def _dead_letter(capability: Capability, target: _Target, dataset: datasets.Dataset, manifest: Mapping[str, Any],
                 rejected: _Reject) -> BatchRejected:
    """Undo everything, keep the dead letter (committed), answer the 422 to raise."""
    dataset_id, dataset_name = dataset.id, dataset.name
    db.session.rollback()
    letter = DeadLetter(org_id=uuid.UUID(capability.org_id), dataset_id=dataset_id, dataset_name=dataset_name,
                        task_id=uuid.UUID(capability.task_id), attempt_id=target.attempt_id, fence=capability.fence,
                        reason=rejected.reason, message=redact(rejected.message),
                        details=redact_value(json.loads(json.dumps(rejected.details, default=str))),
                        manifest=redact_value(json.loads(json.dumps(dict(manifest), default=str))))
    db.session.add(letter)
    db.session.commit()
    return BatchRejected(rejected.message, code=rejected.reason,
                         details={**rejected.details, "dead_letter": str(letter.id)})


# -- writing --------------------------------------------------------------------------


def _write(capability: Capability, target: _Target, dataset: datasets.Dataset, table: pa.Table,
           manifest: Mapping[str, Any], size: int, store: ObjectStore, started: float) -> PublishResult:
    strategy, org_id = target.strategy, uuid.UUID(capability.org_id)
    if strategy == "upsert" and not dataset.unique_key:
        raise ValidationError(f"update_strategy upsert needs a unique key; dataset {dataset.name!r} has none",
                              path="unique_key", code="no_unique_key")
    received = table.num_rows
    files = [{"key": manifest["key"], "sha256": manifest["sha256"], "rows": received, "bytes": size}]
    if dataset.kind == "buffered":
        number = dataset.latest_version + 1  # ours: the dataset row is locked until commit
        inserted, updated = _write_hot(dataset, table, strategy, org_id, number)
        mode = "append"
    else:
        files, mode, inserted, updated = _write_files(store, capability, dataset, table, strategy, files)
    if inserted == 0 and updated == 0 and strategy != "replace":
        return PublishResult(received, 0, received, dataset.name, dataset.current_version)
    metadata = {"received": received, "inserted": inserted, "duplicates": received - inserted, "updated": updated,
                "update_strategy": strategy, "batch": manifest["key"],
                "duration_ms": round((time.monotonic() - started) * 1000, 3)}
    version = datasets.add_version(dataset, {"files": files}, attempt_id=target.attempt_id,
                                   task_id=uuid.UUID(capability.task_id), run_id=uuid.UUID(capability.run_id),
                                   partition_key=None if strategy == "upsert" else target.partition_key,
                                   metadata=metadata, mode=mode)
    if dataset.kind == "buffered":
        assert version.version == number, "the dataset row was not locked"
        if strategy == "replace":
            version.rows = inserted
        db.session.flush()
    record_lineage(org_id, dataset.id, version.version, capability.inputs, attempt_id=target.attempt_id,
                   run_id=uuid.UUID(capability.run_id), job_id=target.job_id)
    return PublishResult(received, inserted, received - inserted, dataset.name, version.version, updated)


def _write_hot(dataset: datasets.Dataset, table: pa.Table, strategy: str, org_id: uuid.UUID,
               number: int) -> tuple[int, int]:
    """COPY the batch into a temp table, then one INSERT ... SELECT into the hot table; (inserted, updated)."""
    import psycopg

    hot = datasets.ensure_hot_table(dataset)
    names = [column["name"] for column in dataset.schema or ()]
    keys = dataset.unique_key
    temp = f"_publish_{uuid.uuid4().hex}"
    ordered = strategy == "upsert"
    if ordered:
        table = table.append_column(_ORD, pa.array(range(table.num_rows), type=pa.int64()))
    columns = [(c["name"], pg_column_type(c["type"])) for c in dataset.schema or ()]
    raw = cast("psycopg.Connection[Any]", db.session.connection().connection.driver_connection)
    params = {"org": org_id, "v": number}
    try:
        with raw.cursor() as cursor:
            cursor.execute(sql.PUBLISH_WORK_MEM)
            cursor.execute(sql.create_temp_table(temp, columns, ordered=ordered))
            _copy(cursor, temp, table)
            if strategy == "replace":
                cursor.execute(sql.delete_org_rows(hot), params)
            if not keys:
                cursor.execute(sql.insert_all(hot, temp, names), params)
                return cursor.rowcount, 0
            if strategy != "upsert":
                cursor.execute(sql.insert_new(hot, temp, names, keys), params)
                return cursor.rowcount, 0
            cursor.execute(sql.upsert(hot, temp, names, keys), params)
            counts = cursor.fetchone()
            assert counts is not None  # an aggregate without GROUP BY answers one row
            return int(counts[0]), int(counts[1])
    except psycopg.errors.DataError as exc:
        raise _Reject("invalid_value", f"a value does not fit its column: {str(exc).splitlines()[0]}") from None


def _csv_safe(kind: pa.DataType) -> bool:
    """Arrow's CSV writer renders these exactly as PostgreSQL reads them (binary and lists it does not)."""
    t = pa.types
    return not (t.is_binary(kind) or t.is_large_binary(kind) or t.is_fixed_size_binary(kind) or t.is_list(kind))


def _copy(cursor: Any, temp: str, table: pa.Table) -> None:
    """COPY the table into ``temp``: Arrow's C++ CSV writer when every type allows (fast), else row by row."""
    if all(_csv_safe(field.type) for field in table.schema):
        sink = io.BytesIO()
        pacsv.write_csv(table, sink, pacsv.WriteOptions(include_header=False))
        view = sink.getbuffer()
        with cursor.copy(sql.copy_into(temp, table.column_names, csv=True)) as copy:
            for offset in range(0, len(view), _COPY_CHUNK):
                copy.write(view[offset:offset + _COPY_CHUNK])
        view.release()
        return
    values = [column.to_pylist() for column in table.columns]
    with cursor.copy(sql.copy_into(temp, table.column_names, csv=False)) as copy:
        for row in zip(*values, strict=True):
            copy.write_row(row)


def _write_files(store: ObjectStore, capability: Capability, dataset: datasets.Dataset, table: pa.Table,
                 strategy: str, files: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], str, int, int]:
    """A Parquet dataset's new files: the batch itself, or (with a unique key) the rows it adds.

    Keys are compared with the current version's files, read back (key columns only for append).
    Answers (files, add_version mode, inserted, updated).
    """
    received, keys = table.num_rows, list(dataset.unique_key)
    if strategy == "replace" or not keys:
        return files, "replace" if strategy == "replace" else "append", received, 0
    schema = arrow_schema(dataset.schema or [])
    numbered = table.append_column(_ORD, pa.array(range(received), type=pa.int64()))
    # upsert: the last row of a key wins; append: the first
    pick: Literal["max", "min"] = "max" if strategy == "upsert" else "min"
    chosen = numbered.group_by(keys).aggregate([(_ORD, pick)]).column(f"{_ORD}_{pick}")
    batch = numbered.take(chosen.sort()).drop_columns([_ORD])
    old = _current_rows(store, dataset, schema, keys if strategy == "append" else None)
    new = batch.join(old.select(keys), keys, join_type="left anti") if old.num_rows else batch
    if strategy == "append":
        if new.num_rows in (0, received):
            return files, "append", new.num_rows, 0
        return [_put(store, capability, dataset, new.select(schema.names).cast(schema))], "append", new.num_rows, 0
    existing = batch.join(old.select(keys), keys, join_type="left semi") if old.num_rows else batch.slice(0, 0)
    try:
        changed = existing.join(old, schema.names, join_type="left anti").num_rows if existing.num_rows else 0
    except pa.ArrowNotImplementedError:  # a list column cannot be a join key: count every match as changed
        changed = existing.num_rows
    if new.num_rows == 0 and changed == 0:
        return files, "replace", 0, 0
    kept = old.join(batch.select(keys), keys, join_type="left anti") if old.num_rows else old
    merged = pa.concat_tables([kept.select(schema.names).cast(schema), batch.select(schema.names).cast(schema)])
    return [_put(store, capability, dataset, merged)], "replace", new.num_rows, changed


def _current_rows(store: ObjectStore, dataset: datasets.Dataset, schema: pa.Schema,
                  only: list[str] | None) -> pa.Table:
    """The rows of the dataset's current version (``only`` those columns), typed by ``schema``."""
    wanted = pa.schema([schema.field(name) for name in only]) if only else schema
    if dataset.current_version is None:
        return wanted.empty_table()
    tables = []
    for item in datasets.get_version(dataset, dataset.current_version).manifest["files"]:
        part = pq.read_table(pa.BufferReader(store.get(item["key"])))
        part = part.select([name for name in wanted.names if name in part.column_names])
        for field in wanted:  # older files may lack a column added since (nullable by the rules)
            if field.name not in part.column_names:
                part = part.append_column(field, pa.nulls(part.num_rows, field.type))
        tables.append(part.select(wanted.names).cast(wanted))
    return pa.concat_tables(tables) if tables else wanted.empty_table()


def _put(store: ObjectStore, capability: Capability, dataset: datasets.Dataset, table: pa.Table) -> dict[str, Any]:
    data, digest = encode(table)
    key = f"{capability.output_prefix}written/{dataset.name}/{digest}.parquet"
    store.put(key, data)
    return {"key": key, "sha256": digest, "rows": table.num_rows, "bytes": len(data)}


# -- pinned inputs (minted into the token) ----------------------------------------------


def pinned_inputs(org_id: uuid.UUID, job_spec: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The job's inputs at the versions current now: ``{dataset, version, partition, dataset_id}``
    per upstream output, ``{"source": name}`` per platform source (``block_follower``).

    Pinned at lease time, so every query of the attempt reads the same data however many
    versions the upstream publishes meanwhile, and lineage names exactly what was read.
    """
    pins: dict[str, dict[str, Any]] = {}
    for ref in job_spec.get("inputs") or ():
        if ref.get("dataset") is not None:
            _pin(pins, str(ref["dataset"]), datasets.find_visible(org_id, str(ref["dataset"])))
            continue
        name, output = str(ref["job"]), int(ref["output"])
        job = db.session.scalar(select(Job).where(Job.org_id == org_id, Job.name == name, Job.deleted_at.is_(None)))
        if job is None:
            if name == "block_follower" and output < len(operators.BLOCK_FOLLOWER_OUTPUTS):
                chain_dataset = f"{current_settings().default_chain}_{operators.BLOCK_FOLLOWER_OUTPUTS[output]}"
                try:
                    _pin(pins, chain_dataset, datasets.find_visible(org_id, chain_dataset))
                    continue
                except NotFound:
                    pass  # no such chain registered: lineage only, as before chains existed
            if name in operators.PLATFORM_SOURCES:
                pins.setdefault(f"source:{name}", {"source": name})
                continue
            raise ValidationError(f"input job {name!r} no longer exists", path="inputs", code="unknown_input")
        declared = job.spec.get("output_datasets") or default_output_datasets(name, int(job.spec.get("outputs") or 0))
        if output >= len(declared):
            raise ValidationError(f"job {name!r} has no output {output}", path="inputs", code="unknown_output")
        dataset = datasets.get_dataset(org_id, declared[output]["dataset"])
        pins.setdefault(str(dataset.id), {"dataset": dataset.name, "version": dataset.current_version,
                                          "partition": None, "dataset_id": str(dataset.id)})
    return list(pins.values())


def _pin(pins: dict[str, dict[str, Any]], name: str, dataset: datasets.Dataset) -> None:
    pins.setdefault(str(dataset.id), {"dataset": name, "version": dataset.current_version, "partition": None,
                                      "dataset_id": str(dataset.id)})


# -- transports ---------------------------------------------------------------------------


@register("POST", "/v1/task/buffer-publish")
def publish_route(capability: Capability, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """``POST /v1/task/buffer-publish``: ``{"manifest": {...}}`` or ``{"rows": [...], "dataset": name}``."""
    store = object_store(current_settings())
    if "manifest" in body:
        return 200, buffer_publish(capability, body["manifest"], store=store).to_json()
    if "rows" in body:
        dataset = body.get("dataset")
        if dataset is not None and not isinstance(dataset, str):
            raise ValidationError("dataset is a dataset name", path="dataset")
        return 200, publish_rows(capability, dataset, body["rows"], store=store).to_json()
    raise ValidationError("send {\"manifest\": {...}} or {\"rows\": [...], \"dataset\": name}", path="body",
                          code="invalid_body")


def publish_with_token(token: str, manifest: Mapping[str, Any], settings: Settings) -> dict[str, Any]:
    """The Celery task ``trace.buffer_publish``: the route's checks and answer, with ``status`` inside
    (a Celery result has no HTTP status); a refusal is an answer, not a task failure to retry."""
    try:
        capability = authenticate_token(token, secret_key(settings))
        return {"status": 200, **buffer_publish(capability, manifest, store=object_store(settings)).to_json()}
    except TraceError as exc:
        db.session.rollback()
        return {"status": exc.http_status, "error": exc.to_dict()}
