"""The Query Service engine (``tracecore.query.engine``) over hand-built dataset views.

Cold data is Parquet written with pyarrow into a local object store under ``tmp_path``; hot rows in
PostgreSQL and cold files in S3 need servers (tests/integration/query/test_engine.py). Hostile SQL
must end in a clear 4xx and read nothing: a hostile query is given a view whose file does not exist,
so that registering (let alone reading) anything would fail differently.
"""

from __future__ import annotations

import datetime as dt
import decimal
import io
import time
import uuid
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tracecore.data.datasets import DatasetView
from tracecore.exceptions import PlatformError, UserError
from tracecore.infra.storage import LocalObjectStore
from tracecore.query import engine as query

ORG = uuid.UUID("00000000-0000-0000-0000-00000000000a")
OTHER_ORG = uuid.UUID("00000000-0000-0000-0000-00000000000b")
COLUMNS = (("block_number", "int64"), ("address", "string"), ("value", "float64"))


@pytest.fixture
def store(tmp_path: Path) -> LocalObjectStore:
    return LocalObjectStore(tmp_path / "objects")


def put_parquet(store: LocalObjectStore, key: str, table: pa.Table) -> str:
    sink = io.BytesIO()
    pq.write_table(table, sink)
    store.put(key, sink.getvalue())
    return key


def rows_table(numbers: list[int], *, version: int | None = None) -> pa.Table:
    data: dict[str, Any] = {"block_number": pa.array(numbers, pa.int64()),
                            "address": [f"0x{n % 3}" for n in numbers], "value": [float(n) for n in numbers]}
    if version is not None:
        data["_version"] = pa.array([version] * len(numbers), pa.int32())
    return pa.table(data)


def make_view(name: str = "transfers", *, keys: tuple[str, ...] = (), version: int | None = 1,
              hot_table: str | None = None, pii: bool = False, org: uuid.UUID = ORG,
              columns: tuple[tuple[str, str], ...] = COLUMNS) -> DatasetView:
    return DatasetView(dataset_id=uuid.uuid4(), org_id=org, name=name, version=version, parquet_keys=keys,
                       hot_table=hot_table, columns=columns, pii=pii)


@pytest.fixture
def transfers(store: LocalObjectStore) -> DatasetView:
    return make_view(keys=(put_parquet(store, "datasets/t/v1/part-0.parquet", rows_table(list(range(10)))),))


def run(sql: str, views: list[DatasetView], store: LocalObjectStore | None, **options: Any) -> query.QueryResult:
    settings: dict[str, Any] = {"limit": 1000, "timeout_s": 10.0, "memory_limit": "256MB", "threads": 1}
    settings.update(options)
    return query.run_query(sql, views, store=store, **settings)


def test_a_select_over_a_dataset_answers_columns_and_rows(store: LocalObjectStore, transfers: DatasetView) -> None:
    result = run("SELECT address, count(*) AS n, sum(value) AS total FROM transfers GROUP BY address ORDER BY address",
                 [transfers], store)
    assert [c["name"] for c in result.columns] == ["address", "n", "total"]
    assert result.columns[1]["type"] == "BIGINT"
    assert result.rows == [{"address": "0x0", "n": 4, "total": 18.0}, {"address": "0x1", "n": 3, "total": 12.0},
                           {"address": "0x2", "n": 3, "total": 15.0}]
    assert result.row_count == 3 and result.truncated is False and result.elapsed_ms > 0
    assert [view.name for view in result.views] == ["transfers"]


def test_rows_are_capped_and_the_answer_says_truncated(store: LocalObjectStore, transfers: DatasetView) -> None:
    result = run("SELECT block_number FROM transfers ORDER BY block_number", [transfers], store, limit=4)
    assert result.rows == [{"block_number": n} for n in range(4)]
    assert result.row_count == 4 and result.truncated is True
    exact = run("SELECT block_number FROM transfers", [transfers], store, limit=10)
    assert exact.row_count == 10 and exact.truncated is False


@pytest.fixture
def secret_files(tmp_path: Path) -> dict[str, Path]:
    """Files outside the store that hostile SQL tries to read."""
    outside = tmp_path / "outside"
    outside.mkdir()
    csv = outside / "secret.csv"
    csv.write_text("token\nsupersecret-value\n")
    parquet = outside / "secret.parquet"
    pq.write_table(pa.table({"token": ["supersecret-value"]}), parquet)
    return {"csv": csv, "parquet": parquet, "dir": outside}


