"""Buffer-publish over real PostgreSQL and the local object store.

Capabilities come from real leases (``lease.take`` + ``tokens.for_lease``), as the worker mints
them: the fence a publish carries is checked against the task exactly as a zombie's would be.
"""

from __future__ import annotations

import datetime as dt
import decimal
import json
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select, text

from tests.conftest import Tenant, wait_for
from tracecore.data import datasets, lineage, publish
from tracecore.data.batches import encode
from tracecore.data.schema import arrow_schema, normalize_schema, schema_fingerprint
from tracecore.db.engine import db
from tracecore.exceptions import PermissionDenied, StaleFence
from tracecore.execution import lease, runs, tokens
from tracecore.infra.storage import ObjectStore, object_store
from tracecore.settings import current_settings
from tracecore.taskapi import calls as task_api
from workers.gateway import TaskGateway

EVENTS = normalize_schema([{"name": "dedupe_key", "type": "string", "nullable": False},
                           {"name": "value", "type": "int64"}, {"name": "note", "type": "string"}])
BALANCES = normalize_schema([{"name": "address", "type": "string", "nullable": False},
                             {"name": "wei", "type": "decimal128(38, 0)"}])
SNAPSHOT = normalize_schema([{"name": "k", "type": "int64"}, {"name": "v", "type": "string"}])
TYPED = normalize_schema([{"name": "id", "type": "int64", "nullable": False},
                          {"name": "at", "type": "timestamp[us, tz=UTC]"},
                          {"name": "amount", "type": "decimal128(20, 4)"}, {"name": "raw", "type": "binary"},
                          {"name": "tags", "type": "list<string>"},
                          {"name": "day", "type": "date32"}])


def _job(name: str, **fields: Any) -> dict[str, Any]:
    return {"name": name, "runtime": "platform", "operator": "noop", **fields}


DAG = [
    _job("emit", outputs=[{"dataset": "events", "kind": "buffered", "schema": EVENTS}], unique_key=["dedupe_key"],
         update_strategy="append"),
    _job("balance", outputs=[{"dataset": "balances", "kind": "buffered", "schema": BALANCES}],
         unique_key=["address"], update_strategy="upsert"),
    _job("snap", outputs=[{"dataset": "snapshot", "kind": "derived", "schema": SNAPSHOT}], update_strategy="replace"),
    _job("keyed", outputs=[{"dataset": "keyed", "kind": "derived", "schema": SNAPSHOT}], unique_key=["k"]),
    _job("typed", outputs=[{"dataset": "typed", "kind": "buffered", "schema": TYPED}], unique_key=["id"]),
    _job("consume", inputs=[{"from": {"job": "snap", "output": 0}}, {"from": {"job": "block_follower", "output": 0}}],
         outputs=[{"dataset": "consumed", "kind": "buffered", "schema": SNAPSHOT}]),
    _job("loose", outputs=1),
]


@pytest.fixture
def dag(client: FlaskClient, tenant: Tenant) -> Tenant:
    response = client.put("/v1/dags/publishing", data=json.dumps(DAG),
                          headers={**tenant.headers("writer"), "Content-Type": "application/json"})
    assert response.status_code == 200, response.json
    return tenant


@pytest.fixture
def store(app: Flask) -> ObjectStore:
    return object_store(current_settings(app))


Grant = Callable[..., tuple[lease.Lease, tokens.Capability]]


@pytest.fixture
def grant(app: Flask, dag: Tenant) -> Grant:
    """A run of ``job``, leased; answers the lease and the capability the worker would mint."""

    def make(job: str, ttl: float = 60.0) -> tuple[lease.Lease, tokens.Capability]:
        _, task_id = runs.create_run(org_id=dag.org_id, job_name=job, cause="manual", triggered_by=None)
        db.session.commit()
        held = lease.take(task_id, "test-worker", ttl)
        assert held is not None
        inputs = publish.pinned_inputs(held.org_id, held.job_spec)
        db.session.rollback()
        return held, tokens.for_lease(held, current_settings(app), inputs=inputs)

    return make


