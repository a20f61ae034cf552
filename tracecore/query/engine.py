"""The Query Service engine: one SELECT over the datasets a caller may read, in a fresh, locked DuckDB.

Why it is built this way (DESIGN.md "Storage"; issue 4, section 4):

- One fresh in-memory DuckDB per query. Nothing a query does (a temp object, a setting, a
  cached file) can reach the next caller, and a query that kills its database kills only itself.
- The SQL is judged before anything is read (``tracecore.query.policy``): exactly one SELECT,
  only harmless table functions (even inside a CTE), only tables that are visible datasets or
  CTEs in scope. Hostile SQL gets a clear 4xx and nothing is registered, let alone read.
- Only the datasets the statement names are registered, each as ONE view named after it: the
  version's cold Parquet files UNION ALL its hot rows read from PostgreSQL into Arrow. Hot rows
  of datasets the query does not read are never fetched, and the PII audit names exactly the
  datasets read. Cold files of a local store are read by DuckDB's own Parquet reader, of S3 as
  a lazily scanned ``pyarrow.dataset`` (``_cold_source`` says why).
- Then, and only then: ``allowed_paths`` = exactly those local files, ``enable_external_access
  =false``, extension autoinstall and autoload off, ``memory_limit``, ``threads``,
  ``lock_configuration=true``. From here no SQL can reach another file, the network, an
  extension or a setting: the data had to be registered from Python first.
  ``temp_directory`` is empty (nothing spills to the host's disk) and Python replacement scans
  are off (a query cannot name a Python variable of this process).
- A timer thread calls ``interrupt()`` at the deadline (408 ``query_timeout``); running past
  ``memory_limit`` is DuckDB's ``OutOfMemoryException`` (422 ``query_resource_limit``); rows are
  capped (``truncated``). Errors in the user's SQL are 400 ``query_error`` with DuckDB's message,
  with this host's paths taken out.
- The answer is capped in BYTES too, since ``memory_limit`` covers DuckDB's operators but not
  the result this process builds from it (issue 11: ``repeat('x', 100000) FROM range(10000)``
  is 1 GB of answer). Results leave DuckDB as Arrow batches of ``_READ_ROWS`` rows, so a batch
  of wide rows stays small, and their bytes are counted as they arrive: inline rows past
  ``max_bytes`` are 422 ``query_result_too_large`` (or, where the caller spills, a download); an
  export file past ``export_max_bytes`` stops being written and is discarded (422, nothing
  stored). The process holds at most a cap plus one batch (plus one Parquet row group of
  ``_ROW_GROUP_BYTES``). What this cannot bound: DuckDB evaluates 2,048 rows per vector, and a
  vector of huge strings (``repeat('x', 1000000)``, 2 GB a vector) is not counted by its
  ``memory_limit``; only a separate process could cap that.

No row is counted twice (the hot/cold rule). A hot row carries ``_version``, the dataset
version whose publish inserted it; rows visible at version ``v`` are those published up to
``v`` (the datasets contract, ``tracecore.data.datasets.DatasetView``). A view is::

    cold files of view.version
    UNION ALL
    hot rows WHERE org_id = view.org_id
               AND _version <= view.version     -- nothing published after the pinned version
               AND _version > C                 -- nothing the cold files already hold

where C, the cold files' coverage, is the highest ``_version`` stored in the cold files when
they carry that column (a compaction moves the hot rows of versions <= C into Parquet, with
their ``_version``), else ``view.version`` when there are cold files without it (a full
snapshot: no hot row is added), else nothing (no cold files: every hot row up to the version).
A view whose ``version`` is None has no hot rows. Today's datasets are either Parquet
(``parquet_keys``) or buffered (``hot_table``); the rule also covers a view with both.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import decimal
import logging
import math
import re
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import duckdb
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from tracecore.data.schema import parse_arrow_type
from tracecore.exceptions import PlatformError, UserError
from tracecore.infra.storage import LocalObjectStore, ObjectStore
from tracecore.query.policy import (
    ForbiddenFunction,
    NotSelect,
    QueryError,
    QueryResourceLimit,
    QueryResultTooLarge,
    QueryTimeout,
    check_sql,
    check_statement,
    clean_message,
)

__all__ = ["EXPORT_FORMATS", "DatasetViewLike", "Export", "ForbiddenFunction", "NotSelect", "QueryError",
           "QueryResourceLimit", "QueryResult", "QueryResultTooLarge", "QueryTimeout", "check_sql",
           "check_statement", "export_query", "run_query"]

log = logging.getLogger(__name__)

EXPORT_FORMATS = ("parquet", "csv")
_PG_ROWS = 64 * 1024  # hot rows fetched from PostgreSQL per round trip
# Rows per Arrow batch out of DuckDB: small, so one batch of 100 kB rows is 25 MB, not 6 GB.
_READ_ROWS = 256
# A Parquet export buffers batches into row groups of about this size (few, large row groups).
_ROW_GROUP_BYTES = 16 * 1024 * 1024
_ROW_GROUP_ROWS = 128 * 1024
# Caps when a caller names none (the settings' defaults: TRACE_QUERY_MAX_RESULT_BYTES, _EXPORT_BYTES).
DEFAULT_MAX_RESULT_BYTES = 32 * 1024 * 1024
DEFAULT_MAX_EXPORT_BYTES = 512 * 1024 * 1024
_MEMORY = re.compile(r"\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)", re.IGNORECASE)


class DatasetViewLike(Protocol):
    """What the engine reads of a ``tracecore.data.datasets.DatasetView`` (the datasets contract)."""

    @property
    def dataset_id(self) -> uuid.UUID: ...
    @property
    def org_id(self) -> uuid.UUID: ...
    @property
    def name(self) -> str: ...
    @property
    def version(self) -> int | None: ...
    @property
    def parquet_keys(self) -> tuple[str, ...]: ...
    @property
    def hot_table(self) -> str | None: ...
    @property
    def columns(self) -> tuple[tuple[str, str], ...]: ...
    @property
    def pii(self) -> bool: ...


@dataclass(frozen=True)
class Export:
    """Where an exported result landed in the object store."""

    key: str
    format: str
    bytes: int


@dataclass
class QueryResult:
    """One query's answer. ``views`` are the datasets it read (for the PII audit)."""

    columns: list[dict[str, str]]
    rows: list[dict[str, Any]]
    row_count: int
    truncated: bool
    elapsed_ms: float
    views: tuple[DatasetViewLike, ...] = ()
    export: Export | None = None

    def to_json(self) -> dict[str, Any]:
        """The JSON answer of ``/v1/query`` (format json): columns, rows as objects, counts."""
        return {"columns": self.columns, "rows": self.rows, "row_count": self.row_count,
                "truncated": self.truncated, "elapsed_ms": self.elapsed_ms}


