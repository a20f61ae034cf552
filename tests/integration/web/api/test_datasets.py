"""Datasets over real PostgreSQL: declaration by DAG save, catalog, versions, rollback, lineage,
redaction of hot rows, cross-org and PII grants, and the Query Service's visibility contract."""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy import select, text
from werkzeug.test import TestResponse

from tests.conftest import Tenant
from tracecore.dags.catalog import Job
from tracecore.data import datasets, lineage
from tracecore.db.engine import db
from tracecore.exceptions import NotFound
from tracecore.execution.tokens import Capability
from tracecore.tenancy.audit import AuditLog

LABELS = [{"name": "address", "type": "string", "nullable": False}, {"name": "label", "type": "string"},
          {"name": "seen_at", "type": "timestamp[us, tz=UTC]"}]
BALANCES = [{"name": "chain_id", "type": "int64", "nullable": False},
            {"name": "address", "type": "string", "nullable": False}, {"name": "wei", "type": "decimal128(38,0)"}]


def put_dag(client: FlaskClient, tenant: Tenant, name: str, jobs: list[dict[str, Any]],
            role: str = "writer") -> TestResponse:
    return client.put(f"/v1/dags/{name}", data=json.dumps(jobs),
                      headers={**tenant.headers(role), "Content-Type": "application/json"})


def job(name: str, **fields: Any) -> dict[str, Any]:
    return {"name": name, "runtime": "platform", "operator": "noop", **fields}


def manifest(*keys: str, rows: int = 10) -> dict[str, Any]:
    files = [{"key": key, "sha256": hashlib.sha256(key.encode()).hexdigest(), "rows": rows, "bytes": rows * 8}
             for key in keys]
    return {"files": files, "rows": rows * len(keys), "bytes": rows * 8 * len(keys)}


def fresh(org_id: uuid.UUID, name: str) -> datasets.Dataset:
    """The dataset as the database has it now (requests commit in their own sessions)."""
    db.session.expire_all()
    return datasets.get_dataset(org_id, name)


def hot_rows(dataset: datasets.Dataset) -> list[tuple[Any, ...]]:
    table = datasets.hot_table_name(dataset)
    return [tuple(row) for row in db.session.execute(text(f'SELECT chain_id, address FROM "{table}" '
                                                          "ORDER BY chain_id, address"))]


def audit_rows(action: str) -> list[AuditLog]:
    db.session.expire_all()
    return list(db.session.scalars(select(AuditLog).where(AuditLog.action == action).order_by(AuditLog.created_at)))


def error(response: TestResponse) -> tuple[int, str]:
    return response.status_code, response.json["error"]["code"]


# -- declaration through PUT /v1/dags ---------------------------------------------------


def test_saving_a_dag_declares_its_datasets_and_hot_tables(client: FlaskClient, tenant: Tenant) -> None:
    response = put_dag(client, tenant, "labels", [
        job("label", outputs=[{"dataset": "labels", "kind": "buffered", "schema": LABELS, "pii": True,
                               "description": "address labels"}, {"dataset": "label_stats"}],
            unique_key=["address"]),
        job("decode", outputs=2, inputs=[{"from": {"job": "block_follower", "output": 0}}])])
    assert response.status_code == 200, response.json
    catalog = client.get("/v1/datasets", headers=tenant.headers("reader")).json
    assert [(d["name"], d["kind"], d["pii"], d["current_version"]) for d in catalog] == [
        ("decode", "derived", False, None), ("decode_1", "derived", False, None),
        ("label_stats", "derived", False, None), ("labels", "buffered", True, None)]
    labels = fresh(tenant.org_id, "labels")
    assert labels.unique_key == ["address"] and labels.schema_fingerprint is not None
    assert labels.schema[2] == {"name": "seen_at", "type": "timestamp[us, tz=UTC]", "nullable": True}
    producer = db.session.get(Job, labels.producer_job_id)
    assert producer is not None and producer.name == "label"
    columns = dict(db.session.execute(text(
        "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = :t"),
        {"t": datasets.hot_table_name(labels)}).all())
    assert columns == {"address": "text", "label": "text", "seen_at": "timestamp with time zone", "org_id": "uuid",
                       "_version": "integer", "_inserted_at": "timestamp with time zone"}
    # The job spec keeps outputs as a count and lists the declarations.
    spec = client.get("/v1/jobs/label", headers=tenant.headers()).json["spec"]
    assert spec["outputs"] == 2 and [d["dataset"] for d in spec["output_datasets"]] == ["labels", "label_stats"]