def write_batch(store: ObjectStore, capability: tokens.Capability, dataset: str, table: pa.Table,
                columns: list[dict[str, Any]], **override: Any) -> dict[str, Any]:
    """A batch artifact as a UDF would write it: the Parquet file under the output prefix + its manifest."""
    data, digest = encode(table)
    key = f"{capability.output_prefix}{dataset}/{digest[:16]}.parquet"
    store.put(key, data)
    manifest = {"dataset": dataset, "schema_fingerprint": schema_fingerprint(columns), "row_count": table.num_rows,
                "sha256": digest, "key": key, "task_id": capability.task_id, "fence": capability.fence}
    return {**manifest, **override}


def events(*rows: tuple[str, int]) -> pa.Table:
    return pa.table({"dedupe_key": [key for key, _ in rows], "value": [value for _, value in rows],
                     "note": [f"n{value}" for _, value in rows]}, schema=arrow_schema(EVENTS))


def hot(org_id: uuid.UUID, name: str, columns: str) -> list[tuple[Any, ...]]:
    db.session.rollback()
    dataset = datasets.get_dataset(org_id, name)
    table = datasets.hot_table_name(dataset)
    return [tuple(row) for row in db.session.execute(text(f'SELECT {columns} FROM "{table}" ORDER BY 1'))]


def dead_letters() -> list[publish.DeadLetter]:
    db.session.rollback()
    return list(db.session.scalars(select(publish.DeadLetter).order_by(publish.DeadLetter.created_at)))


def current(org_id: uuid.UUID, name: str) -> datasets.Dataset:
    db.session.rollback()
    return datasets.get_dataset(org_id, name)


def rejected(capability: tokens.Capability, manifest: dict[str, Any], store: ObjectStore) -> publish.BatchRejected:
    with pytest.raises(publish.BatchRejected) as caught:
        publish.buffer_publish(capability, manifest, store=store)
    assert caught.value.http_status == 422
    return caught.value


# -- append, duplicates, idempotency ---------------------------------------------------------


def test_append_counts_duplicates_and_the_same_batch_twice_adds_nothing(dag: Tenant, grant: Grant,
                                                                       store: ObjectStore) -> None:
    _, capability = grant("emit")
    manifest = write_batch(store, capability, "events", events(("a", 1), ("b", 2), ("c", 3)), EVENTS)
    first = publish.buffer_publish(capability, manifest, store=store)
    assert (first.received, first.inserted, first.duplicates, first.version) == (3, 3, 0, 1)
    again = publish.buffer_publish(capability, manifest, store=store)
    assert (again.received, again.inserted, again.duplicates, again.version) == (3, 0, 3, 1)  # no new version
    mixed = write_batch(store, capability, "events", events(("b", 20), ("d", 4), ("d", 40), ("a", 10)), EVENTS)
    third = publish.buffer_publish(capability, mixed, store=store)
    assert (third.received, third.inserted, third.duplicates, third.version) == (4, 1, 3, 2)
    assert hot(dag.org_id, "events", "dedupe_key, value, _version") == [("a", 1, 1), ("b", 2, 1), ("c", 3, 1),
                                                                        ("d", 4, 2)]
    version = datasets.get_version(current(dag.org_id, "events"), 2)
    assert version.rows == 4 and version.manifest["files"][0]["key"] == mixed["key"]
    assert version.meta["inserted"] == 1 and version.meta["duplicates"] == 3 and version.attempt_id is not None
    assert dead_letters() == []


# -- the fence --------------------------------------------------------------------------------


