"""Smoke of the API over real PostgreSQL: health, me, a DAG, a run row."""

from __future__ import annotations

from dataclasses import replace

from flask.testing import FlaskClient

from tests.conftest import Tenant
from tracecore.db.engine import db
from tracecore.settings import Settings
from web.app import create_app

HELLO = "- name: hello\n  runtime: platform\n  operator: noop\n"


def test_healthz_answers_without_auth(client: FlaskClient) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json == {"status": "ok", "checks": {"database": True, "broker": True}}


def test_healthz_without_a_broker_is_unavailable_not_an_error(settings: Settings, clean_state: None) -> None:
    # Settings type broker_url as optional (unset: embedded Redis); an app that got none reports it down.
    app = create_app(replace(settings, broker_url=None))
    with app.app_context():
        response = app.test_client().get("/healthz")
        db.session.remove()
        db.engine.dispose()
    assert response.status_code == 503
    assert response.json == {"status": "unavailable", "checks": {"database": True, "broker": False}}


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


def test_a_body_that_is_not_json_is_415_and_starts_nothing(client: FlaskClient, tenant: Tenant) -> None:
    client.put("/v1/dags/greetings", data=HELLO, headers={**tenant.headers(), "Content-Type": "application/yaml"})
    writer = tenant.headers("writer")
    for body, content_type in ((b"parameters=1", "application/x-www-form-urlencoded"),
                               (b'{"parameters": {"a": 1}}', "text/plain"), (b"{}", None)):
        headers = {**writer, **({"Content-Type": content_type} if content_type else {})}
        refused = client.post("/v1/jobs/hello/runs", data=body, headers=headers)
        assert refused.status_code == 415, refused.json
        assert refused.json["error"]["code"] == "unsupported_media_type"
        assert "application/json" in refused.json["error"]["message"]
    assert client.get("/v1/runs", headers=writer).json == []
    # no body at all: every field takes its default
    assert client.post("/v1/jobs/hello/runs", headers=writer).status_code == 202
    assert client.post("/v1/dags/greetings/runs", headers=writer).status_code == 202
