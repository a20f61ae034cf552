"""Webhook triggers (HMAC-SHA256 over timestamp and body) and the per-org run rate limit."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import replace

from flask.testing import FlaskClient
from sqlalchemy import text

from tests.conftest import Processes, Tenant, wait_for
from tracecore.dags.triggers import sign
from tracecore.db.engine import db
from tracecore.settings import SETTINGS_KEY, Settings, configure

NOOP = "- name: hello\n  runtime: platform\n  operator: noop\n"


def setup_hook(client: FlaskClient, tenant: Tenant) -> tuple[str, str]:
    response = client.put("/v1/dags/hooks", data=NOOP, headers={**tenant.headers(), "Content-Type": "application/yaml"})
    assert response.status_code == 200, response.json
    response = client.post("/v1/jobs/hello/webhooks", headers=tenant.headers("writer"))
    assert response.status_code == 201, response.json
    assert response.json["secret"].startswith("whsec_")
    return response.json["id"], response.json["secret"]


def post(client: FlaskClient, trigger_id: str, secret: str, body: bytes, *, timestamp: int | None = None,
         signature: str | None = None):
    ts = str(int(time.time()) if timestamp is None else timestamp)
    return client.post(f"/v1/hooks/{trigger_id}", data=body, headers={
        "Content-Type": "application/json", "X-Trace-Timestamp": ts,
        "X-Trace-Signature": signature or sign(secret, ts, body)})


def test_a_good_signature_runs_the_job_with_the_body_as_parameters(
        client: FlaskClient, tenant: Tenant, processes: Processes) -> None:
    trigger_id, secret = setup_hook(client, tenant)
    processes.worker()
    response = post(client, trigger_id, secret, json.dumps({"block": 42}).encode())
    assert response.status_code == 202, response.json
    run_id = response.json["run_id"]

    def finished() -> dict | None:
        db.session.rollback()
        run = client.get(f"/v1/runs/{run_id}", headers=tenant.headers("reader")).json
        return run if run["status"] == "succeeded" else None

    run = wait_for(finished, timeout=60, message="the webhook run")
    assert run["cause"] == "webhook" and run["parameters"] == {"block": 42}


def test_the_secret_is_stored_encrypted(client: FlaskClient, tenant: Tenant) -> None:
    _, secret = setup_hook(client, tenant)
    stored = db.session.execute(text("SELECT secret_encrypted FROM webhook_triggers")).scalar()
    assert secret.encode() not in bytes(stored)


def test_bad_stale_and_replayed_signatures_are_401(client: FlaskClient, tenant: Tenant) -> None:
    trigger_id, secret = setup_hook(client, tenant)
    body = b'{"a": 1}'
    bad = post(client, trigger_id, secret, body, signature="sha256=" + "0" * 64)
    assert bad.status_code == 401 and bad.json["error"]["code"] == "bad_signature"
    wrong_key = post(client, trigger_id, secret, body, signature=sign("whsec_other", str(int(time.time())), body))
    assert wrong_key.status_code == 401
    stale_ts = int(time.time()) - 301
    stale = post(client, trigger_id, secret, body, timestamp=stale_ts)
    assert stale.status_code == 401 and stale.json["error"]["code"] == "stale_timestamp"
    ts = int(time.time())
    assert post(client, trigger_id, secret, body, timestamp=ts).status_code == 202
    replay = post(client, trigger_id, secret, body, timestamp=ts)
    assert replay.status_code == 401 and replay.json["error"]["code"] == "replayed_signature"
    missing = client.post(f"/v1/hooks/{trigger_id}", data=body)
    assert missing.status_code == 401
    db.session.rollback()
    assert db.session.execute(text("SELECT count(*) FROM runs WHERE cause = 'webhook'")).scalar() == 1


def test_unknown_trigger_is_404_and_non_json_is_400(client: FlaskClient, tenant: Tenant) -> None:
    trigger_id, secret = setup_hook(client, tenant)
    unknown = post(client, str(uuid.uuid4()), secret, b"{}")
    assert unknown.status_code == 404 and unknown.json["error"]["code"] == "not_found"
    assert post(client, "not-a-uuid", secret, b"{}").status_code == 404
    not_json = post(client, trigger_id, secret, b"block=42")
    assert not_json.status_code == 400 and not_json.json["error"]["code"] == "invalid_json"


def test_creating_a_webhook_needs_a_writer_and_a_job(client: FlaskClient, tenant: Tenant) -> None:
    setup_hook(client, tenant)
    assert client.post("/v1/jobs/hello/webhooks", headers=tenant.headers("reader")).status_code == 403
    assert client.post("/v1/jobs/nope/webhooks", headers=tenant.headers("writer")).status_code == 404


def test_api_triggered_runs_are_rate_limited_per_org(client: FlaskClient, tenant: Tenant, make_tenant,
                                                     settings: Settings) -> None:
    app = client.application
    app.config[SETTINGS_KEY] = configure(replace(settings, run_rate_limit=2, run_rate_window=60))
    trigger_id, secret = setup_hook(client, tenant)
    for _ in range(2):
        assert client.post("/v1/jobs/hello/runs", json={}, headers=tenant.headers("writer")).status_code == 202
    limited = client.post("/v1/jobs/hello/runs", json={}, headers=tenant.headers("writer"))
    assert limited.status_code == 429, limited.json
    assert limited.json["error"]["code"] == "rate_limited"
    assert 1 <= int(limited.headers["Retry-After"]) <= 60
    hooked = post(client, trigger_id, secret, b"{}")
    assert hooked.status_code == 429 and "Retry-After" in hooked.headers
    other = make_tenant("globex")
    response = client.put("/v1/dags/hooks", data=NOOP, headers={**other.headers(), "Content-Type": "application/yaml"})
    assert response.status_code == 200
    assert client.post("/v1/jobs/hello/runs", json={}, headers=other.headers("writer")).status_code == 202
    db.session.rollback()
    assert db.session.execute(text("SELECT count(*) FROM runs WHERE org_id = :o"),
                              {"o": tenant.org_id}).scalar() == 2
