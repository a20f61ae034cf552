"""Tenancy and roles across every endpoint, and every way to gain standing one should not have.

The catalogue below names every authenticated route with the least role it needs and a valid
request against org A's own objects; a route missing from it fails the suite, so a new endpoint
cannot arrive untried. For each route: no token is 401, every lower role is 403, another org's
admin gets exactly what a never-existing object gets (404, no existence leak), and no list shows
another org's rows. Then the principal classes: tokens minted for users whose standing lies
elsewhere, installation power through org endpoints, self-escalation, the last admin.
"""

from __future__ import annotations

import io
import json
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import func, select, update
from werkzeug.test import TestResponse

from tests.conftest import Tenant
from tests.unit.execution.test_bundles import PY, make_zip
from tracecore.db.engine import db
from tracecore.exceptions import Conflict
from tracecore.tenancy import orgs
from tracecore.tenancy.orgs import ApiToken, Role

# Routes authenticated by their own schemes or by none.
NOT_BEARER = {"/healthz", "/v1/openapi.json", "/v1/task/<path:rest>", "/v1/hooks/<trigger_id>",
              "/static/<path:filename>"}

DAG = [
    {"name": "acme_hello", "runtime": "platform", "operator": "noop",
     "outputs": [{"dataset": "acme_labels", "kind": "buffered",
                  "schema": [{"name": "address", "type": "string", "nullable": False}]}],
     "unique_key": ["address"]},
    {"name": "acme_ticker", "runtime": "platform", "operator": "noop", "activation": "scheduled",
     "schedule": "0 0 1 1 *"},
]


@dataclass
class World:
    """Org A with one object of every kind, org B empty; ids of A's objects by kind."""

    a: Tenant
    b: Tenant
    ids: dict[str, str] = field(default_factory=dict)

    def values(self, missing: bool = False) -> dict[str, str]:
        """A's objects (or, with ``missing``, objects that exist nowhere) by placeholder."""
        values = {"name": "acme_pipeline", "job": "acme_hello", "ticker": "acme_ticker", "dataset": "acme_labels",
                  **self.ids}
        if missing:
            values = {key: str(uuid.UUID(int=index + 1)) if key.endswith("id") else f"nothing_{key}"
                      for index, key in enumerate(values)}
            values["email"] = "nobody@nowhere.example"
        return values

    def fill(self, template: str, missing: bool = False) -> str:
        return template.format(**self.values(missing))

    def anonymous(self, response: TestResponse, missing: bool = False) -> tuple[int, str]:
        """Status and body with the object's names blanked: what would tell one object from another."""
        text = response.get_data(as_text=True)
        for value in self.values(missing).values():
            text = text.replace(value, "<object>")
        return response.status_code, text


@dataclass(frozen=True)
class Route:
    method: str
    rule: str            # as Flask's url_map has it
    path: str            # with {placeholders} that World.fill fills
    role: str            # the least role; "installation" for installation power
    body: Callable[[World], dict[str, Any]] = lambda world: {"json": {}}
    scoped: bool = True  # names an object of the org in its path


def _bundle_form(world: World) -> dict[str, Any]:
    return {"data": {"file": (io.BytesIO(make_zip(*PY)), "bundle.zip", "application/zip"),
                     "runtime": "python3.11", "handler": "trace.handler"}, "content_type": "multipart/form-data"}


def _dag_body(world: World) -> dict[str, Any]:
    return {"data": json.dumps(DAG), "content_type": "application/json"}


