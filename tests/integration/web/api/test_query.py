"""The Query Service through the API: POST /v1/query, POST /v1/task/query, saved queries, downloads.

Datasets are real (``tracecore.data.datasets``: declared, versioned, granted); their Parquet files are
written into the test's object store and buffered datasets' rows into their hot tables.
"""

from __future__ import annotations

import hashlib
import io
import uuid
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select, text

from tests.conftest import Tenant
from tracecore.dags import catalog as dags
from tracecore.data import admin as dataset_admin
from tracecore.data import datasets
from tracecore.db.engine import db
from tracecore.execution import lease, runs, tokens
from tracecore.infra.storage import object_store
from tracecore.query.saved import Download
from tracecore.settings import SETTINGS_KEY, Settings, configure, current_settings
from tracecore.tenancy.audit import AuditLog
from tracecore.tenancy.orgs import User

SCHEMA = [{"name": "block_number", "type": "int64", "nullable": False},
          {"name": "address", "type": "string", "nullable": True}]


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """Small limits so that spills, timeouts and memory refusals are quick to reach."""
    return configure(replace(settings, query_export_threshold=50, query_row_limit=10_000, query_timeout=10.0,
                             query_memory_limit="128MB", query_threads=1))


def publish_parquet(app: Flask, org_id: uuid.UUID, name: str, blocks: list[int], *, pii: bool = False) -> int:
    """A new version of a derived dataset holding exactly ``blocks``; answers its number."""
    table = pa.table({"block_number": pa.array(blocks, pa.int64()), "address": [f"0x{b % 4}" for b in blocks]})
    sink = io.BytesIO()
    pq.write_table(table, sink)
    data = sink.getvalue()
    key = f"datasets/{org_id}/{name}/{uuid.uuid4()}.parquet"
    object_store(current_settings(app)).put(key, data)
    dataset = datasets.declare_dataset(org_id, name, "derived", SCHEMA, pii=pii)
    version = datasets.add_version(dataset, {"files": [{"key": key, "sha256": hashlib.sha256(data).hexdigest(),
                                                        "rows": len(blocks), "bytes": len(data)}]}, mode="replace")
    db.session.commit()
    return version.version


def publish_hot(org_id: uuid.UUID, name: str, blocks: list[int], *, pii: bool = False) -> int:
    """A new version of a buffered dataset whose publish inserted ``blocks`` into its hot table."""
    dataset = datasets.declare_dataset(org_id, name, "buffered", SCHEMA, unique_key=["block_number"], pii=pii)
    version = datasets.add_version(dataset, {"files": []}, metadata={"inserted": len(blocks)})
    table = datasets.hot_table_name(dataset)
    for block in blocks:
        db.session.execute(text(f'INSERT INTO "{table}" (block_number, address, org_id, _version) '
                                "VALUES (:b, :a, :o, :v)"), {"b": block, "a": f"0x{block % 4}", "o": org_id,
                                                             "v": version.version})
    db.session.commit()
    return version.version


def post_query(client: FlaskClient, tenant: Tenant, sql: str, role: str = "reader", **extra: Any) -> Any:
    return client.post("/v1/query", json={"sql": sql, **extra}, headers=tenant.headers(role))


def blocks_of(response: Any) -> list[int]:
    assert response.status_code == 200, response.json
    return [row["block_number"] for row in response.json["rows"]]


def test_a_reader_queries_the_orgs_datasets(app: Flask, client: FlaskClient, tenant: Tenant) -> None:
    publish_parquet(app, tenant.org_id, "transfers", [1, 2, 3])
    response = post_query(client, tenant, "SELECT address, count(*) AS n FROM transfers GROUP BY 1 ORDER BY 1")
    assert response.status_code == 200, response.json
    body = response.json
    assert body["columns"] == [{"name": "address", "type": "VARCHAR"}, {"name": "n", "type": "BIGINT"}]
    assert body["rows"] == [{"address": "0x1", "n": 1}, {"address": "0x2", "n": 1}, {"address": "0x3", "n": 1}]
    assert body["row_count"] == 3 and body["truncated"] is False and body["elapsed_ms"] > 0
    limited = post_query(client, tenant, "SELECT * FROM transfers ORDER BY 1", limit=2)
    assert blocks_of(limited) == [1, 2] and limited.json["truncated"] is True
    assert client.post("/v1/query", json={"sql": "SELECT 1"}).status_code == 401