def test_a_bad_arrow_type_is_a_400_with_its_path(client: FlaskClient, tenant: Tenant) -> None:
    bad = [{"name": "a", "type": "int64"}, {"name": "b", "type": "string"}, {"name": "c", "type": "varchar"}]
    response = put_dag(client, tenant, "bad", [job("x", outputs=[{"dataset": "x"}, {"dataset": "y", "schema": bad}])])
    assert error(response) == (400, "invalid_type_name")
    assert response.json["error"]["details"]["path"] == "jobs[0].outputs[1].schema[2].type"
    assert client.get("/v1/datasets", headers=tenant.headers()).json == []


def test_an_incompatible_schema_change_after_a_version_is_refused(client: FlaskClient, tenant: Tenant) -> None:
    declare = [job("bal", outputs=[{"dataset": "balances", "kind": "buffered", "schema": BALANCES}],
                   unique_key=["chain_id", "address"])]
    assert put_dag(client, tenant, "bal", declare).status_code == 200
    # Before the first version anything goes (the empty hot table is rebuilt).
    retyped = [dict(c, type="int32") if c["name"] == "chain_id" else c for c in BALANCES]
    declare[0]["outputs"][0]["schema"] = retyped
    assert put_dag(client, tenant, "bal", declare).status_code == 200
    datasets.add_version(fresh(tenant.org_id, "balances"), manifest("b/1.parquet"))
    db.session.commit()
    declare[0]["outputs"][0]["schema"] = BALANCES  # int32 -> int64: existing rows would change type
    response = put_dag(client, tenant, "bal", declare)
    assert error(response) == (400, "schema_conflict")
    assert response.json["error"]["details"]["path"] == "jobs[0].outputs[0].schema"
    declare[0]["unique_key"] = ["address"]
    declare[0]["outputs"][0]["schema"] = retyped
    response = put_dag(client, tenant, "bal", declare)
    assert error(response) == (400, "schema_conflict")
    assert response.json["error"]["details"]["path"] == "jobs[0].unique_key"
    # Adding a nullable column is compatible and reaches the hot table.
    declare[0]["unique_key"] = ["chain_id", "address"]
    declare[0]["outputs"][0]["schema"] = [*retyped, {"name": "note", "type": "string"}]
    assert put_dag(client, tenant, "bal", declare).status_code == 200, "compatible change"
    balances = fresh(tenant.org_id, "balances")
    added = db.session.scalar(text("SELECT count(*) FROM information_schema.columns WHERE table_name = :t AND "
                                   "column_name = 'note'"), {"t": datasets.hot_table_name(balances)})
    assert added == 1 and balances.current_version == 1


def test_a_dataset_has_one_producer(client: FlaskClient, tenant: Tenant) -> None:
    assert put_dag(client, tenant, "one", [job("a", outputs=[{"dataset": "shared"}])]).status_code == 200
    response = put_dag(client, tenant, "two", [job("b", outputs=[{"dataset": "shared"}])])
    assert error(response) == (409, "dataset_name_taken")
    assert response.json["error"]["details"]["path"] == "jobs[0].outputs[0]"
    # Once its producer leaves, another job may take the dataset over.
    assert put_dag(client, tenant, "one", [job("a")]).status_code == 200
    assert put_dag(client, tenant, "two", [job("b", outputs=[{"dataset": "shared"}])]).status_code == 200


# -- catalog, detail, rollback ---------------------------------------------------------


