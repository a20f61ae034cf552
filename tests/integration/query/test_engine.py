"""The Query Service engine (``tracecore.query.engine``) over servers: cold files in S3, hot rows in PostgreSQL.

Hot rows live in a real PostgreSQL table (the session's database); S3 is the session's SeaweedFS.
The views and Parquet helpers are the unit suite's (tests/unit/query/test_engine.py).
"""

from __future__ import annotations

import io
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.unit.query.test_engine import ORG, OTHER_ORG, make_view, put_parquet, rows_table, run, store
from tracecore.data.datasets import DatasetView
from tracecore.db.engine import libpq_url
from tracecore.infra import storage
from tracecore.infra.storage import LocalObjectStore, S3ObjectStore
from tracecore.query import engine as query
from tracecore.settings import Settings

__all__ = ["store"]  # the unit suite's fixture, used here


def test_cold_files_in_s3_are_scanned_through_pyarrow(s3_server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    storage.reset_clients()
    s3 = S3ObjectStore(s3_server.bucket, f"tests/query/{uuid.uuid4().hex[:8]}", endpoint_url=s3_server.endpoint_url,
                       region=s3_server.region)
    sink = io.BytesIO()
    pq.write_table(rows_table([4, 5, 6]), sink)
    s3.put("datasets/t/v1/part-0.parquet", sink.getvalue())
    view = make_view(keys=("datasets/t/v1/part-0.parquet",))
    result = query.run_query("SELECT sum(block_number) AS s FROM transfers", [view], store=s3, limit=10,
                             timeout_s=30, memory_limit="64MB", threads=1)
    assert result.rows == [{"s": 15}]
    storage.reset_clients()


# -- hot rows (PostgreSQL) ---------------------------------------------------------------


@pytest.fixture
def hot_table(services: Settings) -> Iterator[Callable[[list[tuple[int, uuid.UUID, int]]], str]]:
    """A hot table shaped like the datasets' ones: the schema's columns + org_id, _version, _inserted_at."""
    url = libpq_url(services.database_url or "")
    name = f"hot_{uuid.uuid4().hex[:12]}"

    def make(rows: list[tuple[int, uuid.UUID, int]]) -> str:
        with psycopg.connect(url, autocommit=True) as connection:
            connection.execute(f'CREATE TABLE "{name}" (block_number bigint, address text, value double precision, '
                               "org_id uuid NOT NULL, _version integer NOT NULL, "
                               "_inserted_at timestamptz NOT NULL DEFAULT now())")
            with connection.cursor() as cursor:
                cursor.executemany(f'INSERT INTO "{name}" (block_number, address, value, org_id, _version) '
                                   "VALUES (%s, %s, %s, %s, %s)",
                                   [(n, f"0x{n % 3}", float(n), org, version) for n, org, version in rows])
        return name

    yield make
    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute(f'DROP TABLE IF EXISTS "{name}"')


def hot_blocks(sql_view: DatasetView, store: LocalObjectStore | None, services: Settings) -> list[int]:
    result = run("SELECT block_number FROM transfers ORDER BY block_number", [sql_view], store,
                 pg_conninfo=services.database_url)
    return [row["block_number"] for row in result.rows]


def test_cold_and_hot_rows_are_one_view_and_no_row_counts_twice(store: LocalObjectStore, services: Settings,
                                                                 hot_table: Callable[..., str]) -> None:
    # Compaction moved versions 1-2 into Parquet (with their _version); their hot copies remain.
    cold = put_parquet(store, "datasets/t/c/part-0.parquet",
                       pa.concat_tables([rows_table([1, 2], version=1), rows_table([3], version=2)]))
    table = hot_table([(1, ORG, 1), (2, ORG, 1), (3, ORG, 2), (4, ORG, 3), (5, ORG, 3), (6, ORG, 4),
                       (7, OTHER_ORG, 3)])
    view = make_view(keys=(cold,), version=3, hot_table=table)
    assert hot_blocks(view, store, services) == [1, 2, 3, 4, 5]  # 6 is after the pin, 7 another org's
    counted = run("SELECT count(*) AS n, count(DISTINCT block_number) AS d FROM transfers", [view], store,
                  pg_conninfo=services.database_url)
    assert counted.rows == [{"n": 5, "d": 5}]


def test_cold_files_without_versions_are_a_full_snapshot(store: LocalObjectStore, services: Settings,
                                                         hot_table: Callable[..., str]) -> None:
    cold = put_parquet(store, "datasets/t/s/part-0.parquet", rows_table([1, 2, 3]))
    table = hot_table([(2, ORG, 1), (3, ORG, 2)])
    assert hot_blocks(make_view(keys=(cold,), version=2, hot_table=table), store, services) == [1, 2, 3]


def test_a_buffered_dataset_shows_its_hot_rows_up_to_its_version(services: Settings,
                                                                 hot_table: Callable[..., str]) -> None:
    table = hot_table([(1, ORG, 1), (2, ORG, 2), (3, ORG, 3), (4, OTHER_ORG, 1)])
    assert hot_blocks(make_view(version=2, hot_table=table), None, services) == [1, 2]
    assert hot_blocks(make_view(version=3, hot_table=table), None, services) == [1, 2, 3]
    assert hot_blocks(make_view(version=None, hot_table=table), None, services) == []
    assert hot_blocks(make_view(version=5, hot_table=table, org=OTHER_ORG), None, services) == [4]