@pytest.mark.parametrize(("sql", "code", "status"), [
    ("SELECT * FROM read_csv('/etc/passwd')", "forbidden_function", 403),
    ("WITH x AS (SELECT * FROM glob('/*')) SELECT * FROM x", "forbidden_function", 403),
    ("SELECT * FROM read_parquet('/tmp/elsewhere.parquet')", "forbidden_function", 403),
    ("PRAGMA version", "not_select", 400),
    ("ATTACH '/tmp/x.db'", "not_select", 400),
    ("COPY transfers TO '/tmp/out.csv'", "not_select", 400),
    ("SELECT 1; SELECT 2", "not_select", 400),
    ("DELETE FROM transfers", "not_select", 400),
    ("SELECT nope FROM transfers", "query_error", 400),
])
def test_hostile_sql_answers_a_clear_4xx(app: Flask, client: FlaskClient, tenant: Tenant, sql: str, code: str,
                                         status: int) -> None:
    publish_parquet(app, tenant.org_id, "transfers", [1])
    response = post_query(client, tenant, sql)
    assert response.status_code == status, response.json
    assert response.json["error"]["code"] == code
    assert db.session.scalar(select(AuditLog.id).where(AuditLog.action == "dataset.read_pii")) is None


def test_bad_bodies_answer_400(client: FlaskClient, tenant: Tenant) -> None:
    for body in ({}, {"sql": ""}, {"sql": "SELECT 1", "format": "xlsx"}, {"sql": "SELECT 1", "limit": 0}):
        assert client.post("/v1/query", json=body, headers=tenant.headers()).status_code == 400, body


def test_another_orgs_dataset_is_unknown_until_granted(app: Flask, client: FlaskClient,
                                                       make_tenant: Callable[[str], Tenant]) -> None:
    owner, reader = make_tenant("owner"), make_tenant("reader")
    publish_parquet(app, owner.org_id, "transfers", [7, 8])
    for name in ("transfers", "owner__transfers"):
        refused = post_query(client, reader, f"SELECT * FROM {name}")
        assert refused.status_code == 400 and refused.json["error"]["code"] == "query_error"
        assert f"{name} does not exist" in refused.json["error"]["message"]
    dataset_admin.grant_dataset(owner.org_id, "transfers", "reader", granted_by=None)
    db.session.commit()
    assert blocks_of(post_query(client, reader, "SELECT * FROM owner__transfers ORDER BY 1")) == [7, 8]


def test_reading_pii_needs_a_grant_and_is_audited(app: Flask, client: FlaskClient, tenant: Tenant) -> None:
    publish_parquet(app, tenant.org_id, "people", [1, 2, 3], pii=True)
    publish_parquet(app, tenant.org_id, "transfers", [5])
    sql = "SELECT * FROM people ORDER BY 1"
    hidden = post_query(client, tenant, sql)
    assert hidden.status_code == 400 and "people does not exist" in hidden.json["error"]["message"]
    dataset_admin.grant_pii(tenant.org_id, "people", "reader@acme.example", granted_by=None)
    db.session.commit()
    assert blocks_of(post_query(client, tenant, sql)) == [1, 2, 3]
    assert blocks_of(post_query(client, tenant, "SELECT * FROM transfers")) == [5]  # not PII: not audited
    rows = db.session.scalars(select(AuditLog).where(AuditLog.action == "dataset.read_pii")).all()
    assert len(rows) == 1
    entry = rows[0]
    assert entry.org_id == tenant.org_id and entry.actor_id is not None and entry.object_type == "dataset"
    assert entry.details["dataset"] == "people" and entry.details["rows"] == 3 and entry.details["via"] == "api"
    assert entry.details["sql_sha256"] == hashlib.sha256(sql.encode()).hexdigest()


def test_the_current_version_is_read_and_a_rollback_moves_it(app: Flask, client: FlaskClient,
                                                             tenant: Tenant) -> None:
    publish_parquet(app, tenant.org_id, "transfers", [1, 2])
    publish_parquet(app, tenant.org_id, "transfers", [30, 40, 50])
    assert blocks_of(post_query(client, tenant, "SELECT * FROM transfers ORDER BY 1")) == [30, 40, 50]
    datasets.rollback(tenant.org_id, "transfers", 1)
    db.session.commit()
    assert blocks_of(post_query(client, tenant, "SELECT * FROM transfers ORDER BY 1")) == [1, 2]