def test_a_stale_fence_is_409_and_writes_nothing(app: Flask, dag: Tenant, grant: Grant, store: ObjectStore) -> None:
    old_lease, old = grant("emit", ttl=0.5)
    good = write_batch(store, old, "events", events(("a", 1)), EVENTS)
    tampered = write_batch(store, old, "events", events(("b", 2)), EVENTS, sha256="0" * 64)

    def expired() -> bool:
        db.session.rollback()
        return bool(db.session.execute(text("SELECT lease_expires_at < clock_timestamp() FROM tasks WHERE id = :id"),
                                       {"id": old_lease.task_id}).scalar_one())

    wait_for(expired, timeout=10, message="the first lease to expire")
    # A lapsed lease is already stale, before anyone takes the task again.
    with pytest.raises(StaleFence):
        publish.buffer_publish(old, good, store=store)
    newer = lease.take(old_lease.task_id, "other-worker", 60)
    assert newer is not None and newer.fence == old_lease.fence + 1
    for manifest in (good, tampered):  # stale first: even a malformed batch leaves no dead letter
        status, body = task_api.dispatch("POST", "/v1/task/buffer-publish",
                                         {"Authorization": f"Bearer {tokens.mint(old, secret(app))}"},
                                         json.dumps({"manifest": manifest}).encode(), secret(app))
        assert (status, body["error"]["code"]) == (401, "token_attempt_ended"), body  # the token ended with it
    assert hot(dag.org_id, "events", "dedupe_key") == []
    assert current(dag.org_id, "events").current_version is None and dead_letters() == []
    attempt = db.session.execute(text("SELECT state FROM attempts WHERE task_id = :t AND fence = :f"),
                                 {"t": old_lease.task_id, "f": old_lease.fence}).scalar_one()
    assert attempt in ("fenced", "lost")


def secret(app: Flask) -> bytes:
    return tokens.secret_key(current_settings(app))


# -- malformed batches: dead letters ------------------------------------------------------------


def test_a_tampered_file_is_dead_lettered_with_422(dag: Tenant, grant: Grant, store: ObjectStore) -> None:
    held, capability = grant("emit")
    manifest = write_batch(store, capability, "events", events(("a", 1)), EVENTS)
    store.put(manifest["key"], encode(events(("a", 1_000_000)))[0])  # same shape, other bytes
    error = rejected(capability, manifest, store)
    assert error.code == "checksum_mismatch" and error.details["expected"] == manifest["sha256"]
    [letter] = dead_letters()
    assert (letter.reason, letter.dataset_name, letter.task_id, letter.fence) == \
        ("checksum_mismatch", "events", held.task_id, held.fence)
    assert letter.manifest == manifest and letter.org_id == dag.org_id
    assert str(letter.id) == error.details["dead_letter"]
    assert hot(dag.org_id, "events", "dedupe_key") == [] and current(dag.org_id, "events").current_version is None


def test_unique_key_missing_or_null_is_dead_lettered(dag: Tenant, grant: Grant, store: ObjectStore) -> None:
    _, capability = grant("emit")
    no_key = pa.table({"value": pa.array([1], pa.int64()), "note": ["x"]})
    assert rejected(capability, write_batch(store, capability, "events", no_key, EVENTS), store).code == \
        "unique_key_missing"
    nullable = [{**column, "nullable": True} for column in EVENTS]  # a writer that ignored NOT NULL
    null_key = pa.table({"dedupe_key": pa.array([None, "b"], pa.string()), "value": pa.array([1, 2], pa.int64()),
                         "note": ["x", "y"]})
    error = rejected(capability, write_batch(store, capability, "events", null_key, nullable,
                                             schema_fingerprint=schema_fingerprint(EVENTS)), store)
    assert (error.code, error.details["nulls"]) == ("unique_key_null", 1)
    # Rows sent as JSON: a row without the key column is the same refusal.
    with pytest.raises(publish.BatchRejected) as caught:
        publish.publish_rows(capability, "events", [{"value": 1}], store=store)
    assert caught.value.code == "unique_key_missing"
    assert [letter.reason for letter in dead_letters()] == ["unique_key_missing", "unique_key_null",
                                                             "unique_key_missing"]
    assert hot(dag.org_id, "events", "dedupe_key") == []