def test_catalog_search_and_detail(client: FlaskClient, tenant: Tenant) -> None:
    assert put_dag(client, tenant, "d", [
        job("blocks", outputs=[{"dataset": "blocks", "kind": "raw", "description": "Raw Ethereum blocks"}]),
        job("tx", outputs=1)]).status_code == 200
    blocks = fresh(tenant.org_id, "blocks")
    first = datasets.add_version(blocks, manifest("blocks/0.parquet"), partition_key="blocks:0-99",
                                 metadata={"duration_ms": 12.5, "source": "archive"})
    datasets.add_version(blocks, manifest("blocks/1.parquet", rows=5), partition_key="blocks:100-199")
    db.session.commit()
    assert first.version == 1

    def names(query: str) -> list[str]:
        return [d["name"] for d in client.get(f"/v1/datasets?search={query}", headers=tenant.headers()).json]

    assert names("") == ["blocks", "tx"]
    assert names("ETHEREUM") == ["blocks"]  # description, any case
    assert names("t") == ["blocks", "tx"] and names("x") == ["tx"] and names("%") == [] and names("_") == []
    entry = client.get("/v1/datasets?search=blocks", headers=tenant.headers()).json[0]
    assert entry["current_version"] == 2 and entry["rows"] == 15  # the snapshot: both partitions

    detail = client.get("/v1/datasets/blocks", headers=tenant.headers("reader")).json
    assert detail["kind"] == "raw" and detail["producer_job"] == "blocks" and detail["schema"] is None
    assert [v["version"] for v in detail["versions"]] == [2, 1]
    newest, oldest = detail["versions"]
    assert (newest["current"], newest["files"], newest["rows"], newest["partition_key"]) == \
        (True, 2, 15, "blocks:100-199")
    assert oldest["metadata"] == {"duration_ms": 12.5, "source": "archive", "rows": 10, "bytes": 80}
    assert [(p["key"], p["kind"], p["range_start"], p["range_end"], p["latest_version"], p["rows"])
            for p in detail["partitions"]] == [("blocks:0-99", "block_range", "0", "99", 1, 10),
                                               ("blocks:100-199", "block_range", "100", "199", 2, 5)]
    assert detail["lineage"] == {"upstream": [], "downstream": []}


def test_unknown_and_foreign_datasets_are_404(client: FlaskClient, make_tenant: Callable[[str], Tenant]) -> None:
    acme, other = make_tenant("acme"), make_tenant("other")
    assert put_dag(client, acme, "d", [job("secret", outputs=1)]).status_code == 200
    for path, method, body in [("/v1/datasets/secret", "get", None),
                               ("/v1/datasets/secret/rollback", "post", {"version": 1}),
                               ("/v1/datasets/secret/rows", "delete", {"key": {"id": 1}}),
                               ("/v1/datasets/secret/pii-grants", "post", {"email": "admin@other.example"}),
                               ("/v1/datasets/nothing", "get", None), ("/v1/lineage?asset=secret", "get", None)]:
        response = getattr(client, method)(path, json=body, headers=other.headers("admin"))
        assert error(response) == (404, "not_found"), (method, path)
    assert client.get("/v1/datasets", headers=other.headers()).json == []
    assert error(client.post("/v1/grants", json={"dataset": "secret", "org": "acme"},
                             headers=other.headers())) == (404, "not_found")


def test_rollback_moves_the_current_version_and_keeps_every_version(client: FlaskClient, tenant: Tenant) -> None:
    assert put_dag(client, tenant, "d", [job("agg", outputs=1)]).status_code == 200
    agg = fresh(tenant.org_id, "agg")
    for index in range(3):
        datasets.add_version(agg, manifest(f"agg/{index}.parquet"))
    db.session.commit()

    assert error(client.post("/v1/datasets/agg/rollback", json={"version": 1}, headers=tenant.headers("reader"))) \
        == (403, "forbidden")
    response = client.post("/v1/datasets/agg/rollback", json={"version": 1}, headers=tenant.headers("writer"))
    assert response.status_code == 200, response.json
    assert response.json["current_version"] == 1 and response.json["latest_version"] == 3
    assert [(v["version"], v["current"]) for v in response.json["versions"]] == [(3, False), (2, False), (1, True)]
    assert error(client.post("/v1/datasets/agg/rollback", json={"version": 7}, headers=tenant.headers("writer"))) \
        == (400, "unknown_version")
    assert error(client.post("/v1/datasets/agg/rollback", json={"version": "2"},
                             headers=tenant.headers("writer"))) == (400, "invalid_request")
    [row] = audit_rows("dataset.rollback")
    assert row.details == {"name": "agg", "from_version": 3, "to_version": 1} and row.org_id == tenant.org_id

    # The next version is new (4), and builds on the current one: a replace holds only its own files.
    fourth = datasets.add_version(fresh(tenant.org_id, "agg"), manifest("agg/3.parquet"), mode="append")
    db.session.commit()
    assert fourth.version == 4
    assert [f["key"] for f in fourth.manifest["files"]] == ["agg/0.parquet", "agg/3.parquet"]
    # Rolling forward again is a rollback too: nothing was lost.
    assert client.post("/v1/datasets/agg/rollback", json={"version": 3},
                       headers=tenant.headers("writer")).json["current_version"] == 3