ROUTES = [
    Route("POST", "/v1/orgs", "/v1/orgs", "installation", lambda w: {"json": {"name": f"o{uuid.uuid4().hex[:8]}"}},
          scoped=False),
    Route("POST", "/v1/tokens", "/v1/tokens", "reader", lambda w: {"json": {"name": "t"}}, scoped=False),
    Route("GET", "/v1/tokens", "/v1/tokens", "reader", scoped=False),
    Route("DELETE", "/v1/tokens/<token_id>", "/v1/tokens/{token_id}", "reader"),
    Route("GET", "/v1/members", "/v1/members", "reader", scoped=False),
    Route("POST", "/v1/members", "/v1/members", "admin",
          lambda w: {"json": {"email": f"m{uuid.uuid4().hex[:8]}@acme.example"}}, scoped=False),
    Route("PATCH", "/v1/members/<email>", "/v1/members/{email}", "admin", lambda w: {"json": {"role": "writer"}}),
    Route("DELETE", "/v1/members/<email>", "/v1/members/{email}", "admin"),
    Route("GET", "/v1/me", "/v1/me", "reader", scoped=False),
    Route("POST", "/v1/bundles", "/v1/bundles", "writer", _bundle_form, scoped=False),
    Route("GET", "/v1/bundles", "/v1/bundles", "reader", scoped=False),
    Route("GET", "/v1/bundles/<bundle_id>", "/v1/bundles/{bundle_id}", "reader"),
    Route("GET", "/v1/runtimes", "/v1/runtimes", "reader", scoped=False),
    # Chains are platform objects: every member reads them, only the installation registers and backfills.
    Route("POST", "/v1/chains", "/v1/chains", "installation",
          lambda w: {"json": {"name": "c" + uuid.uuid4().hex[:8], "chain_id": 1, "rpc_urls": ["http://127.0.0.1:9"]}},
          scoped=False),
    Route("GET", "/v1/chains", "/v1/chains", "reader", scoped=False),
    Route("GET", "/v1/chains/<name>", "/v1/chains/nochain", "reader"),
    Route("GET", "/v1/chains/<name>/reorgs", "/v1/chains/nochain/reorgs", "reader"),
    Route("POST", "/v1/chains/<name>/resume", "/v1/chains/nochain/resume", "installation"),
    Route("POST", "/v1/chains/<name>/backfills", "/v1/chains/nochain/backfills", "installation",
          lambda w: {"json": {"from_block": 0, "to_block": 999}}),
    Route("GET", "/v1/backfills/<backfill_id>", "/v1/backfills/" + str(uuid.UUID(int=7)), "reader"),
    Route("PUT", "/v1/dags/<name>", "/v1/dags/{name}", "writer", _dag_body, scoped=False),
    Route("GET", "/v1/dags", "/v1/dags", "reader", scoped=False),
    Route("GET", "/v1/dags/<name>", "/v1/dags/{name}", "reader"),
    Route("POST", "/v1/dags/<name>/runs", "/v1/dags/{name}/runs", "writer"),
    Route("GET", "/v1/jobs/<name>", "/v1/jobs/{job}", "reader"),
    Route("POST", "/v1/jobs/<name>/runs", "/v1/jobs/{job}/runs", "writer"),
    Route("POST", "/v1/jobs/<name>/schedule/pause", "/v1/jobs/{ticker}/schedule/pause", "writer"),
    Route("POST", "/v1/jobs/<name>/schedule/resume", "/v1/jobs/{ticker}/schedule/resume", "writer"),
    Route("GET", "/v1/jobs/<name>/firings", "/v1/jobs/{job}/firings", "reader"),
    Route("POST", "/v1/jobs/<name>/webhooks", "/v1/jobs/{job}/webhooks", "writer"),
    Route("GET", "/v1/runs", "/v1/runs", "reader", scoped=False),
    Route("GET", "/v1/runs/<run_id>", "/v1/runs/{run_id}", "reader"),
    Route("POST", "/v1/runs/<run_id>/rerun", "/v1/runs/{run_id}/rerun", "writer",
          lambda w: {"json": {"scope": "self"}}),
    Route("GET", "/v1/datasets", "/v1/datasets", "reader", scoped=False),
    Route("GET", "/v1/datasets/<name>", "/v1/datasets/{dataset}", "reader"),
    Route("POST", "/v1/datasets/<name>/rollback", "/v1/datasets/{dataset}/rollback", "writer",
          lambda w: {"json": {"version": 1}}),
    Route("DELETE", "/v1/datasets/<name>/rows", "/v1/datasets/{dataset}/rows", "admin",
          lambda w: {"json": {"key": {"address": "0xabc"}}}),
    Route("POST", "/v1/datasets/<name>/pii-grants", "/v1/datasets/{dataset}/pii-grants", "admin",
          lambda w: {"json": {"email": "reader@acme.example"}}),
    Route("POST", "/v1/grants", "/v1/grants", "admin", lambda w: {"json": {"dataset": "acme_labels", "org": "globex"}},
          scoped=False),
    Route("GET", "/v1/lineage", "/v1/lineage", "reader", scoped=False),
    Route("POST", "/v1/query", "/v1/query", "reader", lambda w: {"json": {"sql": "SELECT 1 AS one"}}, scoped=False),
    Route("POST", "/v1/saved-queries", "/v1/saved-queries", "reader",
          lambda w: {"json": {"name": f"q{uuid.uuid4().hex[:6]}", "sql": "SELECT 1"}}, scoped=False),
    Route("GET", "/v1/saved-queries", "/v1/saved-queries", "reader", scoped=False),
    Route("GET", "/v1/downloads/<download_id>", "/v1/downloads/{download_id}", "reader"),
]
LEVELS = {"reader": Role.reader, "writer": Role.writer, "admin": Role.admin, "installation": Role.admin + 1}