def test_wrong_types_and_extra_columns_are_schema_mismatch(dag: Tenant, grant: Grant, store: ObjectStore) -> None:
    _, capability = grant("emit")
    wrong = pa.table({"dedupe_key": ["a"], "value": ["not a number"], "note": ["x"]})
    error = rejected(capability, write_batch(store, capability, "events", wrong, EVENTS), store)
    assert error.code == "schema_mismatch"
    assert error.details["wrong_types"] == [{"column": "value", "expected": "int64", "actual": "string"}]
    extra = events(("a", 1)).append_column("surprise", pa.array([True]))
    error = rejected(capability, write_batch(store, capability, "events", extra, EVENTS), store)
    assert (error.code, error.details["extra"]) == ("schema_mismatch", ["surprise"])
    other_schema = write_batch(store, capability, "events", events(("a", 1)), EVENTS, schema_fingerprint="f" * 64)
    assert rejected(capability, other_schema, store).code == "schema_mismatch"
    short = write_batch(store, capability, "events", events(("a", 1)), EVENTS, row_count=2)
    assert rejected(capability, short, store).code == "row_count_mismatch"
    for rows in ([{"dedupe_key": "a", "value": 1.5}], [{"dedupe_key": "a", "value": "7"}]):
        with pytest.raises(publish.BatchRejected) as caught:  # JSON rows: a float is not an int64, nor is text
            publish.publish_rows(capability, "events", rows, store=store)
        assert caught.value.code == "schema_mismatch"
    assert len(dead_letters()) == 6 and hot(dag.org_id, "events", "dedupe_key") == []


# -- what a token may write ------------------------------------------------------------------


def test_a_dataset_or_key_the_token_may_not_write_is_403(dag: Tenant, grant: Grant, store: ObjectStore) -> None:
    _, capability = grant("emit")
    _, other = grant("balance")
    table = pa.table({"address": ["0xabc"], "wei": pa.array([1], pa.decimal128(38, 0))})
    foreign = write_batch(store, capability, "balances", table, BALANCES)
    with pytest.raises(PermissionDenied) as caught:
        publish.buffer_publish(capability, foreign, store=store)
    assert (caught.value.http_status, caught.value.code) == (403, "dataset_not_writable")
    with pytest.raises(PermissionDenied) as caught:
        publish.publish_rows(capability, "balances", [{"address": "0xabc", "wei": 1}], store=store)
    assert caught.value.code == "dataset_not_writable"
    outside = write_batch(store, other, "events", events(("a", 1)), EVENTS, task_id=capability.task_id,
                          fence=capability.fence)  # a file under another task's prefix
    with pytest.raises(PermissionDenied) as caught:
        publish.buffer_publish(capability, outside, store=store)
    assert caught.value.code == "key_outside_prefix"
    theirs = write_batch(store, other, "balances", table, BALANCES)
    with pytest.raises(PermissionDenied) as caught:
        publish.buffer_publish(capability, theirs, store=store)
    assert caught.value.code == "manifest_mismatch"
    assert dead_letters() == [] and hot(dag.org_id, "balances", "address") == []


# -- upsert, replace, derived datasets --------------------------------------------------------


def test_upsert_updates_changed_rows_only(dag: Tenant, grant: Grant, store: ObjectStore) -> None:
    _, capability = grant("balance")
    first = publish.publish_rows(capability, None, [{"address": "a", "wei": 1}, {"address": "b", "wei": "2"}],
                                 store=store)
    assert (first.inserted, first.updated, first.version) == (2, 0, 1)
    rows = [{"address": "a", "wei": 5}, {"address": "a", "wei": 6}, {"address": "b", "wei": 2},
            {"address": "c", "wei": 3}]
    second = publish.publish_rows(capability, "balances", rows, store=store)
    assert (second.received, second.inserted, second.updated, second.duplicates, second.version) == (4, 1, 1, 3, 2)
    assert hot(dag.org_id, "balances", "address, wei, _version") == [
        ("a", decimal.Decimal(6), 2), ("b", decimal.Decimal(2), 1), ("c", decimal.Decimal(3), 2)]
    same = publish.publish_rows(capability, "balances", rows, store=store)
    assert (same.inserted, same.updated, same.version) == (0, 0, 2)
    assert datasets.get_version(current(dag.org_id, "balances"), 2).rows == 3


def _files(org_id: uuid.UUID, name: str, store: ObjectStore) -> pa.Table:
    dataset = current(org_id, name)
    assert dataset.current_version is not None
    keys = [item["key"] for item in datasets.get_version(dataset, dataset.current_version).manifest["files"]]
    return pa.concat_tables([pq.read_table(pa.BufferReader(store.get(key))) for key in keys]).sort_by("k")