HOSTILE: list[tuple[str, str, int]] = [
    ("SELECT * FROM read_csv('/etc/passwd')", "forbidden_function", 403),
    ("SELECT * FROM read_csv('{csv}')", "forbidden_function", 403),
    ("SELECT * FROM read_text('{csv}')", "forbidden_function", 403),
    ("SELECT * FROM read_blob('{csv}')", "forbidden_function", 403),
    ("SELECT * FROM sniff_csv('{csv}')", "forbidden_function", 403),
    ("SELECT * FROM glob('{dir}/*')", "forbidden_function", 403),
    ("SELECT * FROM read_parquet('{parquet}')", "forbidden_function", 403),
    ("SELECT * FROM '{parquet}'", "forbidden_function", 403),
    ("WITH leak AS (SELECT * FROM read_csv('{csv}')) SELECT * FROM leak", "forbidden_function", 403),
    ("SELECT * FROM transfers WHERE address IN (SELECT token FROM read_csv('{csv}'))", "forbidden_function", 403),
    ("SELECT * FROM query('SELECT * FROM read_csv(''{csv}'')')", "forbidden_function", 403),
    ("SELECT * FROM duckdb_settings()", "forbidden_function", 403),
    ("SELECT current_setting('temp_directory')", "forbidden_function", 403),
    ("SELECT * FROM duckdb_settings", "query_error", 400),
    ("SELECT * FROM information_schema.tables", "query_error", 400),
    ("ATTACH '{dir}/x.db' AS x", "not_select", 400),
    ("COPY (SELECT * FROM transfers) TO '{dir}/out.csv'", "not_select", 400),
    ("EXPORT DATABASE '{dir}/dump'", "not_select", 400),
    ("INSTALL httpfs", "not_select", 400),
    ("LOAD httpfs", "not_select", 400),
    ("SET threads = 64", "not_select", 400),
    ("RESET memory_limit", "not_select", 400),
    ("PRAGMA version", "not_select", 400),
    ("CREATE TABLE t AS SELECT 1", "not_select", 400),
    ("INSERT INTO transfers VALUES (1, 'x', 1.0)", "not_select", 400),
    ("UPDATE transfers SET value = 0", "not_select", 400),
    ("DELETE FROM transfers", "not_select", 400),
    ("DROP VIEW transfers", "not_select", 400),
    ("SELECT 1; SELECT * FROM read_csv('{csv}')", "not_select", 400),
    ("SELECT 1; DROP VIEW transfers", "not_select", 400),
    ("", "not_select", 400),
]


@pytest.mark.parametrize(("template", "code", "status"), HOSTILE, ids=[case[0][:48] for case in HOSTILE])
def test_hostile_sql_is_a_clear_4xx_and_reads_nothing(store: LocalObjectStore, secret_files: dict[str, Path],
                                                      template: str, code: str, status: int) -> None:
    sql = template.format(**{name: str(path) for name, path in secret_files.items()})
    # The view's file does not exist: registering it would raise PlatformError, not a refusal.
    unreadable = make_view(keys=("datasets/missing/part-0.parquet",))
    with pytest.raises(UserError) as caught:
        run(sql, [unreadable], store)
    assert (caught.value.code, caught.value.http_status) == (code, status), caught.value.message
    assert "supersecret" not in caught.value.message
    assert not (secret_files["dir"] / "out.csv").exists() and not (secret_files["dir"] / "dump").exists()


def test_a_cte_may_shadow_nothing_outside_its_scope(store: LocalObjectStore, transfers: DatasetView) -> None:
    ok = run("WITH recent AS (SELECT * FROM transfers WHERE block_number > 7) SELECT count(*) AS n FROM recent",
             [transfers], store)
    assert ok.rows == [{"n": 2}]
    escaping = "SELECT * FROM (WITH duckdb_settings AS (SELECT 1 AS x) SELECT * FROM duckdb_settings), duckdb_settings"
    with pytest.raises(query.QueryError, match="duckdb_settings does not exist"):
        run(escaping, [transfers], store)