# -- lineage -----------------------------------------------------------------------------


def chain(client: FlaskClient, tenant: Tenant) -> dict[str, datasets.Dataset]:
    """block_follower -> (ingest) -> raw_blocks -> (decode) -> decoded -> (summarize) -> daily, one version each."""
    response = put_dag(client, tenant, "chain", [
        job("ingest", inputs=[{"from": {"job": "block_follower", "output": 0}}],
            outputs=[{"dataset": "raw_blocks", "kind": "raw"}]),
        job("decode", inputs=[{"from": {"job": "ingest", "output": 0}}], outputs=[{"dataset": "decoded"}]),
        job("summarize", inputs=[{"from": {"job": "decode", "output": 0}}], outputs=[{"dataset": "daily"}])])
    assert response.status_code == 200, response.json
    found = {name: fresh(tenant.org_id, name) for name in ("raw_blocks", "decoded", "daily")}
    jobs = {j.name: j.id for j in db.session.scalars(select(Job).where(Job.org_id == tenant.org_id))}
    steps = [("raw_blocks", "ingest", [{"dataset": "block_follower", "version": None}]),
             ("decoded", "decode", [{"dataset": "raw_blocks", "version": 1}]),
             ("daily", "summarize", [{"dataset": "decoded", "version": 1}])]
    for name, job_name, inputs in steps:
        version = datasets.add_version(found[name], manifest(f"{name}/0.parquet"))
        assert lineage.record_lineage(tenant.org_id, found[name].id, version.version, inputs,
                                      job_id=jobs[job_name]) == 1
        # A retried publish records the same facts: nothing new.
        assert lineage.record_lineage(tenant.org_id, found[name].id, version.version, inputs,
                                      job_id=jobs[job_name]) == 0
    db.session.commit()
    return found


def test_the_lineage_graph_of_a_three_dataset_chain(client: FlaskClient, tenant: Tenant) -> None:
    found = chain(client, tenant)
    graph = client.get("/v1/lineage?asset=decoded", headers=tenant.headers("reader")).json
    ids = {node["id"]: node for node in graph["nodes"]}
    by_name = {node["name"]: node["id"] for node in graph["nodes"]}
    assert graph["asset"] == f"dataset:{found['decoded'].id}" and graph["truncated"] is False
    assert sorted((n["type"], n["name"]) for n in graph["nodes"]) == [
        ("dataset", "daily"), ("dataset", "decoded"), ("dataset", "raw_blocks"), ("job", "decode"), ("job", "ingest"),
        ("job", "summarize"), ("source", "block_follower")]
    assert ids[by_name["raw_blocks"]]["kind"] == "raw" and ids[by_name["daily"]]["current_version"] == 1
    edges = sorted((ids[e["from"]]["name"], ids[e["to"]]["name"], tuple(e["versions"])) for e in graph["edges"])
    assert edges == [("block_follower", "ingest", (1,)), ("decode", "decoded", (1,)), ("decoded", "summarize", (1,)),
                     ("ingest", "raw_blocks", (1,)), ("raw_blocks", "decode", (1,)), ("summarize", "daily", (1,))]
    # Transitive both ways: from either end the whole chain shows.
    for asset in ("raw_blocks", "daily"):
        other = client.get(f"/v1/lineage?asset={asset}", headers=tenant.headers()).json
        assert len(other["nodes"]) == 7 and len(other["edges"]) == 6, asset
    whole = client.get("/v1/lineage", headers=tenant.headers()).json
    assert whole["asset"] is None and len(whole["edges"]) == 6
    assert error(client.get("/v1/lineage?asset=nothing", headers=tenant.headers())) == (404, "not_found")

    detail = client.get("/v1/datasets/decoded", headers=tenant.headers()).json
    assert detail["lineage"] == {"upstream": [{"dataset": "raw_blocks", "source": None, "job": "decode"}],
                                 "downstream": [{"dataset": "daily", "job": "summarize"}]}
    assert detail["versions"][0]["inputs"] == [{"dataset": "raw_blocks", "version": 1, "source": None}]