def test_replace_replaces_a_derived_dataset(dag: Tenant, grant: Grant, store: ObjectStore) -> None:
    _, capability = grant("snap")
    first = publish.publish_rows(capability, None, [{"k": 1, "v": "x"}, {"k": 2, "v": "y"}], store=store)
    second = publish.publish_rows(capability, None, [{"k": 3, "v": "z"}], store=store)
    assert (first.version, second.version, second.inserted) == (1, 2, 1)
    assert _files(dag.org_id, "snapshot", store).to_pylist() == [{"k": 3, "v": "z"}]
    dataset = current(dag.org_id, "snapshot")
    assert datasets.get_version(dataset, 1).rows == 2 and datasets.get_version(dataset, 2).rows == 1
    empty = publish.publish_rows(capability, None, [], store=store)  # replace with nothing is a change
    assert empty.version == 3 and _files(dag.org_id, "snapshot", store).num_rows == 0


def test_append_to_a_keyed_derived_dataset_keeps_only_new_keys(dag: Tenant, grant: Grant,
                                                                store: ObjectStore) -> None:
    _, capability = grant("keyed")
    publish.publish_rows(capability, None, [{"k": 1, "v": "x"}, {"k": 2, "v": "y"}], store=store)
    result = publish.publish_rows(capability, None, [{"k": 2, "v": "other"}, {"k": 3, "v": "z"}, {"k": 3, "v": "w"}],
                                  store=store)
    assert (result.inserted, result.duplicates, result.version) == (1, 2, 2)
    assert _files(dag.org_id, "keyed", store).to_pylist() == [{"k": 1, "v": "x"}, {"k": 2, "v": "y"},
                                                              {"k": 3, "v": "z"}]


def test_json_rows_of_every_kind_of_type_land_as_declared(dag: Tenant, grant: Grant, store: ObjectStore) -> None:
    _, capability = grant("typed")
    rows = [{"id": 1, "at": "2024-05-01T12:30:00+00:00", "amount": "12.3456", "raw": "0x00ff", "tags": ["a", "b"],
             "day": "2024-05-01"}, {"id": 2}]
    result = publish.publish_rows(capability, None, rows, store=store)
    assert (result.inserted, result.version) == (2, 1)
    assert hot(dag.org_id, "typed", "id, at, amount, raw, tags, day") == [
        (1, dt.datetime(2024, 5, 1, 12, 30, tzinfo=dt.UTC), decimal.Decimal("12.3456"), b"\x00\xff", ["a", "b"],
         dt.date(2024, 5, 1)),
        (2, None, None, None, None, None)]


def test_a_dictionary_encoded_column_lands_as_its_values(dag: Tenant, grant: Grant, store: ObjectStore) -> None:
    # pandas' categoricals and pyarrow's dictionary_encode() write such columns; Parquet keeps the encoding.
    _, capability = grant("emit")
    table = events(("a", 1), ("b", 2), ("c", 3))
    table = table.set_column(2, "note", table.column("note").dictionary_encode())
    result = publish.buffer_publish(capability, write_batch(store, capability, "events", table, EVENTS), store=store)
    assert (result.inserted, result.version) == (3, 1)
    assert hot(dag.org_id, "events", "dedupe_key, note") == [("a", "n1"), ("b", "n2"), ("c", "n3")]


def test_a_dataset_without_a_schema_takes_its_first_batch(dag: Tenant, grant: Grant, store: ObjectStore) -> None:
    _, capability = grant("loose")
    result = publish.publish_rows(capability, None, [{"block": 1, "hash": "0xab"}], store=store)
    assert (result.dataset, result.inserted, result.version) == ("loose", 1, 1)
    dataset = current(dag.org_id, "loose")
    assert dataset.schema == [{"name": "block", "type": "int64", "nullable": True},
                              {"name": "hash", "type": "string", "nullable": True}]


# -- lineage -------------------------------------------------------------------------------