def test_the_locked_database_reads_only_the_versions_files(store: LocalObjectStore, transfers: DatasetView,
                                                          secret_files: dict[str, Path]) -> None:
    """Beneath the policy, DuckDB itself: after the lock only the registered files are readable."""
    sibling = put_parquet(store, "datasets/t/v0/part-0.parquet", rows_table([99]))
    con = duckdb.connect(":memory:", config=query._connect_config("64MB", 1))
    try:
        allowed = query._register(con, [transfers], store=store, pg_conninfo=None, deadline=time.monotonic() + 10)
        query._lock(con, "64MB", 1, allowed)
        assert con.execute("SELECT count(*) FROM transfers").fetchall() == [(10,)]
        assert con.execute(f"SELECT count(*) FROM read_parquet('{allowed[0]}')").fetchall() == [(10,)]
        for hostile in (f"SELECT * FROM read_csv('{secret_files['csv']}')",
                        f"SELECT * FROM read_parquet('{store.path(sibling)}')",
                        f"SELECT * FROM glob('{store.root}/*')", "SET enable_external_access = true",
                        "SET allowed_paths = ['/']", "INSTALL httpfs"):
            with pytest.raises(duckdb.Error):
                con.execute(hostile).fetchall()
    finally:
        con.close()


def test_another_orgs_dataset_is_an_unknown_table(store: LocalObjectStore, transfers: DatasetView) -> None:
    with pytest.raises(query.QueryError) as caught:
        run("SELECT * FROM rival__transfers", [transfers], store)
    assert caught.value.http_status == 400 and caught.value.code == "query_error"
    assert "rival__transfers does not exist" in caught.value.message


def test_a_granted_dataset_of_an_org_with_a_dotted_name_is_a_table(store: LocalObjectStore) -> None:
    key = put_parquet(store, "datasets/g/v1/part-0.parquet", rows_table([1, 2]))
    granted = make_view("acme.io__transfers", keys=(key,), org=OTHER_ORG)
    assert run('SELECT count(*) AS n FROM "acme.io__transfers"', [granted], store).rows == [{"n": 2}]


def test_user_sql_errors_carry_duckdbs_message_without_host_paths(store: LocalObjectStore,
                                                                  transfers: DatasetView) -> None:
    with pytest.raises(query.QueryError, match='Referenced column "nope" not found'):
        run("SELECT nope FROM transfers", [transfers], store)
    with pytest.raises(query.QueryError, match="syntax error"):
        run("SELEC 1", [transfers], store)
    with pytest.raises(PlatformError) as missing:
        run("SELECT * FROM transfers", [make_view(keys=("datasets/missing/part-0.parquet",))], store)
    assert str(store.root) not in missing.value.message and "transfers" in missing.value.message
    cleaned = query.clean_message(f"IO Error: {store.root}/datasets/x.parquet", [(str(store.root), "<store>")])
    assert cleaned == "IO Error: <store>/datasets/x.parquet"


def test_only_the_pinned_versions_rows_are_visible(store: LocalObjectStore) -> None:
    first = put_parquet(store, "datasets/t/v1/part-0.parquet", rows_table([1, 2, 3]))
    second = put_parquet(store, "datasets/t/v2/part-0.parquet", rows_table([10, 20]))
    sql = "SELECT list(block_number ORDER BY block_number) AS blocks FROM transfers"
    assert run(sql, [make_view(keys=(first,), version=1)], store).rows == [{"blocks": [1, 2, 3]}]
    assert run(sql, [make_view(keys=(second,), version=2)], store).rows == [{"blocks": [10, 20]}]


def test_a_memory_bomb_dies_at_the_memory_limit_not_the_worker(store: LocalObjectStore,
                                                                transfers: DatasetView) -> None:
    for bomb in ("SELECT list(range) FROM range(10000000000)",
                 "SELECT length(string_agg(repeat('x', 1000) || a::VARCHAR, ',')) FROM range(100000) r(a), "
                 "range(1000) s(b)"):
        with pytest.raises(query.QueryResourceLimit) as caught:
            run(bomb, [transfers], store, memory_limit="64MB", timeout_s=60)
        assert caught.value.http_status == 422 and caught.value.code == "query_resource_limit"
    assert run("SELECT count(*) AS n FROM transfers", [transfers], store).rows == [{"n": 10}]  # still serving


