"""Tenancy over real PostgreSQL: org isolation (404, never 403), roles, orgs, tokens, error shapes."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable
from dataclasses import replace

import pytest
from flask.testing import FlaskClient
from sqlalchemy import create_engine, func, select, update

from tests.conftest import Tenant, wait_for
from tracecore.db.engine import db, sqlalchemy_url
from tracecore.exceptions import NotFound
from tracecore.settings import SETTINGS_KEY, Settings, configure
from tracecore.tenancy import orgs
from tracecore.tenancy.orgs import ApiToken, Role

HELLO = "- name: hello\n  runtime: platform\n  operator: noop\n  outputs: 1\n"
YAML = {"Content-Type": "application/yaml"}


def put_dag(client: FlaskClient, tenant: Tenant, name: str = "pipeline", body: str = HELLO,
            role: str = "writer") -> int:
    return client.put(f"/v1/dags/{name}", data=body, headers={**tenant.headers(role), **YAML}).status_code


def trigger(client: FlaskClient, tenant: Tenant, job: str = "hello", role: str = "writer") -> str:
    response = client.post(f"/v1/jobs/{job}/runs", json={}, headers=tenant.headers(role))
    assert response.status_code == 202, response.json
    return response.json["run_id"]


def assert_error(response: object, status: int, code: str) -> dict:
    assert response.status_code == status, response.json  # type: ignore[attr-defined]
    body = response.json  # type: ignore[attr-defined]
    assert set(body) == {"error"} and body["error"]["code"] == code, body
    assert set(body["error"]) <= {"code", "message", "details"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


@pytest.fixture
def two_orgs(make_tenant: Callable[[str], Tenant]) -> tuple[Tenant, Tenant]:
    return make_tenant("acme"), make_tenant("globex")


def test_another_orgs_rows_answer_404_never_403(client: FlaskClient, two_orgs: tuple[Tenant, Tenant]) -> None:
    a, b = two_orgs
    assert put_dag(client, a) == 200
    run_id = trigger(client, a)
    for role in ("reader", "writer", "admin"):
        for path in ("/v1/dags/pipeline", "/v1/jobs/hello", f"/v1/runs/{run_id}", "/v1/runs?job=hello"):
            assert_error(client.get(path, headers=b.headers(role)), 404, "not_found")
    for role in ("writer", "admin"):
        assert_error(client.post("/v1/jobs/hello/runs", json={}, headers=b.headers(role)), 404, "not_found")
    # A reader of B gets the same answer for A's job as for a job that exists nowhere: no existence leak.
    for_a = client.post("/v1/jobs/hello/runs", json={}, headers=b.headers("reader"))
    for_none = client.post("/v1/jobs/nothing/runs", json={}, headers=b.headers("reader"))
    assert for_a.status_code in (403, 404)
    assert (for_a.status_code, for_a.json) == (for_none.status_code, for_none.json)
    assert client.get("/v1/runs", headers=a.headers()).json[0]["id"] == run_id  # B created no run
    assert len(client.get("/v1/runs", headers=a.headers()).json) == 1
    # The same requests succeed for A, so the 404s above are about the org, not the request.
    assert client.get("/v1/dags/pipeline", headers=a.headers("reader")).status_code == 200
    assert client.get("/v1/jobs/hello", headers=a.headers("reader")).status_code == 200
    assert client.get(f"/v1/runs/{run_id}", headers=a.headers("reader")).json["id"] == run_id
    assert [run["id"] for run in client.get("/v1/runs?job=hello", headers=a.headers()).json] == [run_id]


def test_another_orgs_rows_are_absent_from_lists(client: FlaskClient, two_orgs: tuple[Tenant, Tenant]) -> None:
    a, b = two_orgs
    assert put_dag(client, a) == 200
    a_run = trigger(client, a)
    assert client.get("/v1/dags", headers=b.headers()).json == []
    assert client.get("/v1/runs", headers=b.headers()).json == []
    assert client.get("/v1/runs?status=queued", headers=b.headers()).json == []
    # B may use the same DAG and job names: names are per org.
    assert put_dag(client, b, body=HELLO.replace("outputs: 1", "outputs: 2")) == 200
    b_run = trigger(client, b)
    assert [dag["name"] for dag in client.get("/v1/dags", headers=b.headers()).json] == ["pipeline"]
    assert [run["id"] for run in client.get("/v1/runs", headers=b.headers()).json] == [b_run]
    assert [run["id"] for run in client.get("/v1/runs", headers=a.headers()).json] == [a_run]
    a_job = client.get("/v1/jobs/hello", headers=a.headers()).json
    b_job = client.get("/v1/jobs/hello", headers=b.headers()).json
    assert (a_job["spec"]["outputs"], b_job["spec"]["outputs"]) == (1, 2)
    assert client.get("/v1/dags/pipeline", headers=a.headers()).json["current_version"] == 1
    assert_error(client.get(f"/v1/runs/{a_run}", headers=b.headers()), 404, "not_found")
    assert_error(client.get(f"/v1/runs/{b_run}", headers=a.headers()), 404, "not_found")


def test_another_orgs_job_is_not_an_input(client: FlaskClient, two_orgs: tuple[Tenant, Tenant]) -> None:
    a, b = two_orgs
    assert put_dag(client, a) == 200
    body = "- name: reader_job\n  runtime: platform\n  operator: noop\n  inputs: [{from: {job: hello, output: 0}}]\n"
    response = client.put("/v1/dags/consumer", data=body, headers={**b.headers(), **YAML})
    error = assert_error(response, 400, "unknown_input_job")
    assert error["details"]["path"] == "jobs[0].inputs[0].from.job"
    assert client.put("/v1/dags/consumer", data=body, headers={**a.headers(), **YAML}).status_code == 200


@pytest.mark.parametrize("run_id", [str(uuid.uuid4()), "not-a-uuid", "1", "00000000-0000-0000-0000-000000000000"])
def test_unknown_or_malformed_run_ids_answer_404(client: FlaskClient, tenant: Tenant, run_id: str) -> None:
    assert_error(client.get(f"/v1/runs/{run_id}", headers=tenant.headers()), 404, "not_found")


def test_roles(client: FlaskClient, tenant: Tenant) -> None:
    error = assert_error(client.put("/v1/dags/pipeline", data=HELLO, headers={**tenant.headers("reader"), **YAML}),
                         403, "forbidden")
    assert "writer" in error["message"]
    assert client.get("/v1/dags/pipeline", headers=tenant.headers()).status_code == 404  # nothing was saved
    assert put_dag(client, tenant, role="writer") == 200
    assert_error(client.post("/v1/jobs/hello/runs", json={}, headers=tenant.headers("reader")), 403, "forbidden")
    assert client.get("/v1/runs", headers=tenant.headers()).json == []
    run_id = trigger(client, tenant, role="writer")
    assert trigger(client, tenant, role="admin") != run_id
    # A reader reads everything of its org.
    assert client.get(f"/v1/runs/{run_id}", headers=tenant.headers("reader")).status_code == 200
    assert len(client.get("/v1/runs", headers=tenant.headers("reader")).json) == 2
    assert client.get("/v1/dags", headers=tenant.headers("reader")).status_code == 200
    assert put_dag(client, tenant, role="admin") == 200


def test_an_admin_issues_a_reader_token_for_a_new_email(client: FlaskClient, tenant: Tenant) -> None:
    response = client.post("/v1/tokens", json={"email": "new@acme.example", "role": "reader", "name": "ci"},
                           headers=tenant.headers("admin"))
    assert response.status_code == 201, response.json
    issued = response.json
    assert (issued["email"], issued["role"], issued["org"]) == ("new@acme.example", "reader", "acme")
    assert issued["token"].startswith("trc_")
    headers = {"Authorization": f"Bearer {issued['token']}"}
    me = client.get("/v1/me", headers=headers).json
    assert (me["user"]["email"], me["role"], me["org"]["name"]) == ("new@acme.example", "reader", "acme")
    assert me["user"]["installation_admin"] is False
    assert_error(client.put("/v1/dags/pipeline", data=HELLO, headers={**headers, **YAML}), 403, "forbidden")
    stored = db.session.scalar(select(ApiToken).where(ApiToken.id == uuid.UUID(issued["id"])))
    assert stored.token_hash == hashlib.sha256(issued["token"].encode()).hexdigest() != issued["token"]

    # The admin can raise the new member to writer with a second token.
    promoted = client.post("/v1/tokens", json={"email": "new@acme.example", "role": "writer"},
                           headers=tenant.headers("admin"))
    assert promoted.status_code == 201
    assert client.put("/v1/dags/pipeline", data=HELLO,
                      headers={"Authorization": f"Bearer {promoted.json['token']}", **YAML}).status_code == 200


def test_a_writer_cannot_issue_tokens_for_others(client: FlaskClient, tenant: Tenant) -> None:
    for body in ({"email": "x@acme.example", "role": "reader"}, {"role": "admin"}, {"email": "x@acme.example"}):
        assert_error(client.post("/v1/tokens", json=body, headers=tenant.headers("writer")), 403, "forbidden")
    assert db.session.scalar(select(func.count()).select_from(orgs.User)
                             .where(orgs.User.email == "x@acme.example")) == 0
    # Nobody escalated: the writer is still a writer.
    assert client.get("/v1/me", headers=tenant.headers("writer")).json["role"] == "writer"
    # Any member may issue another token for themself, with their own role.
    own = client.post("/v1/tokens", json={"name": "laptop"}, headers=tenant.headers("writer"))
    assert own.status_code == 201
    assert (own.json["email"], own.json["role"]) == ("writer@acme.example", "writer")
    assert client.get("/v1/me", headers={"Authorization": f"Bearer {own.json['token']}"}).json["role"] == "writer"


@pytest.fixture
def installation_admin(tenant: Tenant) -> dict[str, str]:
    user = orgs.get_or_create_user("root@install.example", installation_admin=True)
    org = db.session.get(orgs.Org, tenant.org_id)
    orgs.add_member(org, user, Role.admin)
    _, token = orgs.issue_token(org.id, user.id, installation_admin=True)
    db.session.commit()
    return {"Authorization": f"Bearer {token}"}


def test_only_an_installation_admin_creates_orgs(client: FlaskClient, tenant: Tenant,
                                                 installation_admin: dict[str, str]) -> None:
    for role in ("reader", "writer", "admin"):
        assert_error(client.post("/v1/orgs", json={"name": "newco"}, headers=tenant.headers(role)), 403, "forbidden")
    assert db.session.scalar(select(orgs.Org.id).where(orgs.Org.name == "newco")) is None

    created = client.post("/v1/orgs", json={"name": "newco"}, headers=installation_admin)
    assert created.status_code == 201, created.json
    assert created.json["name"] == "newco" and "admin_token" not in created.json
    assert db.session.scalar(select(orgs.Org.id).where(orgs.Org.name == "newco")) == uuid.UUID(created.json["id"])
    assert_error(client.post("/v1/orgs", json={"name": "newco"}, headers=installation_admin), 409, "org_exists")


def test_a_new_org_with_admin_email_answers_a_working_admin_token_once(
        client: FlaskClient, tenant: Tenant, installation_admin: dict[str, str]) -> None:
    created = client.post("/v1/orgs", json={"name": "newco", "admin_email": "boss@newco.example"},
                          headers=installation_admin)
    assert created.status_code == 201, created.json
    token = created.json["admin_token"]
    assert token.startswith("trc_")
    headers = {"Authorization": f"Bearer {token}"}
    me = client.get("/v1/me", headers=headers).json
    assert (me["org"]["name"], me["role"], me["user"]["email"]) == ("newco", "admin", "boss@newco.example")
    assert me["org"]["id"] == created.json["id"]
    assert token not in str(me)
    # The new admin works in the new org, and sees nothing of the installation admin's org.
    assert client.put("/v1/dags/pipeline", data=HELLO, headers={**headers, **YAML}).status_code == 200
    assert client.get("/v1/dags", headers=tenant.headers()).json == []
    reader = client.post("/v1/tokens", json={"email": "staff@newco.example", "role": "reader"}, headers=headers)
    assert reader.status_code == 201 and reader.json["org"] == "newco"
    assert_error(client.post("/v1/orgs", json={"name": "another"}, headers=headers), 403, "forbidden")

    # Only a SHA-256 of the token is stored, nowhere the token itself.
    stored = db.session.execute(select(ApiToken.token_hash, ApiToken.display_prefix, ApiToken.name)
                                .where(ApiToken.org_id == uuid.UUID(created.json["id"]),
                                       ApiToken.token_hash == hashlib.sha256(token.encode()).hexdigest())).one()
    assert stored.token_hash != token and len(stored.token_hash) == 64
    assert token not in stored.display_prefix and len(stored.display_prefix) < len(token)
    every_hash = db.session.scalars(select(ApiToken.token_hash)).all()
    assert token not in every_hash
    assert all(len(value) == 64 and int(value, 16) >= 0 for value in every_hash)


def test_revoked_expired_and_unknown_tokens_answer_401(client: FlaskClient, tenant: Tenant) -> None:
    member = db.session.scalar(select(orgs.User).where(orgs.User.email == "writer@acme.example"))
    revoked, revoked_clear = orgs.issue_token(tenant.org_id, member.id)
    expired, expired_clear = orgs.issue_token(tenant.org_id, member.id)
    db.session.commit()
    for clear in (revoked_clear, expired_clear):
        assert client.get("/v1/me", headers={"Authorization": f"Bearer {clear}"}).status_code == 200
    orgs.revoke_token(tenant.org_id, revoked.id)
    db.session.execute(update(ApiToken).where(ApiToken.id == expired.id)
                       .values(expires_at=func.now() - func.make_interval(0, 0, 0, 0, 1)))
    db.session.commit()
    orgs.forget_tokens()  # the expiry was moved behind the API's back (see the trust tests below)

    cases = {
        "revoked": {"Authorization": f"Bearer {revoked_clear}"},
        "expired": {"Authorization": f"Bearer {expired_clear}"},
        "unknown": {"Authorization": "Bearer trc_" + "x" * 43},
        "lowercase scheme, unknown": {"Authorization": "bearer nope"},
        "no header": {},
        "empty bearer": {"Authorization": "Bearer "},
        "basic": {"Authorization": f"Basic {tenant.tokens['admin']}"},
        "bare token": {"Authorization": tenant.tokens["admin"]},
    }
    for case, headers in cases.items():
        for method, path in (("get", "/v1/me"), ("get", "/v1/dags"), ("put", "/v1/dags/pipeline"),
                             ("post", "/v1/jobs/hello/runs"), ("get", f"/v1/runs/{uuid.uuid4()}")):
            response = getattr(client, method)(path, headers=headers, json={})
            assert response.status_code == 401, (case, path, response.json)
            assert response.json["error"]["code"] == "unauthenticated", (case, path)
            assert set(response.json) == {"error"} and response.json["error"]["message"]
    # The other tokens of the same user still work.
    assert client.get("/v1/me", headers=tenant.headers("writer")).status_code == 200


# --- TRACE_TOKEN_TRUST_SECONDS: a token resolved lately is not asked about again ----------------------------


def _trust(client: FlaskClient, settings: Settings, seconds: float) -> None:
    client.application.config[SETTINGS_KEY] = configure(replace(settings, token_trust_seconds=seconds))


def _revoke_elsewhere(token_id: uuid.UUID) -> None:
    """Revoke as another API process would: this process is not told."""
    engine = create_engine(sqlalchemy_url(str(db.engine.url.render_as_string(hide_password=False))))
    with engine.begin() as connection:
        connection.execute(update(ApiToken).where(ApiToken.id == token_id).values(revoked_at=func.now()))
    engine.dispose()


def _fresh_token(tenant: Tenant) -> tuple[uuid.UUID, dict[str, str]]:
    member = db.session.scalar(select(orgs.User).where(orgs.User.email == "writer@acme.example"))
    token, clear = orgs.issue_token(tenant.org_id, member.id)
    db.session.commit()
    return token.id, {"Authorization": f"Bearer {clear}"}


def test_a_token_revoked_elsewhere_is_refused_once_the_trust_period_ends(
        client: FlaskClient, tenant: Tenant, settings: Settings) -> None:
    _trust(client, settings, 5.0)
    token_id, headers = _fresh_token(tenant)
    assert client.get("/v1/me", headers=headers).status_code == 200
    _revoke_elsewhere(token_id)
    assert client.get("/v1/me", headers=headers).status_code == 200  # trusted: the database was not asked
    wait_for(lambda: client.get("/v1/me", headers=headers).status_code == 401, timeout=15, interval=0.2,
             message="the revoked token to be refused after the trust period")


def test_without_trust_every_request_asks_the_database(client: FlaskClient, tenant: Tenant,
                                                       settings: Settings) -> None:
    _trust(client, settings, 0)
    token_id, headers = _fresh_token(tenant)
    assert client.get("/v1/me", headers=headers).status_code == 200
    _revoke_elsewhere(token_id)
    assert client.get("/v1/me", headers=headers).status_code == 401


def test_this_processs_own_revocations_and_role_changes_take_effect_at_once(
        client: FlaskClient, tenant: Tenant, settings: Settings) -> None:
    _trust(client, settings, 3600)
    token_id, headers = _fresh_token(tenant)
    assert client.get("/v1/me", headers=headers).status_code == 200
    orgs.revoke_token(tenant.org_id, token_id)
    db.session.commit()
    assert client.get("/v1/me", headers=headers).status_code == 401
    writer = tenant.headers("writer")
    body = {"data": "- name: hello\n  runtime: platform\n  operator: noop\n"}
    put = {"headers": {**writer, "Content-Type": "application/yaml"}, "data": body["data"]}
    assert client.put("/v1/dags/trusted", **put).status_code == 200
    org = db.session.get(orgs.Org, tenant.org_id)
    member = db.session.scalar(select(orgs.User).where(orgs.User.email == "writer@acme.example"))
    orgs.add_member(org, member, Role.reader)  # demoted
    db.session.commit()
    assert client.put("/v1/dags/trusted", **put).status_code == 403


def test_revoking_is_scoped_to_the_org(client: FlaskClient, two_orgs: tuple[Tenant, Tenant]) -> None:
    a, b = two_orgs
    member = db.session.scalar(select(orgs.User).where(orgs.User.email == "writer@acme.example"))
    token, clear = orgs.issue_token(a.org_id, member.id)
    db.session.commit()
    with pytest.raises(NotFound):
        orgs.revoke_token(b.org_id, token.id)
    db.session.rollback()
    assert client.get("/v1/me", headers={"Authorization": f"Bearer {clear}"}).status_code == 200


@pytest.mark.parametrize(("method", "path", "body", "location", "field"), [
    ("post", "/v1/jobs/hello/runs", {"config": "notadict"}, "json", "config"),
    ("post", "/v1/jobs/hello/runs", {"parameters": [1, 2]}, "json", "parameters"),
    ("post", "/v1/jobs/hello/runs", {"config": {}, "colour": "red"}, "json", "colour"),
    ("get", "/v1/runs?status=exploded", None, "query", "status"),
    ("get", "/v1/runs?limit=0", None, "query", "limit"),
    ("get", "/v1/runs?limit=lots", None, "query", "limit"),
    ("post", "/v1/tokens", {"role": "emperor"}, "json", "role"),
    ("post", "/v1/tokens", {"email": "not an email", "role": "reader"}, "json", "email"),
    ("post", "/v1/orgs", {"name": "Not A Name!"}, "json", "name"),
    ("post", "/v1/orgs", {}, "json", "name"),
])
def test_bad_request_bodies_answer_400_with_field_errors(client: FlaskClient, tenant: Tenant, method: str,
                                                         path: str, body: dict | None, location: str,
                                                         field: str) -> None:
    assert put_dag(client, tenant) == 200
    response = getattr(client, method)(path, json=body, headers=tenant.headers("admin"))
    error = assert_error(response, 400, "invalid_request")
    fields = error["details"]["fields"]
    assert set(fields) == {location}, fields
    assert field in fields[location], fields
    assert all(isinstance(message, str) for message in fields[location][field])
    assert client.get("/v1/runs", headers=tenant.headers()).json == []  # no run was created


def test_a_valid_trigger_body_is_stored_on_the_run(client: FlaskClient, tenant: Tenant) -> None:
    assert put_dag(client, tenant) == 200
    response = client.post("/v1/jobs/hello/runs", json={"config": {"depth": 2}, "parameters": {"p": "x"}},
                           headers=tenant.headers("writer"))
    assert response.status_code == 202, response.json
    run = client.get(f"/v1/runs/{response.json['run_id']}", headers=tenant.headers()).json
    assert run["config_overrides"] == {"depth": 2} and run["parameters"] == {"p": "x"}
    assert run["cause"] == "manual" and run["job"] == "hello"
    me = client.get("/v1/me", headers=tenant.headers("writer")).json
    assert run["triggered_by"] == me["user"]["id"]