def test_lineage_names_an_unknown_input_as_not_found(client: FlaskClient, tenant: Tenant) -> None:
    found = chain(client, tenant)
    with pytest.raises(NotFound):
        lineage.record_lineage(tenant.org_id, found["daily"].id, 1, [{"dataset": "nowhere", "version": 1}])


# -- redaction ---------------------------------------------------------------------------


def balances(client: FlaskClient, tenant: Tenant) -> datasets.Dataset:
    response = put_dag(client, tenant, "bal", [
        job("bal", outputs=[{"dataset": "balances", "kind": "buffered", "schema": BALANCES, "pii": True},
                            {"dataset": "summary"}], unique_key=["chain_id", "address"])])
    assert response.status_code == 200, response.json
    dataset = fresh(tenant.org_id, "balances")
    version = datasets.add_version(dataset, manifest("batches/1.parquet", rows=4))
    table = datasets.hot_table_name(dataset)
    for chain_id, address in [(1, "0xaaa"), (1, "0xbbb"), (10, "0xaaa"), (10, "0xccc")]:
        db.session.execute(text(f'INSERT INTO "{table}" (chain_id, address, wei, org_id, _version) '
                                "VALUES (:c, :a, 5, :o, :v)"),
                           {"c": chain_id, "a": address, "o": tenant.org_id, "v": version.version})
    db.session.commit()
    return dataset


def test_redaction_deletes_exactly_the_keyed_rows_and_is_audited(client: FlaskClient, tenant: Tenant) -> None:
    dataset = balances(client, tenant)
    url = "/v1/datasets/balances/rows"
    assert error(client.delete(url, json={"key": {"chain_id": 1, "address": "0xaaa"}},
                               headers=tenant.headers("writer"))) == (403, "forbidden")
    response = client.delete(url, json={"key": {"chain_id": 1, "address": "0xaaa"}}, headers=tenant.headers("admin"))
    assert response.status_code == 200, response.json
    assert response.json == {"deleted": 1}
    db.session.expire_all()
    assert hot_rows(dataset) == [(1, "0xbbb"), (10, "0xaaa"), (10, "0xccc")]
    # Strings for numbers are cast by PostgreSQL; a second redaction of the same key finds nothing.
    assert client.delete(url, json={"key": {"chain_id": "10", "address": "0xccc"}},
                         headers=tenant.headers("admin")).json == {"deleted": 1}
    assert client.delete(url, json={"key": {"chain_id": 10, "address": "0xccc"}},
                         headers=tenant.headers("admin")).json == {"deleted": 0}
    db.session.expire_all()
    assert hot_rows(dataset) == [(1, "0xbbb"), (10, "0xaaa")]

    rows = audit_rows("dataset.redact")
    assert [row.details["rows"] for row in rows] == [1, 1, 0]
    assert rows[0].details["key_columns"] == ["chain_id", "address"] and rows[0].object_id == str(dataset.id)
    assert all("0xaaa" not in json.dumps(row.details) for row in rows)  # the key itself is personal data
    assert rows[0].details["key_sha256"] == hashlib.sha256(
        json.dumps({"chain_id": 1, "address": "0xaaa"}, sort_keys=True).encode()).hexdigest()


@pytest.mark.parametrize("key", [{"address": "0xaaa"}, {"chain_id": 1, "address": "0xaaa", "wei": 5},
                                 {"chain_id": 1, "wei": 5}, {"chain_id": "one", "address": "0xaaa"},
                                 {"chain_id": None, "address": "0xaaa"}, {"chain_id": [1], "address": "0xaaa"}])
def test_redaction_needs_exactly_the_unique_key(client: FlaskClient, tenant: Tenant, key: dict[str, Any]) -> None:
    dataset = balances(client, tenant)
    response = client.delete("/v1/datasets/balances/rows", json={"key": key}, headers=tenant.headers("admin"))
    assert error(response) == (400, "invalid_key_filter")
    db.session.expire_all()
    assert len(hot_rows(dataset)) == 4
    assert audit_rows("dataset.redact") == []