def call(client: FlaskClient, route: Route, world: World, headers: dict[str, str], *,
         missing: bool = False) -> TestResponse:
    return client.open(world.fill(route.path, missing=missing), method=route.method, headers=headers,
                       **route.body(world))


def error_code(response: TestResponse, status: int) -> str:
    assert response.status_code == status, (response.status_code, response.get_data(as_text=True)[:500])
    body = response.get_json()
    assert set(body) == {"error"} and set(body["error"]) <= {"code", "message", "details"}, body
    assert body["error"]["message"], body
    return body["error"]["code"]


@pytest.fixture
def world(client: FlaskClient, make_tenant: Callable[[str], Tenant]) -> World:
    a, b = make_tenant("acme"), make_tenant("globex")
    w = World(a, b)
    assert client.put("/v1/dags/acme_pipeline", data=json.dumps(DAG), content_type="application/json",
                      headers=a.headers("writer")).status_code == 200
    run = client.post("/v1/jobs/acme_hello/runs", json={}, headers=a.headers("writer"))
    assert run.status_code == 202, run.get_json()
    w.ids["run_id"] = run.get_json()["run_id"]
    bundle = client.post("/v1/bundles", headers=a.headers("writer"), **_bundle_form(w))
    assert bundle.status_code == 201, bundle.get_json()
    w.ids["bundle_id"] = bundle.get_json()["id"]
    export = client.post("/v1/query", json={"sql": "SELECT 1 AS one", "format": "csv"}, headers=a.headers("reader"))
    assert export.status_code == 200, export.get_json()
    w.ids["download_id"] = export.get_json()["download"].rsplit("/", 1)[1]
    token = client.post("/v1/tokens", json={"name": "spare"}, headers=a.headers("reader"))
    w.ids["token_id"] = token.get_json()["id"]
    w.ids["email"] = "writer@acme.example"
    return w


def test_every_authenticated_route_is_in_the_catalogue(app: Flask) -> None:
    served = {(method, rule.rule) for rule in app.url_map.iter_rules() if rule.rule not in NOT_BEARER
              for method in rule.methods - {"HEAD", "OPTIONS"}}
    catalogued = {(route.method, route.rule) for route in ROUTES}
    assert served == catalogued, {"not catalogued": served - catalogued, "gone": catalogued - served}


BAD_AUTHORIZATIONS = [None, "", "Bearer", "Bearer ", "Basic dXNlcjpwYXNz", "Bearer trc_nope", "Bearer " + "x" * 5000,
                      "bearer trc_" + "A" * 43, "Token trc_abc", "Bearer trc_\u00e9\u00e9"]


@pytest.mark.parametrize("route", ROUTES, ids=lambda r: f"{r.method} {r.rule}")
def test_no_valid_token_is_401(client: FlaskClient, world: World, route: Route) -> None:
    for authorization in BAD_AUTHORIZATIONS:
        headers = {} if authorization is None else {"Authorization": authorization}
        assert error_code(call(client, route, world, headers), 401) == "unauthenticated", authorization


LOWER_ROLES = [(route, role.name) for route in ROUTES for role in Role if role < LEVELS[route.role]]


@pytest.mark.parametrize(("route", "role"), LOWER_ROLES, ids=lambda v: v if isinstance(v, str) else v.rule)
def test_every_lower_role_is_403(client: FlaskClient, world: World, route: Route, role: str) -> None:
    before = _fingerprint(world.a.org_id)
    assert error_code(call(client, route, world, world.a.headers(role)), 403) == "forbidden"
    assert _fingerprint(world.a.org_id) == before  # a refused request changed nothing