def test_a_query_that_never_ends_is_interrupted_at_the_timeout(store: LocalObjectStore, transfers: DatasetView) -> None:
    with pytest.raises(query.QueryTimeout) as caught:  # uninterrupted it runs for hours
        run("SELECT count(*) FROM range(10000000000000)", [transfers], store, timeout_s=1.0, threads=2)
    assert caught.value.http_status == 408 and caught.value.code == "query_timeout"
    # The deadline's timer interrupted DuckDB (its InterruptException), at the 1 s it was given.
    assert caught.value.message == "the query did not finish within 1 s and was interrupted"
    assert caught.value.details == {"timeout_s": 1.0}
    assert run("SELECT count(*) AS n FROM transfers", [transfers], store).rows == [{"n": 10}]


def test_only_referenced_datasets_are_read(store: LocalObjectStore, transfers: DatasetView) -> None:
    people = make_view("people", keys=("datasets/missing/people.parquet",), pii=True)
    result = run("WITH people AS (SELECT 1 AS x) SELECT count(*) AS n FROM transfers, people", [transfers, people],
                 store)
    assert result.rows == [{"n": 10}] and [view.name for view in result.views] == ["transfers"]


def test_exports_write_parquet_or_csv_to_the_store(store: LocalObjectStore, transfers: DatasetView) -> None:
    options: dict[str, Any] = {"timeout_s": 10.0, "memory_limit": "256MB", "threads": 1}
    parquet = query.export_query("SELECT * FROM transfers ORDER BY block_number", [transfers], store=store,
                                 key="exports/o/1.parquet", fmt="parquet", limit=7, **options)
    assert parquet.export is not None and parquet.row_count == 7 and parquet.truncated is True
    assert pq.read_table(io.BytesIO(store.get("exports/o/1.parquet"))).column("block_number").to_pylist() == list(
        range(7))
    csv = query.export_query("SELECT block_number, address FROM transfers ORDER BY 1 LIMIT 2", [transfers],
                             store=store, key="exports/o/2.csv", fmt="csv", limit=100, **options)
    assert store.get("exports/o/2.csv").decode().splitlines() == ['"block_number","address"', '0,"0x0"', '1,"0x1"']
    assert csv.truncated is False and csv.export is not None and csv.export.bytes > 0


def test_a_large_json_result_spills_into_parquet_in_the_same_run(store: LocalObjectStore,
                                                                  transfers: DatasetView) -> None:
    small = run("SELECT * FROM transfers", [transfers], store, export_over=20, export_key="exports/o/small.parquet")
    assert small.export is None and small.row_count == 10 and not store.exists("exports/o/small.parquet")
    big = run("SELECT * FROM range(150000)", [transfers], store, limit=100_000, export_over=20,
              export_key="exports/o/big.parquet")
    assert big.export is not None and big.rows == [] and big.row_count == 100_000 and big.truncated is True
    assert pq.read_table(io.BytesIO(store.get("exports/o/big.parquet"))).num_rows == 100_000


def test_saved_queries_are_judged_without_data() -> None:
    query.check_statement("SELECT * FROM anything_at_all")
    with pytest.raises(query.NotSelect):
        query.check_statement("DROP TABLE x")
    with pytest.raises(query.ForbiddenFunction):
        query.check_statement("SELECT * FROM read_csv('/etc/passwd')")


def test_values_become_json() -> None:
    assert query.jsonable(decimal.Decimal("12345678901234567890.5")) == "12345678901234567890.5"
    assert query.jsonable(decimal.Decimal("115792089237316195423570985008687907853269984665640564039457")) == (
        115792089237316195423570985008687907853269984665640564039457)
    assert query.jsonable(b"\x01\xff") == "0x01ff"
    assert query.jsonable(dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=dt.UTC)) == "2024-01-02T03:04:05+00:00"
    assert query.jsonable({"a": [float("nan"), 1.5]}) == {"a": [None, 1.5]}
    result = query.run_query("SELECT 1 AS a, 2 AS a", [], store=None, limit=10, timeout_s=5, memory_limit="64MB",
                             threads=1)
    assert result.rows == [{"a": 1, "a_1": 2}]