def test_parquet_datasets_are_not_redactable(client: FlaskClient, tenant: Tenant) -> None:
    balances(client, tenant)
    response = client.delete("/v1/datasets/summary/rows", json={"key": {"chain_id": 1, "address": "0xaaa"}},
                             headers=tenant.headers("admin"))
    assert error(response) == (409, "not_redactable")
    assert error(client.delete("/v1/datasets/balances/rows", json={}, headers=tenant.headers("admin"))) == \
        (400, "invalid_request")


# -- grants and the visibility contract ------------------------------------------------------


def view_names(org_id: uuid.UUID, user_id: uuid.UUID) -> list[str]:
    db.session.expire_all()
    return [view.name for view in datasets.views_for_user(org_id, user_id)]


def user_id(client: FlaskClient, tenant: Tenant, role: str) -> uuid.UUID:
    return uuid.UUID(client.get("/v1/me", headers=tenant.headers(role)).json["user"]["id"])


def test_a_grant_makes_a_dataset_visible_to_the_other_org(client: FlaskClient,
                                                          make_tenant: Callable[[str], Tenant]) -> None:
    acme, other = make_tenant("acme"), make_tenant("other")
    assert put_dag(client, acme, "d", [job("prices", outputs=[{"dataset": "prices", "schema": [
        {"name": "symbol", "type": "string"}, {"name": "usd", "type": "float64"}]}])]).status_code == 200
    datasets.add_version(fresh(acme.org_id, "prices"), manifest("prices/0.parquet"))
    db.session.commit()
    reader = user_id(client, other, "reader")
    assert view_names(other.org_id, reader) == []

    body = {"dataset": "prices", "org": "other"}
    assert error(client.post("/v1/grants", json=body, headers=acme.headers("writer"))) == (403, "forbidden")
    assert error(client.post("/v1/grants", json={"dataset": "prices", "org": "nobody"},
                             headers=acme.headers())) == (404, "not_found")
    assert error(client.post("/v1/grants", json={"dataset": "nothing", "org": "other"},
                             headers=acme.headers())) == (404, "not_found")
    created = client.post("/v1/grants", json=body, headers=acme.headers("admin"))
    assert created.status_code == 201, created.json
    assert created.json["dataset"] == "prices" and created.json["org"] == "other"
    assert client.post("/v1/grants", json=body, headers=acme.headers("admin")).status_code == 200

    [view] = datasets.views_for_user(other.org_id, reader)
    assert (view.name, view.org_id, view.version, view.parquet_keys, view.hot_table, view.pii) == \
        ("acme__prices", acme.org_id, 1, ("prices/0.parquet",), None, False)
    assert view.columns == (("symbol", "string"), ("usd", "float64"))
    # The other org reads it (never changes it) under that name; the owner still sees its own name.
    assert [d["name"] for d in client.get("/v1/datasets", headers=other.headers()).json] == ["acme__prices"]
    detail = client.get("/v1/datasets/acme__prices", headers=other.headers()).json
    assert detail["owner"] == "acme" and detail["producer_job"] is None and detail["current_version"] == 1
    assert error(client.post("/v1/datasets/acme__prices/rollback", json={"version": 1},
                             headers=other.headers())) == (404, "not_found")
    assert view_names(acme.org_id, user_id(client, acme, "reader")) == ["prices"]
    rows = audit_rows("dataset.grant")
    assert [row.details["new"] for row in rows] == [True, False]
    assert rows[0].details["grantee_org"] == "other" and rows[0].org_id == acme.org_id


