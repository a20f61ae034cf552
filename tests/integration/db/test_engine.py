"""tracecore.db.engine's hot-path helpers over the real PostgreSQL: Batches transactions."""

from __future__ import annotations

import uuid

import pytest
from flask import Flask
from sqlalchemy import text

from tracecore.db.engine import batches, execute_one

_MAKE = text("CREATE TABLE IF NOT EXISTS batches_probe (id uuid PRIMARY KEY, n int)")
_INSERT = text("INSERT INTO batches_probe (id, n) VALUES (:id, :n) RETURNING n")
_COUNT = text("SELECT count(*) AS rows FROM batches_probe WHERE id = :id")
_LOCK = text("SELECT pg_advisory_xact_lock(hashtextextended(CAST(:id AS text), 99))")
_TRY_LOCK = text("SELECT pg_try_advisory_xact_lock(hashtextextended(CAST(:id AS text), 99)) AS free")


@pytest.fixture(autouse=True)
def probe_table(app: Flask) -> None:
    execute_one(_MAKE, {})


def rows(row_id: uuid.UUID) -> int:
    found = execute_one(_COUNT, {"id": row_id})
    assert found is not None
    return int(found["rows"])


def test_batches_answer_rows_and_commit_together() -> None:
    row_id = uuid.uuid4()
    with batches() as transaction:
        assert transaction.send(_LOCK, _INSERT, params={"id": row_id, "n": 7}) == {"n": 7}
        assert rows(row_id) == 0  # not visible before the commit
        assert transaction.commit(_COUNT, params={"id": row_id}) == {"rows": 1}
    assert rows(row_id) == 1


def test_what_is_not_committed_is_rolled_back_and_its_locks_freed() -> None:
    row_id = uuid.uuid4()
    with pytest.raises(RuntimeError), batches() as transaction:
        transaction.send(_LOCK, _INSERT, params={"id": row_id, "n": 1})
        raise RuntimeError("the caller failed between two batches")
    assert rows(row_id) == 0
    assert execute_one(_TRY_LOCK, {"id": row_id}) == {"free": True}