# ---------------------------------------------------------------------------------------------
# Registration: cold Parquet UNION ALL hot rows, one view per dataset.

def quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


def _connect_config(memory_limit: str, threads: int) -> dict[str, Any]:
    return {"temp_directory": "", "python_enable_replacements": False, "autoinstall_known_extensions": False,
            "autoload_known_extensions": False, "allow_unsigned_extensions": False,
            "allow_community_extensions": False, "memory_limit": memory_limit, "threads": threads}


def _lock(con: duckdb.DuckDBPyConnection, memory_limit: str, threads: int, allowed: Sequence[str]) -> None:
    """Close the database: from here no SQL reaches a file (but ``allowed``), the network, an extension, a setting."""
    statements = [f"SET allowed_paths = [{', '.join(_literal(path) for path in allowed)}]"] if allowed else []
    statements += ["SET enable_external_access = false", "SET autoinstall_known_extensions = false",
                   "SET autoload_known_extensions = false", f"SET memory_limit = '{memory_limit}'",
                   f"SET threads = {threads}", "SET lock_configuration = true"]
    for statement in statements:
        con.execute(statement).fetchall()


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _arrow_type(text: str) -> pa.DataType | None:
    try:
        return parse_arrow_type(text)
    except Exception:  # an unknown spelling: let the values decide
        return None