def test_pii_datasets_need_a_pii_grant(client: FlaskClient, make_tenant: Callable[[str], Tenant]) -> None:
    acme, other = make_tenant("acme"), make_tenant("other")
    balances(client, acme)
    reader, admin = user_id(client, acme, "reader"), user_id(client, acme, "admin")
    # balances is PII; summary declares no schema yet, so there is nothing to read in it.
    assert view_names(acme.org_id, reader) == []
    url = "/v1/datasets/balances/pii-grants"
    assert error(client.post(url, json={"email": "reader@acme.example"}, headers=acme.headers("writer"))) == \
        (403, "forbidden")
    assert error(client.post(url, json={"email": "nobody@acme.example"}, headers=acme.headers())) == \
        (404, "not_found")
    # A member of an org without a grant on the dataset is no one here.
    assert error(client.post(url, json={"email": "reader@other.example"}, headers=acme.headers())) == \
        (404, "not_found")
    response = client.post(url, json={"email": "reader@acme.example"}, headers=acme.headers("admin"))
    assert response.status_code == 201, response.json
    assert client.post(url, json={"email": "reader@acme.example"}, headers=acme.headers()).status_code == 200
    views = {view.name: view for view in datasets.views_for_user(acme.org_id, reader)}
    assert sorted(views) == ["balances"]
    hot = views["balances"]
    assert (hot.hot_table, hot.parquet_keys, hot.version, hot.pii) == \
        (datasets.hot_table_name(fresh(acme.org_id, "balances")), (), 1, True)
    assert view_names(acme.org_id, admin) == []  # the grant is per user, not per role
    [row] = [r for r in audit_rows("dataset.pii_grant") if r.details["new"]]
    assert row.details["user_id"] == str(reader)

    # Across orgs: after a dataset grant, a member of the grantee org can get a PII grant too.
    assert client.post("/v1/grants", json={"dataset": "balances", "org": "other"},
                       headers=acme.headers()).status_code == 201
    other_reader = user_id(client, other, "reader")
    assert view_names(other.org_id, other_reader) == []
    assert client.post(url, json={"email": "reader@other.example"}, headers=acme.headers()).status_code == 201
    assert view_names(other.org_id, other_reader) == ["acme__balances"]


def test_views_for_capability_are_exactly_the_pinned_versions(client: FlaskClient,
                                                              make_tenant: Callable[[str], Tenant]) -> None:
    acme, other = make_tenant("acme"), make_tenant("other")
    found = chain(client, acme)
    datasets.add_version(found["decoded"], manifest("decoded/1.parquet", "decoded/2.parquet"))  # version 2
    assert put_dag(client, other, "d", [job("theirs", outputs=1)]).status_code == 200
    theirs = fresh(other.org_id, "theirs")
    for index in range(2):
        datasets.add_version(theirs, manifest(f"theirs/{index}.parquet"), mode="append")
    db.session.commit()
    assert client.post("/v1/grants", json={"dataset": "theirs", "org": "acme"},
                       headers=other.headers()).status_code == 201

    def capability(*inputs: dict[str, Any]) -> Capability:
        return Capability(task_id=str(uuid.uuid4()), run_id=str(uuid.uuid4()), attempt=1, fence=1,
                          org_id=str(acme.org_id), job="summarize", inputs=inputs)

    db.session.expire_all()
    views = datasets.views_for_capability(capability({"dataset": "decoded", "version": 1, "partition": None},
                                                     {"dataset": "other__theirs", "version": 1}))
    assert [(v.name, v.version, v.parquet_keys, v.org_id) for v in views] == [
        ("decoded", 1, ("decoded/0.parquet",), acme.org_id),
        ("other__theirs", 1, ("theirs/0.parquet",), other.org_id)]
    [newer] = datasets.views_for_capability(capability({"dataset": "decoded", "version": 2}))
    assert newer.parquet_keys == ("decoded/1.parquet", "decoded/2.parquet")
    [appended] = datasets.views_for_capability(capability({"dataset_id": str(theirs.id), "version": 2}))
    assert appended.parquet_keys == ("theirs/0.parquet", "theirs/1.parquet")
    assert datasets.views_for_capability(capability()) == []
    # A platform source pinned beside a dataset (the seed's block_follower input) is no view.
    [only] = datasets.views_for_capability(capability({"source": "block_follower"},
                                                      {"dataset": "decoded", "version": 1}))
    assert only.name == "decoded"
    for bad in ({"dataset": "decoded", "version": 9}, {"dataset": "theirs", "version": 1},
                {"dataset": "nothing", "version": 1}, {"dataset_id": str(fresh(other.org_id, "theirs").id),
                                                       "version": 1, "note": "ungranted id"}):
        if "note" in bad:
            db.session.execute(text("DELETE FROM dataset_grants"))
        with pytest.raises(NotFound):
            datasets.views_for_capability(capability(bad))