@pytest.mark.parametrize("route", [r for r in ROUTES if r.scoped], ids=lambda r: f"{r.method} {r.rule}")
def test_another_orgs_object_answers_as_one_that_does_not_exist(client: FlaskClient, world: World,
                                                                route: Route) -> None:
    before = _fingerprint(world.a.org_id)
    for role in Role:
        theirs = call(client, route, world, world.b.headers(role.name))
        nowhere = call(client, route, world, world.b.headers(role.name), missing=True)
        assert theirs.status_code in (403, 404), (role, theirs.get_json())
        assert world.anonymous(theirs) == world.anonymous(nowhere, missing=True), role
    assert _fingerprint(world.a.org_id) == before


@pytest.mark.parametrize("route", [r for r in ROUTES if r.method == "GET" and not r.scoped],
                         ids=lambda r: r.rule)
def test_no_list_shows_another_orgs_rows(client: FlaskClient, world: World, route: Route) -> None:
    answer = client.get(route.path, headers=world.b.headers("admin"))
    assert answer.status_code == 200, answer.get_json()
    text = answer.get_data(as_text=True)
    for secret in (*world.ids.values(), "acme_pipeline", "acme_hello", "acme_labels", "@acme.example",
                   str(world.a.org_id)):
        assert secret not in text, (route.rule, secret)


def _fingerprint(org_id: uuid.UUID) -> tuple[Any, ...]:
    """What an org has: members and roles, live tokens; a refused request must leave it as it was."""
    db.session.expire_all()
    members = sorted((user.email, membership.role) for user, membership in orgs.members(org_id))
    tokens = sorted(str(token.id) for token, _ in orgs.tokens_of(org_id))
    return tuple(members), tuple(tokens)


# ------------------------------------------------------------------ principals: who may mint what


@pytest.fixture
def installation(world: World) -> dict[str, str]:
    """The installation admin, as ``trace up`` makes it: admin of its own org, a token with the power."""
    org = orgs.create_org("default")
    user = orgs.get_or_create_user("admin@localhost", installation_admin=True)
    orgs.add_member(org, user, Role.admin)
    _, clear = orgs.issue_token(org.id, user.id, installation_admin=True)
    db.session.commit()
    return {"Authorization": f"Bearer {clear}"}


def _me(client: FlaskClient, token: str) -> dict[str, Any]:
    answer = client.get("/v1/me", headers={"Authorization": f"Bearer {token}"})
    assert answer.status_code == 200, answer.get_json()
    return answer.get_json()


def test_the_installation_admin_token_has_the_power(client: FlaskClient, installation: dict[str, str]) -> None:
    assert client.post("/v1/orgs", json={"name": "newco"}, headers=installation).status_code == 201
    assert client.get("/v1/me", headers=installation).get_json()["user"]["installation_admin"] is True


# Every way an org admin could try to get a credential for a user whose standing lies elsewhere.
FOREIGN = ["admin@localhost", "admin@acme.example", "writer@acme.example", "reader@acme.example"]


@pytest.mark.parametrize("email", FOREIGN)
@pytest.mark.parametrize("role", [None, "reader", "writer", "admin"])
def test_an_org_admin_mints_no_token_for_a_user_of_another_org(client: FlaskClient, world: World,
                                                              installation: dict[str, str], email: str,
                                                              role: str | None) -> None:
    body: dict[str, Any] = {"email": email, **({"role": role} if role else {})}
    answer = client.post("/v1/tokens", json=body, headers=world.b.headers("admin"))
    assert error_code(answer, 403) == "foreign_user"
    db.session.expire_all()
    user = orgs.find_user(email)
    assert user is not None
    assert db.session.get(orgs.Membership, (world.b.org_id, user.id)) is None  # nor was a membership made
    assert db.session.scalar(select(func.count()).select_from(ApiToken).where(
        ApiToken.user_id == user.id, ApiToken.org_id == world.b.org_id)) == 0


@pytest.mark.parametrize("email", FOREIGN)
def test_a_membership_for_a_foreign_user_gives_standing_here_only(client: FlaskClient, world: World,
                                                                  installation: dict[str, str], email: str) -> None:
    added = client.post("/v1/members", json={"email": email, "role": "admin"}, headers=world.b.headers("admin"))
    assert added.status_code == 201, added.get_json()
    # Still no token for them from B's admin: they mint their own with a token of theirs.
    assert error_code(client.post("/v1/tokens", json={"email": email}, headers=world.b.headers("admin")),
                      403) == "foreign_user"
    if email == "admin@localhost":
        own = client.post("/v1/tokens", json={"org": "globex"}, headers=installation)
        assert own.status_code == 201, own.get_json()
        me = _me(client, own.get_json()["token"])
        assert (me["org"]["name"], me["role"], me["user"]["installation_admin"]) == ("globex", "admin", False)
        assert error_code(client.post("/v1/orgs", json={"name": "escalated"},
                                      headers={"Authorization": f"Bearer {own.get_json()['token']}"}),
                          403) == "forbidden"