def test_a_buffered_datasets_hot_rows_are_read_up_to_its_version(client: FlaskClient, tenant: Tenant) -> None:
    publish_hot(tenant.org_id, "alerts", [1, 2])
    publish_hot(tenant.org_id, "alerts", [3])
    assert blocks_of(post_query(client, tenant, "SELECT * FROM alerts ORDER BY 1")) == [1, 2, 3]
    datasets.rollback(tenant.org_id, "alerts", 1)
    db.session.commit()
    assert blocks_of(post_query(client, tenant, "SELECT * FROM alerts ORDER BY 1")) == [1, 2]


def test_csv_and_parquet_are_downloads_of_the_org_only(app: Flask, client: FlaskClient,
                                                       make_tenant: Callable[[str], Tenant]) -> None:
    acme, rival = make_tenant("acme"), make_tenant("rival")
    publish_parquet(app, acme.org_id, "transfers", [1, 2, 3])
    answer = post_query(client, acme, "SELECT * FROM transfers ORDER BY 1", format="csv")
    assert answer.status_code == 200, answer.json
    assert answer.json["download"].startswith("/v1/downloads/") and answer.json["row_count"] == 3
    assert "rows" not in answer.json and answer.json["format"] == "csv"
    got = client.get(answer.json["download"], headers=acme.headers("reader"))
    assert got.status_code == 200 and got.mimetype == "text/csv"
    assert pacsv.read_csv(io.BytesIO(got.data)).column("block_number").to_pylist() == [1, 2, 3]
    assert client.get(answer.json["download"], headers=rival.headers("admin")).status_code == 404
    assert client.get("/v1/downloads/not-a-uuid", headers=acme.headers()).status_code == 404
    download = db.session.scalar(select(Download))
    assert download is not None and download.key.startswith(f"exports/{acme.org_id}/")
    parquet = post_query(client, acme, "SELECT * FROM transfers", format="parquet")
    fetched = client.get(parquet.json["download"], headers=acme.headers())
    assert pq.read_table(io.BytesIO(fetched.data)).num_rows == 3


def test_a_large_json_result_becomes_a_parquet_download(client: FlaskClient, tenant: Tenant) -> None:
    small = post_query(client, tenant, "SELECT * FROM range(50)")
    assert small.json["row_count"] == 50 and len(small.json["rows"]) == 50
    large = post_query(client, tenant, "SELECT * FROM range(120)")
    assert large.status_code == 200 and large.json["format"] == "parquet" and large.json["row_count"] == 120
    fetched = client.get(large.json["download"], headers=tenant.headers())
    assert pq.read_table(io.BytesIO(fetched.data)).column("range").to_pylist() == list(range(120))
    capped = post_query(client, tenant, "SELECT * FROM range(120)", limit=60)
    assert capped.json["row_count"] == 60 and capped.json["truncated"] is True and "download" in capped.json


def test_timeouts_and_memory_bombs_are_4xx(app: Flask, client: FlaskClient, tenant: Tenant) -> None:
    app.config[SETTINGS_KEY] = replace(current_settings(app), query_timeout=1.0, query_memory_limit="64MB")
    slow = post_query(client, tenant, "SELECT count(*) FROM range(10000000000000)")  # uninterrupted: hours
    assert slow.status_code == 408 and slow.json["error"]["code"] == "query_timeout"
    assert slow.json["error"]["details"] == {"timeout_s": 1.0}  # DuckDB interrupted at the setting's deadline
    bomb = post_query(client, tenant, "SELECT list(range) FROM range(10000000000)")
    assert bomb.status_code == 422 and bomb.json["error"]["code"] == "query_resource_limit"
    assert post_query(client, tenant, "SELECT 42 AS x").json["rows"] == [{"x": 42}]


def test_saved_queries_are_private_or_shared_with_the_org(client: FlaskClient,
                                                          make_tenant: Callable[[str], Tenant]) -> None:
    acme, rival = make_tenant("acme"), make_tenant("rival")

    def save(tenant: Tenant, role: str, name: str, shared: bool) -> Any:
        return client.post("/v1/saved-queries", json={"name": name, "sql": "SELECT 1", "shared": shared},
                           headers=tenant.headers(role))

    assert save(acme, "reader", "mine", False).status_code == 201
    created = save(acme, "writer", "team", True)
    assert created.status_code == 201 and created.json["shared"] is True and created.json["sql"] == "SELECT 1"
    assert save(acme, "writer", "secret", False).status_code == 201
    assert save(acme, "reader", "mine", True).status_code == 409
    assert save(rival, "admin", "theirs", True).status_code == 201
    listed = client.get("/v1/saved-queries", headers=acme.headers("reader"))
    assert listed.status_code == 200 and sorted(item["name"] for item in listed.json) == ["mine", "team"]
    refused = client.post("/v1/saved-queries", json={"name": "bad", "sql": "DROP TABLE x"}, headers=acme.headers())
    assert refused.status_code == 400 and refused.json["error"]["code"] == "not_select"