def _cold_source(con: duckdb.DuckDBPyConnection, store: ObjectStore, view: DatasetViewLike, name: str,
                 allowed: list[str]) -> str:
    """Make the version's Parquet files scannable; answers what to put after FROM.

    A local store: DuckDB's own Parquet reader over exactly these files, which ``_lock`` leaves
    readable through ``allowed_paths`` (and nothing else). It is 4-5x faster than scanning an
    Arrow dataset (strings stay dictionary-encoded; benchmarks/query.py). Other stores (S3): a
    ``pyarrow.dataset`` over pyarrow's S3 filesystem, scanned lazily with projection and filter
    pushdown, since DuckDB's own S3 support is an extension and extensions stay off.
    """
    keys = list(view.parquet_keys)
    try:
        if isinstance(store, LocalObjectStore):
            paths = [str(store.path(key).resolve()) for key in keys]
            if not all(Path(path).is_file() for path in paths):
                raise FileNotFoundError("a file of the version is missing")
            allowed.extend(paths)
            return f"read_parquet([{', '.join(_literal(path) for path in paths)}], union_by_name = true)"
        s3_key = getattr(store, "s3_key", None)
        bucket = getattr(store, "bucket", None)
        dataset: pads.Dataset
        if callable(s3_key) and isinstance(bucket, str):
            dataset = pads.dataset([f"{bucket}/{s3_key(key)}" for key in keys], format="parquet",
                                   filesystem=_s3_filesystem(store))
        else:  # any other store: read the files through its interface (not lazy, but correct)
            tables = []
            for key in keys:
                with store.open_read(key) as handle:
                    tables.append(pq.read_table(pa.BufferReader(handle.read())))
            dataset = pads.dataset(pa.concat_tables(tables, promote_options="default"))
        con.register(name, dataset)
        return name
    except (OSError, pa.ArrowException, duckdb.IOException) as exc:
        log.error("dataset %s version %s: cannot open its Parquet files: %s", view.name, view.version, exc)
        raise PlatformError(f"the files of dataset {view.name} (version {view.version}) cannot be read",
                            code="dataset_unreadable") from None


def _s3_filesystem(store: Any) -> Any:
    """pyarrow's S3 filesystem with the same endpoint, region and credentials as the store's boto3 client."""
    from urllib.parse import urlsplit

    import boto3
    from pyarrow import fs

    options: dict[str, Any] = {"region": getattr(store, "region", None) or "us-east-1"}
    endpoint = getattr(store, "endpoint_url", None)
    if endpoint:
        parts = urlsplit(endpoint)
        options.update(endpoint_override=parts.netloc or endpoint, scheme=parts.scheme or "https")
    credentials = boto3.session.Session().get_credentials()
    if credentials is not None:
        frozen = credentials.get_frozen_credentials()
        options.update(access_key=frozen.access_key, secret_key=frozen.secret_key, session_token=frozen.token)
    return fs.S3FileSystem(**options)


def _cold_through(con: duckdb.DuckDBPyConnection, cold: str | None, view: DatasetViewLike) -> int | None:
    """C of the hot/cold rule: the highest version the cold files hold (None: they hold nothing)."""
    if cold is None:
        return None
    names = {row[0] for row in con.execute(f"DESCRIBE SELECT * FROM {cold}").fetchall()}
    if "_version" not in names:
        return view.version
    highest = con.execute(f"SELECT max(_version) FROM {cold}").fetchall()[0][0]  # Parquet statistics
    return None if highest is None else int(highest)


def _hot_rows(pg: Any, view: DatasetViewLike, *, through: int | None) -> pa.Table:
    """The view's hot rows by the no-double-count rule (module docstring), as an Arrow table."""
    from psycopg import sql as pgsql

    names = [name for name, _ in view.columns]
    table = pgsql.Identifier(*str(view.hot_table).split("."))
    select = pgsql.SQL(", ").join(pgsql.Identifier(name) for name in names) if names else pgsql.SQL("*")
    query = pgsql.SQL("SELECT {} FROM {} WHERE org_id = %s AND _version <= %s").format(select, table)
    params: list[Any] = [view.org_id, view.version if view.version is not None else -1]
    if through is not None:
        query += pgsql.SQL(" AND _version > %s")
        params.append(through)
    with pg.cursor() as cursor:
        cursor.execute(query, params)
        columns = [column.name for column in cursor.description]
        values: list[list[Any]] = [[] for _ in columns]
        while chunk := cursor.fetchmany(_PG_ROWS):
            for row in chunk:
                for index, value in enumerate(row):
                    values[index].append(value)
    declared = dict(view.columns)
    arrays = [_to_array(column, _arrow_type(declared.get(name, ""))) for name, column in zip(columns, values,
                                                                                               strict=True)]
    return pa.Table.from_arrays(arrays, names=columns)