@pytest.mark.parametrize("how", ["self token", "self token with role", "token for own email", "org switch",
                                 "new org for own email", "new org for own email in caps"])
def test_installation_power_is_never_granted_through_an_org_endpoint(client: FlaskClient, world: World,
                                                                      installation: dict[str, str],
                                                                      how: str) -> None:
    if how == "self token":
        answer = client.post("/v1/tokens", json={"name": "copy"}, headers=installation)
    elif how == "self token with role":
        answer = client.post("/v1/tokens", json={"role": "admin"}, headers=installation)
    elif how == "token for own email":
        answer = client.post("/v1/tokens", json={"email": "admin@localhost", "role": "admin"}, headers=installation)
    elif how == "org switch":
        client.post("/v1/members", json={"email": "admin@localhost", "role": "admin"},
                    headers=world.b.headers("admin"))
        answer = client.post("/v1/tokens", json={"org": "globex"}, headers=installation)
    else:
        email = "ADMIN@localhost" if how.endswith("caps") else "admin@localhost"
        created = client.post("/v1/orgs", json={"name": "fresh", "admin_email": email}, headers=installation)
        assert created.status_code == 201, created.get_json()
        answer = client.post("/v1/tokens", json={"name": "x"},
                             headers={"Authorization": f"Bearer {created.get_json()['admin_token']}"})
    assert answer.status_code == 201, answer.get_json()
    token = answer.get_json()["token"]
    assert _me(client, token)["user"]["installation_admin"] is False
    assert error_code(client.post("/v1/orgs", json={"name": "escalated"},
                                  headers={"Authorization": f"Bearer {token}"}), 403) == "forbidden"


@pytest.mark.parametrize("org", ["acme", "default", "nothing"])
def test_a_self_token_for_an_org_one_is_not_a_member_of_is_404(client: FlaskClient, world: World,
                                                               installation: dict[str, str], org: str) -> None:
    assert error_code(client.post("/v1/tokens", json={"org": org}, headers=world.b.headers("admin")),
                      404) == "not_found"


@pytest.mark.parametrize("role", ["reader", "writer"])
@pytest.mark.parametrize("body", [{"role": "admin"}, {"role": "writer"}, {"email": "new@globex.example"},
                                  {"email": "new@globex.example", "role": "admin"}])
def test_no_member_below_admin_raises_anyone(client: FlaskClient, world: World, role: str,
                                             body: dict[str, str]) -> None:
    before = _fingerprint(world.b.org_id)
    assert error_code(client.post("/v1/tokens", json=body, headers=world.b.headers(role)), 403) == "forbidden"
    assert _fingerprint(world.b.org_id) == before
    assert _me(client, world.b.tokens[role])["role"] == role


@pytest.mark.parametrize("way", ["token role", "patch", "delete", "patch to writer"])
def test_the_last_admin_cannot_leave_the_org_without_one(client: FlaskClient, world: World, way: str) -> None:
    headers = world.b.headers("admin")
    email = "admin@globex.example"
    if way == "token role":
        answer = client.post("/v1/tokens", json={"role": "reader"}, headers=headers)
    elif way == "delete":
        answer = client.delete(f"/v1/members/{email}", headers=headers)
    else:
        answer = client.patch(f"/v1/members/{email}", json={"role": "writer" if way.endswith("writer") else "reader"},
                              headers=headers)
    assert error_code(answer, 409) == "last_admin"
    assert _me(client, world.b.tokens["admin"])["role"] == "admin"
    # With a second admin, the same request goes through.
    assert client.patch("/v1/members/writer@globex.example", json={"role": "admin"}, headers=headers).status_code == 200
    again = {"token role": lambda: client.post("/v1/tokens", json={"role": "reader"}, headers=headers),
             "delete": lambda: client.delete(f"/v1/members/{email}", headers=headers)}.get(
        way, lambda: client.patch(f"/v1/members/{email}", json={"role": "reader"}, headers=headers))()
    assert again.status_code in (200, 201, 204), again.get_json()