# -- the task API -------------------------------------------------------------------


def task_token(app: Flask, org_id: uuid.UUID, inputs: list[dict[str, Any]],
               triggered_by: uuid.UUID | None = None) -> str:
    """The token of a live attempt (a token works only while its attempt holds the task) of a run
    of ``enrich``, pinning ``inputs``."""
    dags.save_dag(org_id, "task-tokens", "- name: enrich\n  runtime: platform\n  operator: noop\n",
                  content_type="application/yaml", user_id=None)
    _, task_id = runs.create_run(org_id=org_id, job_name="enrich", cause="manual", triggered_by=triggered_by)
    db.session.commit()
    held = lease.take(task_id, "test-worker", 300)
    assert isinstance(held, lease.Lease)
    capability = tokens.for_lease(held, current_settings(app), inputs=inputs)
    return tokens.mint(capability, tokens.secret_key(current_settings(app)))


def task_query(client: FlaskClient, token: str, sql: str, **extra: Any) -> Any:
    return client.post("/v1/task/query", json={"sql": sql, **extra}, headers={"Authorization": f"Bearer {token}"})


def test_a_task_reads_exactly_its_pinned_inputs(app: Flask, client: FlaskClient, tenant: Tenant) -> None:
    publish_parquet(app, tenant.org_id, "transfers", [1, 2])
    publish_parquet(app, tenant.org_id, "transfers", [10, 20, 30])
    publish_parquet(app, tenant.org_id, "other", [99])
    token = task_token(app, tenant.org_id, [{"dataset": "transfers", "version": 1}])
    assert blocks_of(task_query(client, token, "SELECT * FROM transfers ORDER BY 1")) == [1, 2]  # v1, not current v2
    missing = task_query(client, token, "SELECT * FROM other")
    assert missing.status_code == 400 and "other does not exist" in missing.json["error"]["message"]
    hostile = task_query(client, token, "SELECT * FROM read_text('/etc/passwd')")
    assert hostile.status_code == 403 and hostile.json["error"]["code"] == "forbidden_function"
    assert task_query(client, "trc1.bogus.token", "SELECT 1").status_code == 401


def test_a_task_export_lands_under_its_scratch_prefix_and_pii_is_audited(app: Flask, client: FlaskClient,
                                                                         tenant: Tenant) -> None:
    publish_parquet(app, tenant.org_id, "people", [1, 2, 3], pii=True)
    # The run is triggered by the org's writer: without a PII grant for them, nothing is read.
    writer = db.session.scalar(select(User.id).where(User.email == "writer@acme.example"))
    token = task_token(app, tenant.org_id, [{"dataset": "people", "version": 1}], triggered_by=writer)
    refused = task_query(client, token, "SELECT * FROM people")
    assert refused.status_code == 403 and refused.json["error"]["code"] == "pii_not_granted"
    granted = client.post("/v1/datasets/people/pii-grants", json={"email": "writer@acme.example"},
                          headers=tenant.headers("admin"))
    assert granted.status_code in (200, 201), granted.json
    answer = task_query(client, token, "SELECT * FROM people", format="parquet")
    assert answer.status_code == 200, answer.json
    capability = tokens.verify(token, tokens.secret_key(current_settings(app)))
    assert answer.json["key"].startswith(capability.scratch_prefix) and answer.json["row_count"] == 3
    assert pq.read_table(io.BytesIO(object_store(current_settings(app)).get(answer.json["key"]))).num_rows == 3
    audited = db.session.scalars(select(AuditLog).where(AuditLog.action == "dataset.read_pii")).all()
    assert len(audited) == 1 and audited[0].actor_id is None
    assert audited[0].details["via"] == "task" and audited[0].details["task_id"] == capability.task_id
    inline = task_query(client, token, "SELECT * FROM range(80)")
    assert inline.json["row_count"] == 50 and inline.json["truncated"] is True  # tasks are cut, not spilled
