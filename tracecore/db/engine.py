"""The one SQLAlchemy handle every process shares, and the column helpers the models use.

Flask-SQLAlchemy scopes the session to the app context, which workers also enter, so
web requests and Celery tasks use the same session rules.
"""

from __future__ import annotations

import atexit
import os
import uuid
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any, cast

import psycopg
from flask_sqlalchemy import SQLAlchemy
from psycopg import OperationalError
from psycopg.pq import ExecStatus, TransactionStatus
from sqlalchemy import DateTime, Engine, MetaData, TextClause, Uuid, create_engine, event, func
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.pool import PoolProxiedConnection

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


db = SQLAlchemy(model_class=Base, engine_options={"pool_pre_ping": True})


def uuid_pk() -> Mapped[uuid.UUID]:
    return mapped_column(Uuid, primary_key=True, default=uuid.uuid4)


def created_at() -> Mapped[datetime]:
    return mapped_column(DateTime(timezone=True), nullable=False, server_default=func.now())


def sqlalchemy_url(url: str) -> str:
    """Pin psycopg 3 as the driver whatever scheme the operator wrote."""
    for prefix in ("postgresql+psycopg://", "postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    raise ValueError(f"not a PostgreSQL URL: {url!r}")


def libpq_url(url: str) -> str:
    """The same URL for psycopg/libpq directly (no SQLAlchemy driver suffix)."""
    return sqlalchemy_url(url).replace("postgresql+psycopg://", "postgresql://", 1)


_autocommit_engines: dict[tuple[str, int, bool], Engine] = {}
_rendered_urls: weakref.WeakKeyDictionary[Engine, str] = weakref.WeakKeyDictionary()


def autocommit_engine(*, durable: bool = True) -> Engine:
    """An engine for single-statement hot paths: autocommit (no BEGIN/COMMIT round trips) and
    no pre-ping (a dead pooled connection shows up as an error on a broken connection, which
    :func:`execute_one` retries once on a fresh one).

    ``durable=False`` sets ``synchronous_commit = off``: the commit does not wait for the WAL
    flush. The worker's lease take and close use it: a commit lost in a crash leaves at worst an
    expired lease, which the reaper hands back to the queue (delivery is at least once anyway).
    Keyed by URL (per-test apps share it; one engine per app would exhaust connections) and by
    process (a forked worker child never shares its parent's sockets).
    """
    app_engine = db.engine
    url = _rendered_urls.get(app_engine)
    if url is None:  # rendering (which URL's own hash does too) cost as much as a statement's other work
        url = _rendered_urls[app_engine] = app_engine.url.render_as_string(hide_password=False)
    key = (url, os.getpid(), durable)
    engine = _autocommit_engines.get(key)
    if engine is None:
        engine = create_engine(app_engine.url, isolation_level="AUTOCOMMIT", pool_size=4, max_overflow=16)
        if not durable:
            event.listen(engine, "connect", _no_sync_commit)
        _autocommit_engines[key] = engine
    return engine


_psycopg_sql: dict[TextClause, str] = {}


def _compiled(statement: TextClause, engine: Engine) -> str:
    """The statement in psycopg's paramstyle, compiled once."""
    sql = _psycopg_sql.get(statement)
    if sql is None:
        sql = _psycopg_sql[statement] = str(statement.compile(dialect=engine.dialect))
    return sql


def _first_row(cursor: psycopg.Cursor[Any]) -> dict[str, Any] | None:
    """The first row as a dict, None if there is none or the statement returns no rows.

    Names come straight from the result (as psycopg's ``dict_row`` reads them): ``description``
    would build a Column object per column on every access, a tenth of a millisecond on a
    statement as wide as the lease's.
    """
    result = cursor.pgresult
    if result is None or result.status != ExecStatus.TUPLES_OK:
        return None
    row = cursor.fetchone()
    if row is None:
        return None
    return {result.fname(index).decode(): value for index, value in enumerate(row)}  # type: ignore[union-attr]


def _driver(pooled: PoolProxiedConnection) -> psycopg.Connection[Any]:
    """The psycopg connection under a pooled one (every engine here is psycopg's)."""
    return cast("psycopg.Connection[Any]", pooled.dbapi_connection)


def execute_one(statement: TextClause, params: dict[str, Any], *, durable: bool = True) -> dict[str, Any] | None:
    """Run one statement as its own transaction on :func:`autocommit_engine`; answers its first
    row as a dict, if it returns rows.

    The statement goes straight to the psycopg connection (compiled once to psycopg's paramstyle;
    psycopg prepares it server-side after a few uses): SQLAlchemy's per-execution work is a large
    part of a sub-millisecond statement. A pooled connection found dead is replaced and the
    statement sent once more.
    """
    engine = autocommit_engine(durable=durable)
    sql = _compiled(statement, engine)
    for retry in (False, True):
        connection = engine.raw_connection()
        try:
            with _driver(connection).cursor() as cursor:
                cursor.execute(sql, params)
                return _first_row(cursor)
        except OperationalError:
            if retry or not _driver(connection).broken:
                raise
            connection.invalidate()
            engine.dispose()  # its siblings in the pool died with it (a database restart): start afresh
        finally:
            connection.close()  # back to the pool (an invalidated one is discarded)
    raise AssertionError("unreachable")


class Batches:
    """A transaction on a pooled autocommit connection whose statements go out in batches, one
    round trip each (psycopg's pipeline mode): BEGIN rides with the first batch, COMMIT with the
    one sent by :meth:`commit`. Between two batches the caller may act on what the first answered
    while the transaction, and the locks it took, stay open: keep that action short and bounded.

    No server-side idle limit guards the gap: PostgreSQL 16 was seen not to arm
    idle_in_transaction_session_timeout after a pipelined batch."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._pooled = engine.raw_connection()
        self._begun = False

    @property
    def _connection(self) -> psycopg.Connection[Any]:
        return _driver(self._pooled)

    def send(self, *statements: TextClause, params: dict[str, Any]) -> dict[str, Any] | None:
        """Run ``statements`` in order; answers the last one's first row."""
        return self._batch(statements, params, commit=False)

    def commit(self, *statements: TextClause, params: dict[str, Any]) -> dict[str, Any] | None:
        """Run ``statements``, then COMMIT, in one round trip; answers the last one's first row."""
        return self._batch(statements, params, commit=True)

    def _batch(self, statements: tuple[TextClause, ...], params: dict[str, Any], *,
               commit: bool) -> dict[str, Any] | None:
        first = not self._begun
        for retry in (False, True):
            connection = self._connection
            try:
                with connection.pipeline():
                    if first:
                        connection.execute("BEGIN")
                    cursors = [connection.execute(_compiled(statement, self._engine), params)
                               for statement in statements]
                    if commit:
                        connection.execute("COMMIT")
                self._begun = not commit
                return _first_row(cursors[-1]) if cursors else None
            except OperationalError:
                # Only the first batch may go again on a fresh connection: nothing has happened yet.
                if retry or not first or not connection.broken:
                    raise
                self._pooled.invalidate()
                self._engine.dispose()
                self._pooled = self._engine.raw_connection()
        raise AssertionError("unreachable")

    def close(self) -> None:
        """Roll back whatever was not committed and give the connection back to the pool."""
        try:
            connection = self._connection
            if connection.broken:
                self._pooled.invalidate()
            elif connection.info.transaction_status != TransactionStatus.IDLE:
                connection.rollback()
        finally:
            self._pooled.close()


@contextmanager
def batches(*, durable: bool = True) -> Iterator[Batches]:
    """A :class:`Batches` transaction on :func:`autocommit_engine`; rolled back unless committed."""
    transaction = Batches(autocommit_engine(durable=durable))
    try:
        yield transaction
    finally:
        transaction.close()


@atexit.register
def _dispose_autocommit_engines() -> None:
    for engine in _autocommit_engines.values():
        engine.dispose()


def _no_sync_commit(dbapi_connection: Any, _record: Any) -> None:
    autocommit = dbapi_connection.autocommit
    dbapi_connection.autocommit = True
    dbapi_connection.execute("SET synchronous_commit = off")
    dbapi_connection.autocommit = autocommit