def _sql_rows(pg: Any, view: DatasetViewLike, statement: tuple[str, tuple[Any, ...]]) -> pa.Table:
    """A platform view's hot rows (``DatasetView.hot_sql``), typed as the view declares."""
    with pg.cursor() as cursor:
        cursor.execute(statement[0], statement[1])
        columns = [column.name for column in cursor.description]
        values: list[list[Any]] = [[] for _ in columns]
        while chunk := cursor.fetchmany(_PG_ROWS):
            for row in chunk:
                for index, value in enumerate(row):
                    values[index].append(value)
    declared = dict(view.columns)
    arrays = [_to_array(column, _arrow_type(declared.get(name, ""))) for name, column in zip(columns, values,
                                                                                               strict=True)]
    return pa.Table.from_arrays(arrays, names=columns)


def _to_array(values: list[Any], target: pa.DataType | None) -> pa.Array:
    if target is None:
        return pa.array([str(v) if isinstance(v, uuid.UUID) else v for v in values])
    if pa.types.is_integer(target) and any(isinstance(v, decimal.Decimal) for v in values):
        values = [None if v is None else int(v) for v in values]  # numeric(20, 0) columns: uint64
    try:
        return pa.array(values, type=target)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        plain = [str(v) if isinstance(v, uuid.UUID) else v for v in values]
        return pa.array(plain).cast(target, safe=False)


def _empty_table(view: DatasetViewLike) -> pa.Table:
    fields = [pa.field(name, _arrow_type(kind) or pa.string()) for name, kind in view.columns]
    return pa.Table.from_batches([], schema=pa.schema(fields))


def _register(con: duckdb.DuckDBPyConnection, views: Sequence[DatasetViewLike], *, store: ObjectStore | None,
              pg_conninfo: str | None, deadline: float) -> list[str]:
    """One view per dataset (cold UNION ALL hot); answers the files ``_lock`` must leave readable."""
    pg = None
    allowed: list[str] = []
    try:
        for index, view in enumerate(views):
            names = [name for name, _ in view.columns]
            columns = ", ".join(quote(name) for name in names) if names else "*"
            parts: list[str] = []
            cold: str | None = None
            if view.parquet_keys:
                if store is None:
                    raise PlatformError("the query engine needs an object store to read cold files")
                cold = _cold_source(con, store, view, f"__trace_cold_{index}", allowed)
                parts.append(f"SELECT {columns} FROM {cold}")
            if view.hot_table:
                if pg is None:
                    pg = _pg_connect(pg_conninfo, deadline)
                hot = _hot_rows(pg, view, through=_cold_through(con, cold, view))
                con.register(f"__trace_hot_{index}", hot)
                parts.append(f"SELECT {columns} FROM __trace_hot_{index}")
            hot_sql = getattr(view, "hot_sql", None)
            if hot_sql is not None:
                if pg is None:
                    pg = _pg_connect(pg_conninfo, deadline)
                con.register(f"__trace_hot_{index}", _sql_rows(pg, view, hot_sql))
                parts.append(f"SELECT {columns} FROM __trace_hot_{index}")
            if not parts:
                con.register(f"__trace_empty_{index}", _empty_table(view))
                parts.append(f"SELECT {columns} FROM __trace_empty_{index}")
            union = " UNION ALL BY NAME " if columns == "*" else " UNION ALL "
            con.execute(f"CREATE VIEW {quote(view.name)} AS {union.join(parts)}").fetchall()
    except Exception as exc:
        if type(exc).__name__ == "QueryCanceled":  # psycopg: statement_timeout
            raise QueryTimeout("the query ran out of time while reading hot rows") from None
        raise
    finally:
        if pg is not None:
            pg.close()
    return allowed


def _pg_connect(conninfo: str | None, deadline: float) -> Any:
    import psycopg

    if not conninfo:
        raise PlatformError("the query engine needs a PostgreSQL URL to read hot rows")
    remaining_ms = max(int((deadline - time.monotonic()) * 1000), 1)
    url = conninfo.replace("postgresql+psycopg://", "postgresql://", 1)
    connection = psycopg.connect(url, options=f"-c statement_timeout={remaining_ms}")
    connection.read_only = True
    return connection


# ---------------------------------------------------------------------------------------------
# Execution.

Sink = Callable[[list[str], list[str], pa.RecordBatchReader], "_Outcome"]


@dataclass
class _Outcome:
    rows: list[dict[str, Any]] = field(default_factory=list)
    row_count: int = 0
    truncated: bool = False
    export: Export | None = None


