"""Smoke of the API over real PostgreSQL: health, me, a DAG, a run row."""

from __future__ import annotations

from flask.testing import FlaskClient

from tests.conftest import Tenant

HELLO = "- name: hello\n  runtime: platform\n  operator: noop\n"


def test_healthz_answers_without_auth(client: FlaskClient) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json == {"status": "ok", "checks": {"database": True, "broker": True}}


def test_me_needs_a_token(client: FlaskClient, tenant: Tenant) -> None:
    assert client.get("/v1/me").status_code == 401
    assert client.get("/v1/me", headers={"Authorization": "Bearer trc_nope"}).json["error"]["code"] == \
        "unauthenticated"
    me = client.get("/v1/me", headers=tenant.headers("writer")).json
    assert me["role"] == "writer" and me["org"]["name"] == "acme"


def test_put_dag_then_trigger_creates_a_queued_run(client: FlaskClient, tenant: Tenant) -> None:
    put = client.put("/v1/dags/greetings", data=HELLO, headers={**tenant.headers(), "Content-Type":
                                                                 "application/yaml"})
    assert put.status_code == 200, put.json
    created = client.post("/v1/jobs/hello/runs", json={}, headers=tenant.headers("writer"))
    assert created.status_code == 202
    run = client.get(f"/v1/runs/{created.json['run_id']}", headers=tenant.headers("reader")).json
    assert run["status"] == "queued" and run["job"] == "hello"
    assert [task["status"] for task in run["tasks"]] == ["queued"]