def test_lineage_records_attempt_pinned_inputs_and_output(client: FlaskClient, dag: Tenant, grant: Grant,
                                                         store: ObjectStore) -> None:
    _, producer = grant("snap")
    publish.publish_rows(producer, None, [{"k": 1, "v": "x"}], store=store)
    held, capability = grant("consume")
    snapshot = current(dag.org_id, "snapshot")
    assert [dict(item) for item in capability.inputs] == [
        {"dataset": "snapshot", "version": 1, "partition": None, "dataset_id": str(snapshot.id)},
        {"source": "block_follower"}]
    publish.publish_rows(producer, None, [{"k": 2, "v": "newer"}], store=store)  # after the pin: not read
    result = publish.publish_rows(capability, None, [{"k": 1, "v": "x!"}], store=store)
    consumed = current(dag.org_id, "consumed")
    edges = db.session.scalars(select(lineage.LineageEdge).where(
        lineage.LineageEdge.output_dataset_id == consumed.id)).all()
    assert {(edge.input_dataset_id, edge.input_version, edge.input_source) for edge in edges} == \
        {(snapshot.id, 1, None), (None, None, "block_follower")}
    attempt = db.session.execute(text("SELECT id FROM attempts WHERE task_id = :t AND fence = :f"),
                                 {"t": held.task_id, "f": held.fence}).scalar_one()
    assert all(edge.attempt_id == attempt and edge.output_version == result.version for edge in edges)
    graph = client.get("/v1/lineage?asset=consumed", headers=dag.headers("reader")).json
    links = {(edge["from"], edge["to"]) for edge in graph["edges"]}
    assert (f"dataset:{snapshot.id}", f"job:{held.job_id}") in links
    assert (f"job:{held.job_id}", f"dataset:{consumed.id}") in links


# -- transports: the gateway socket (trace_sdk) and the Celery task ----------------------------


@pytest.fixture
def short_dir() -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix="pub-", dir="/tmp"))  # a unix socket path must fit 107 bytes
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_trace_sdk_publish_through_the_gateway_socket(app: Flask, dag: Tenant, grant: Grant, store: ObjectStore,
                                                      short_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from workers.runtime import trace_sdk

    held, capability = grant("emit")
    token = tokens.mint(capability, secret(app))
    monkeypatch.setenv("TRACE_CAPABILITY_TOKEN", token)
    with TaskGateway(short_dir / "gateway.sock", app, held.task_id, secret(app)) as gateway:
        monkeypatch.setenv("TRACE_GATEWAY", f"unix://{gateway.path}")
        answer = trace_sdk.publish([{"dedupe_key": "a", "value": 1}, {"dedupe_key": "b", "value": 2}])
        assert (answer["received"], answer["inserted"], answer["duplicates"]) == (2, 2, 0)
        manifest = write_batch(store, capability, "events", events(("b", 2), ("c", 3)), EVENTS)
        answer = trace_sdk._call("POST", "/v1/task/buffer-publish", {"manifest": manifest})
        assert (answer["inserted"], answer["duplicates"], answer["version"]) == (1, 1, 2)
        bad = {**manifest, "sha256": "1" * 64}
        with pytest.raises(trace_sdk.GatewayError) as caught:
            trace_sdk._call("POST", "/v1/task/buffer-publish", {"manifest": bad})
        assert (caught.value.status, caught.value.code) == (422, "checksum_mismatch")
        with pytest.raises(trace_sdk.GatewayError) as caught:
            trace_sdk._call("POST", "/v1/task/buffer-publish", {"nothing": True})
        assert (caught.value.status, caught.value.code) == (400, "invalid_body")
    assert hot(dag.org_id, "events", "dedupe_key") == [("a",), ("b",), ("c",)]


def test_the_celery_task_checks_the_token_and_publishes(app: Flask, dag: Tenant, grant: Grant,
                                                        store: ObjectStore) -> None:
    _, capability = grant("emit")
    manifest = write_batch(store, capability, "events", events(("a", 1)), EVENTS)
    settings = current_settings(app)
    answer = publish.publish_with_token(tokens.mint(capability, secret(app)), manifest, settings)
    assert (answer["status"], answer["inserted"], answer["version"]) == (200, 1, 1)
    forged = tokens.mint(capability, b"not the platform's key")
    answer = publish.publish_with_token(forged, manifest, settings)
    assert (answer["status"], answer["error"]["code"]) == (401, "bad_signature")
    expired = tokens.mint(tokens.Capability(**{**capability.to_claims(), "inputs": capability.inputs,
                                               "expires_at": int(time.time()) - 1}), secret(app))
    assert publish.publish_with_token(expired, manifest, settings)["error"]["code"] == "token_expired"