def _execute(sql: str, views: Sequence[DatasetViewLike], sink: Sink, *, store: ObjectStore | None,
             timeout_s: float, memory_limit: str, threads: int, pg_conninfo: str | None) -> QueryResult:
    if not _MEMORY.fullmatch(str(memory_limit).strip()):
        raise ValueError(f"not a DuckDB memory limit: {memory_limit!r} (e.g. 512MB, 2GB)")
    threads = max(int(threads), 1)
    started = time.monotonic()
    deadline = started + float(timeout_s)
    by_name: dict[str, DatasetViewLike] = {}
    for view in views:
        by_name.setdefault(view.name.lower(), view)
    con = duckdb.connect(":memory:", config=_connect_config(memory_limit, threads))
    extra = [(str(store.root.resolve()), "<store>")] if isinstance(store, LocalObjectStore) else []
    try:
        referenced = check_sql(sql, by_name, connection=con)
        read = tuple(by_name[name] for name in sorted(referenced))
        allowed = _register(con, read, store=store, pg_conninfo=pg_conninfo, deadline=deadline)
        _lock(con, memory_limit, threads, allowed)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise QueryTimeout(f"the query did not finish within {timeout_s:g} s")
        timer = threading.Timer(remaining, _interrupt, args=(con,))
        timer.daemon = True
        timer.start()
        try:
            relation = con.sql(sql)
            names, types = _unique(list(relation.columns)), [str(kind) for kind in relation.types]
            outcome = sink(names, types, _reader(relation))
        finally:
            timer.cancel()
    except (duckdb.Error, pa.ArrowException) as exc:
        raise _translate(exc, timeout_s, extra) from None
    finally:
        con.close()
    return QueryResult(columns=[{"name": n, "type": t} for n, t in zip(names, types, strict=True)],
                       rows=outcome.rows, row_count=outcome.row_count, truncated=outcome.truncated,
                       elapsed_ms=round((time.monotonic() - started) * 1000, 3), views=read, export=outcome.export)


def _interrupt(con: duckdb.DuckDBPyConnection) -> None:
    """The timer's action; the query may have ended (and the connection closed) a moment before."""
    with contextlib.suppress(duckdb.Error):
        con.interrupt()


def _translate(exc: Exception, timeout_s: float, extra: Sequence[tuple[str, str]]) -> Exception:
    message = str(exc)
    if isinstance(exc, duckdb.InterruptException) or message.startswith("INTERRUPT"):
        return QueryTimeout(f"the query did not finish within {timeout_s:g} s and was interrupted",
                            details={"timeout_s": timeout_s})
    if isinstance(exc, duckdb.OutOfMemoryException) or "Out of Memory Error" in message:
        return QueryResourceLimit("the query needs more memory than the Query Service allows: "
                                  + clean_message(message, extra).splitlines()[0])
    if isinstance(exc, duckdb.PermissionException):
        return ForbiddenFunction(clean_message(message, extra))
    return QueryError(clean_message(message, extra))


def _reader(relation: duckdb.DuckDBPyRelation) -> pa.RecordBatchReader:
    to_reader = getattr(relation, "to_arrow_reader", None)  # duckdb >= 1.4; fetch_record_batch before
    return to_reader(_READ_ROWS) if to_reader else relation.fetch_record_batch(_READ_ROWS)


def _unique(names: list[str]) -> list[str]:
    """Result column names made unique (``a``, ``a_1``): rows are JSON objects keyed by name."""
    seen: set[str] = set()
    out = []
    for name in names:
        candidate, suffix = name, 0
        while candidate in seen:
            suffix += 1
            candidate = f"{name}_{suffix}"
        seen.add(candidate)
        out.append(candidate)
    return out


def _batches(reader: pa.RecordBatchReader, names: list[str]) -> Iterator[pa.RecordBatch]:
    for batch in reader:
        yield pa.RecordBatch.from_arrays(batch.columns, names=names)


def _too_large(what: str, cap: int) -> QueryResultTooLarge:
    return QueryResultTooLarge(f"the {what} is larger than the Query Service allows ({cap} bytes): select fewer "
                               "rows or columns, or aggregate", details={"max_bytes": cap})