def test_two_admins_demoting_each_other_at_once_leave_one(app: Flask, world: World) -> None:
    org = db.session.get(orgs.Org, world.b.org_id)
    second = orgs.get_or_create_user("writer@globex.example")
    orgs.add_member(org, second, Role.admin)
    first = orgs.find_user("admin@globex.example")
    assert first is not None
    db.session.commit()
    barrier = threading.Barrier(2)
    outcomes: list[str] = []

    def demote(user_id: uuid.UUID) -> None:
        with app.app_context():
            barrier.wait()
            try:
                orgs.set_role(world.b.org_id, user_id, Role.reader)
                db.session.commit()
                outcomes.append("demoted")
            except Conflict as exc:
                db.session.rollback()
                outcomes.append(exc.code)

    threads = [threading.Thread(target=demote, args=(user.id,)) for user in (first, second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["demoted", "last_admin"]
    db.session.expire_all()
    admins = [m.role for _, m in orgs.members(world.b.org_id) if m.role == "admin"]
    assert admins == ["admin"]


@pytest.mark.parametrize("target", ["admin@acme.example", "reader@acme.example", "nobody@acme.example"])
@pytest.mark.parametrize("method", ["PATCH", "DELETE"])
def test_an_admin_changes_members_of_its_own_org_only(client: FlaskClient, world: World, target: str,
                                                      method: str) -> None:
    before = _fingerprint(world.a.org_id)
    answer = client.open(f"/v1/members/{target}", method=method, json={"role": "reader"} if method == "PATCH" else None,
                         headers=world.b.headers("admin"))
    assert error_code(answer, 404) == "not_found"
    assert _fingerprint(world.a.org_id) == before


def test_a_removed_members_tokens_stop_working(client: FlaskClient, world: World) -> None:
    reader = world.a.tokens["reader"]
    assert client.delete("/v1/members/reader@acme.example", headers=world.a.headers("admin")).status_code == 204
    assert error_code(client.get("/v1/me", headers={"Authorization": f"Bearer {reader}"}), 401) == "unauthenticated"
    # Added back, the old token stays revoked.
    assert client.post("/v1/members", json={"email": "reader@acme.example"},
                       headers=world.a.headers("admin")).status_code == 201
    assert error_code(client.get("/v1/me", headers={"Authorization": f"Bearer {reader}"}), 401) == "unauthenticated"


@pytest.mark.parametrize(("who", "whose", "status"), [
    ("reader", "own", 204), ("reader", "writer", 404), ("writer", "admin", 404), ("admin", "reader", 204),
    ("other admin", "reader", 404)])
def test_who_may_revoke_which_token(client: FlaskClient, world: World, who: str, whose: str, status: int) -> None:
    token_of = {"own": world.a.tokens["reader"], **world.a.tokens}
    target = db.session.scalar(select(ApiToken.id).where(ApiToken.token_hash == orgs.hash_token(token_of[whose])))
    headers = world.b.headers("admin") if who == "other admin" else world.a.headers(who)
    answer = client.delete(f"/v1/tokens/{target}", headers=headers)
    assert answer.status_code == status, answer.get_json()
    alive = client.get("/v1/me", headers={"Authorization": f"Bearer {token_of[whose]}"}).status_code
    assert alive == (401 if status == 204 else 200)


@pytest.mark.parametrize("state", ["revoked", "expired", "membership gone"])
def test_a_dead_token_is_401_everywhere(client: FlaskClient, world: World, state: str) -> None:
    token = world.a.tokens["writer"]
    token_hash = orgs.hash_token(token)
    if state == "revoked":
        db.session.execute(update(ApiToken).where(ApiToken.token_hash == token_hash).values(revoked_at=func.now()))
    elif state == "expired":
        db.session.execute(update(ApiToken).where(ApiToken.token_hash == token_hash)
                           .values(expires_at=func.now() - func.make_interval(0, 0, 0, 0, 0, 0, 1)))
    else:
        user = orgs.find_user("writer@acme.example")
        assert user is not None
        db.session.execute(orgs.Membership.__table__.delete().where(orgs.Membership.user_id == user.id))
    db.session.commit()
    orgs.forget_tokens()
    for route in ROUTES:
        answer = call(client, route, world, {"Authorization": f"Bearer {token}"})
        assert error_code(answer, 401) == "unauthenticated", route.rule