def _inline(batches: Iterable[pa.RecordBatch], limit: int, max_bytes: int) -> _Outcome:
    """At most ``limit`` rows as JSON objects (``truncated`` when there were more), at most ``max_bytes``
    of them (``query_result_too_large``), counted batch by batch before anything is converted."""
    kept: list[pa.RecordBatch] = []
    count, size, truncated = 0, 0, False
    for batch in batches:
        room = limit - count
        if batch.num_rows > room:
            batch, truncated = batch.slice(0, room), True
        size += batch.nbytes
        if size > max_bytes:
            raise _too_large("answer", max_bytes)
        kept.append(batch)
        count += batch.num_rows
        if truncated:
            break
    rows = pa.Table.from_batches(kept, schema=kept[0].schema).to_pylist() if kept else []
    return _Outcome(rows=[{k: jsonable(v) for k, v in row.items()} for row in rows], row_count=len(rows),
                    truncated=truncated)


def _inline_sink(limit: int, max_bytes: int) -> Sink:
    def sink(names: list[str], types: list[str], reader: pa.RecordBatchReader) -> _Outcome:
        return _inline(_batches(reader, names), limit, max_bytes)

    return sink


class _ExportWriter:
    """Streams record batches into a temporary Parquet or CSV file, then streams it into the store.

    The file may not pass ``max_bytes`` (checked after every write; the process holds one batch,
    or one Parquet row group, beside it): past it, ``query_result_too_large`` and nothing is stored.
    """

    def __init__(self, fmt: str, schema: pa.Schema, max_bytes: int) -> None:
        self.fmt = fmt
        self.schema = schema
        self.max_bytes = max_bytes
        self.pending: list[pa.RecordBatch] = []  # parquet: the row group being gathered
        self.pending_bytes = self.pending_rows = 0
        self.file: BinaryIO = tempfile.TemporaryFile()
        try:
            self.writer: Any = pq.ParquetWriter(self.file, schema) if fmt == "parquet" else pacsv.CSVWriter(
                self.file, schema)
        except (pa.ArrowNotImplementedError, pa.ArrowInvalid) as exc:
            self.file.close()
            raise QueryError(f"the result cannot be written as {fmt}: {exc}; try parquet") from None

    def write(self, batch: pa.RecordBatch) -> None:
        if self.fmt == "parquet":
            self.pending.append(batch)
            self.pending_bytes += batch.nbytes
            self.pending_rows += batch.num_rows
            if self.pending_bytes >= _ROW_GROUP_BYTES or self.pending_rows >= _ROW_GROUP_ROWS:
                self._flush()
            return
        try:
            self.writer.write(batch)
        except (pa.ArrowNotImplementedError, pa.ArrowInvalid) as exc:
            raise QueryError(f"the result cannot be written as {self.fmt}: {exc}; try parquet") from None
        self._check()

    def _flush(self) -> None:
        if self.pending:
            self.writer.write_table(pa.Table.from_batches(self.pending, schema=self.schema))
            self.pending, self.pending_bytes, self.pending_rows = [], 0, 0
            self._check()

    def _check(self) -> None:
        if self.file.tell() > self.max_bytes:
            raise _too_large("export", self.max_bytes)

    def finish(self, store: ObjectStore, key: str) -> Export:
        try:
            self._flush()
            self.writer.close()
            self._check()
            size = self.file.tell()
            self.file.seek(0)
            put_file = getattr(store, "put_file", None)
            if callable(put_file):  # streamed: the file is never read whole into memory
                put_file(key, self.file)
            else:
                store.put(key, self.file.read())
        finally:
            self.file.close()
        return Export(key=key, format=self.fmt, bytes=size)

    def discard(self) -> None:
        """Drop a half-written file: the writer is closed first (else it writes its footer on collection)."""
        with contextlib.suppress(Exception):
            self.writer.close()
        self.file.close()


def _export_sink(store: ObjectStore, key: str, fmt: str, limit: int, inline_up_to: int | None, *,
                 inline_bytes: int = DEFAULT_MAX_RESULT_BYTES, max_bytes: int = DEFAULT_MAX_EXPORT_BYTES) -> Sink:
    """Rows up to ``inline_up_to`` (and ``inline_bytes``) stay inline; past either (or always, when
    ``inline_up_to`` is None) they go to a file of at most ``max_bytes``."""

    def sink(names: list[str], types: list[str], reader: pa.RecordBatchReader) -> _Outcome:
        held: list[pa.RecordBatch] = []
        held_bytes = 0
        writer: _ExportWriter | None = None
        count, truncated = 0, False
        try:
            for batch in _batches(reader, names):
                if count + batch.num_rows > limit:
                    batch, truncated = batch.slice(0, limit - count), True
                count += batch.num_rows
                fits = inline_up_to is not None and count <= inline_up_to and (not truncated or limit <= inline_up_to)
                if writer is None and fits and held_bytes + batch.nbytes <= inline_bytes:
                    held.append(batch)
                    held_bytes += batch.nbytes
                    if truncated:
                        break
                    continue
                if writer is None:
                    writer = _ExportWriter(fmt, batch.schema, max_bytes)
                    for earlier in held:
                        writer.write(earlier)
                    held = []
                writer.write(batch)
                if truncated:
                    break
            if writer is None and inline_up_to is not None:
                answered = _inline(held, inline_up_to, inline_bytes)
                answered.truncated = answered.truncated or truncated
                return answered
            if writer is None:
                schema = held[0].schema if held else _schema_of(reader, names)
                writer = _ExportWriter(fmt, schema, max_bytes)
                for earlier in held:
                    writer.write(earlier)
            export = writer.finish(store, key)
            writer = None
            return _Outcome(row_count=count, truncated=truncated, export=export)
        finally:
            if writer is not None:
                writer.discard()

    return sink


def _schema_of(reader: pa.RecordBatchReader, names: list[str]) -> pa.Schema:
    return pa.schema([pa.field(name, field.type) for name, field in zip(names, reader.schema, strict=True)])


def run_query(sql: str, views: Sequence[DatasetViewLike], *, store: ObjectStore | None, limit: int,
              timeout_s: float, memory_limit: str, threads: int, pg_conninfo: str | None = None,
              export_over: int | None = None, export_key: str | None = None,
              max_bytes: int = DEFAULT_MAX_RESULT_BYTES, export_max_bytes: int = DEFAULT_MAX_EXPORT_BYTES
              ) -> QueryResult:
    """Run one SELECT over ``views`` and answer at most ``limit`` rows (``truncated`` when there were more)
    of at most ``max_bytes`` (else ``query_result_too_large``).

    With ``export_over`` and ``export_key``: a result of more than ``export_over`` rows or
    ``max_bytes`` is not answered inline but streamed (in the same execution, up to ``limit``
    rows and ``export_max_bytes``) into Parquet at ``export_key`` in ``store``; ``result.export``
    says where, and ``result.rows`` is empty.
    """
    if limit < 0:
        raise ValueError("limit must be >= 0")
    if export_over is not None and export_key is not None:
        if store is None:
            raise PlatformError("an export needs an object store")
        sink = _export_sink(store, export_key, "parquet", limit, inline_up_to=export_over,
                            inline_bytes=max_bytes, max_bytes=export_max_bytes)
    else:
        sink = _inline_sink(limit, max_bytes)
    return _execute(sql, views, sink, store=store, timeout_s=timeout_s, memory_limit=memory_limit,
                    threads=threads, pg_conninfo=pg_conninfo)


def export_query(sql: str, views: Sequence[DatasetViewLike], *, store: ObjectStore, key: str, fmt: str,
                 limit: int, timeout_s: float, memory_limit: str, threads: int, pg_conninfo: str | None = None,
                 max_bytes: int = DEFAULT_MAX_EXPORT_BYTES) -> QueryResult:
    """Run one SELECT and write up to ``limit`` rows, at most ``max_bytes``, as ``fmt`` (parquet or csv)
    to ``key`` in ``store``.

    The rows stream from DuckDB through Arrow batches into a temporary file, so an export costs
    one batch (or row group) of memory beside DuckDB's own ``memory_limit``; the file streams
    into the store. Past ``max_bytes`` nothing is stored (``query_result_too_large``).
    """
    if fmt not in EXPORT_FORMATS:
        raise UserError(f"format must be one of {', '.join(EXPORT_FORMATS)}", code="invalid_format")
    return _execute(sql, views, _export_sink(store, key, fmt, limit, inline_up_to=None, max_bytes=max_bytes),
                    store=store,
                    timeout_s=timeout_s, memory_limit=memory_limit, threads=threads, pg_conninfo=pg_conninfo)


def jsonable(value: Any) -> Any:
    """A DuckDB/Arrow value as JSON: ISO 8601 times, fractional decimals as exact strings, bytes as 0x-hex."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, decimal.Decimal):  # HUGEINT and DECIMAL(p, 0) sums are exact ints; else exact text
        return int(value) if value.is_finite() and value.as_tuple().exponent == 0 else str(value)
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, (bytes, bytearray, memoryview)):
        return "0x" + bytes(value).hex()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(item) for item in value]
    return str(value)
