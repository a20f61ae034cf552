"""Bad input answers 4xx with the error shape, never 500 (issue 11, item 5).

The routes are not listed here: they are read from the app's ``url_map`` and their fields
from the OpenAPI document, so a new endpoint and a new field are tried as soon as they exist.
Every route is called as a throwaway org's admin (never the installation admin), the task
API with a live capability token, the signed webhook with a good signature over the hostile
body. Each test is one kind of hostile input sent to every route:

- a hostile value in each JSON field (and inside each object or list field): deep nesting,
  NaN, Infinity, overflowing floats, integers of 300 and 5000 digits, beyond int32 and int64,
  lone surrogates, NUL, 100k-character strings, every wrong type;
- a hostile whole body: deep, not JSON, not UTF-8, raw NUL, a BOM, UTF-16, empty, the wrong
  JSON type, another media type, 2 MB;
- a hostile value in each query parameter (and an undocumented one): NaN, Infinity, -1, 0,
  beyond int32, 5000 digits, NUL, invalid UTF-8, 5000 characters;
- a hostile path segment for each path parameter: NUL, invalid UTF-8, 3000 characters ...

then deep SQL (Query Service, saved queries, ``/v1/task/query``, ``when:`` conditions), DAG
files in YAML and JSON (alias bombs, deep nesting, ``.nan``, ``!!binary``) and the gateway socket.
"""

from __future__ import annotations

import io
import json
import re
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from tests.conftest import Tenant, leased_capability
from tests.integration.workers.test_gateway import call as gateway_call
from tests.unit.execution.test_bundles import PY, make_zip, member
from tracecore.dags import triggers
from tracecore.execution import tokens
from tracecore.settings import current_settings
from tracecore.taskapi import calls as task_api
from workers.gateway import TaskGateway

JSON = "application/json"
DAG = [
    {"name": "fz_hello", "runtime": "platform", "operator": "noop",
     "outputs": [{"dataset": "fz_labels", "kind": "buffered",
                  "schema": [{"name": "address", "type": "string", "nullable": False}]}],
     "unique_key": ["address"]},
    {"name": "fz_ticker", "runtime": "platform", "operator": "noop", "activation": "scheduled",
     "schedule": "0 0 1 1 *"},
]

# Valid bodies, keyed by (method, OpenAPI path): the field not under test keeps its valid value.
BASES: dict[tuple[str, str], dict[str, Any]] = {
    ("POST", "/v1/orgs"): {"name": "fz-other", "admin_email": "a@fz.example"},
    ("POST", "/v1/tokens"): {"name": "t", "email": "new@fz.example", "role": "reader"},
    ("POST", "/v1/members"): {"email": "m@fz.example", "role": "reader"},
    ("PATCH", "/v1/members/{email}"): {"role": "reader"},
    ("POST", "/v1/jobs/{name}/runs"): {"config": {"k": 1}, "parameters": {"k": 1}},
    ("POST", "/v1/dags/{name}/runs"): {"parameters": {"k": 1}},
    ("POST", "/v1/runs/{run_id}/rerun"): {"scope": "self", "job": "fz_hello"},
    ("POST", "/v1/datasets/{name}/rollback"): {"version": 1},
    ("DELETE", "/v1/datasets/{name}/rows"): {"key": {"address": "0xabc"}},
    ("POST", "/v1/datasets/{name}/pii-grants"): {"email": "reader@fz.example"},
    ("POST", "/v1/grants"): {"dataset": "fz_labels", "org": "fz-other"},
    ("POST", "/v1/query"): {"sql": "SELECT 1 AS one", "limit": 10, "format": "json"},
    ("POST", "/v1/saved-queries"): {"name": "q", "sql": "SELECT 1", "shared": False},
    ("POST", "/v1/task/query"): {"sql": "SELECT 1 AS one", "limit": 5, "format": "json"},
    ("POST", "/v1/task/buffer-publish"): {"rows": [{"address": "0x1"}], "dataset": "fz_labels"},
    ("POST", "/v1/task/credentials"): {},
    ("POST", "/v1/hooks/{trigger_id}"): {"block": 1, "note": "x"},
    ("PUT", "/v1/dags/{name}"): {"jobs": [{"name": "fz_other", "runtime": "platform", "operator": "noop",
                                           "description": "d", "max_retries": 1, "config": {"k": 1}}]},
}

_HOLE = '"__HOSTILE__"'
# One field's value, as raw JSON text (json.dumps cannot write most of them).
HOSTILE_VALUES: dict[str, str] = {
    "deep-array-10k": "[" * 10_000 + "]" * 10_000,
    "deep-object-10k": '{"a":' * 10_000 + "1" + "}" * 10_000,
    "deep-array-70": "[" * 70 + "]" * 70,
    "nan": "NaN",
    "infinity": "Infinity",
    "minus-infinity": "-Infinity",
    "float-overflow": "1e999",
    "int-5000-digits": "9" * 5000,
    "int-300-digits": "9" * 300,
    "int32-overflow": str(2**31),
    "int64-overflow": str(2**63),
    "int64-underflow": str(-(2**63) - 1),
    "negative": "-1",
    "zero": "0",
    "lone-high-surrogate": '"\\ud800"',
    "lone-low-surrogate": '"a\\udfffb"',
    "nul": '"a\\u0000b"',
    "long-string-100k": json.dumps("x" * 100_000),
    "empty-string": '""',
    "float": "1.5",
    "true": "true",
    "null": "null",
    "list": '[1, "a", null]',
    "object": '{"k": "v"}',
    "control-chars": '"\\u0001\\u001f\\u007f"',
}

_DEEP = b"[" * 10_000 + b"]" * 10_000
# A whole body and its media type.
HOSTILE_BODIES: dict[str, tuple[bytes, str]] = {
    "deep-10k": (_DEEP, JSON),
    "deep-object-100k": (b'{"a":' * 100_000 + b"1" + b"}" * 100_000, JSON),
    "not-json": (b"not json", JSON),
    "truncated": (b'{"a": ', JSON),
    "invalid-utf8": (b'{"a": "\xff\xfe"}', JSON),
    "raw-nul": (b'{"a": "\x00"}', JSON),
    "bom": (b"\xef\xbb\xbf{}", JSON),
    "utf16": ("{}".encode("utf-16"), JSON),
    "empty": (b"", JSON),
    "whitespace": (b"  \n ", JSON),
    "array": (b"[]", JSON),
    "string": (b'"x"', JSON),
    "number": (b"1e999", JSON),
    "nan": (b"NaN", JSON),
    "null": (b"null", JSON),
    "text-plain": (b"name=x", "text/plain"),
    "form": (b"a=b&c=%00", "application/x-www-form-urlencoded"),
    "multipart-junk": (b"--x\r\njunk", "multipart/form-data; boundary=x"),
    "yaml-deep": (b"- " * 5_000 + b"x", "application/yaml"),
    "big-2mb": (b'{"a": "' + b"x" * 2_000_000 + b'"}', JSON),
}

# One query parameter's value, as it appears in the query string.
HOSTILE_QUERY: dict[str, str] = {
    "nan": "NaN", "infinity": "Infinity", "minus-infinity": "-Infinity", "negative": "-1", "zero": "0",
    "int32-overflow": str(2**31), "digits-5000": "9" * 5000, "nul": "%00", "nul-inside": "a%00b",
    "invalid-utf8": "%FF%FE", "utf8-surrogate": "%ED%A0%80", "long-5000": "x" * 5000, "empty": "",
    "true": "true", "exponent": "1e999",
}

# One path parameter's value, as it appears in the path.
HOSTILE_PATHS: dict[str, str] = {
    "nul": "%00", "nul-inside": "a%00b", "invalid-utf8": "%FF%FE", "utf8-surrogate": "%ED%A0%80",
    "long-3000": "x" * 3000, "long-1000": "y" * 1000, "dots": "..", "nan": "NaN", "negative": "-1",
    "huge-int": "9" * 100, "unicode": "%C3%A9t%C3%A9", "space": "a%20b",
    "almost-uuid": "00000000-0000-0000-0000-00000000000g", "uuid-nil": str(uuid.UUID(int=0)), "percent": "%25",
    "control": "%01%1F",
}


@pytest.fixture(autouse=True)
def validated_first(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """The 400s must come from validation, not from the error handler's backstop (which logs
    each exception that bad input raised past validation)."""
    yield
    backstopped = [record.getMessage()[:300] for record in caplog.get_records("call")
                   if "bad input reached" in record.getMessage()]
    assert not backstopped, "\n".join(backstopped)


@dataclass
class Route:
    method: str
    rule: str  # as the url_map has it
    openapi: str  # the OpenAPI path: {name} placeholders


@dataclass
class World:
    """A throwaway org with one object of every kind, a live capability and a webhook secret."""

    tenant: Tenant
    values: dict[str, str]
    capability: str
    hook_secret: str
    doc: dict[str, Any]
    routes: list[Route] = field(default_factory=list)

    def path(self, route: Route, override: dict[str, str] | None = None) -> str:
        args = {**self.args_of(route), **(override or {})}
        return re.sub(r"<(?:[^:>]+:)?([^>]+)>", lambda m: args[m.group(1)], route.rule)

    def args_of(self, route: Route) -> dict[str, str]:
        names = re.findall(r"<(?:[^:>]+:)?([^>]+)>", route.rule)
        kind = route.rule.split("/")[2] if route.rule.count("/") > 1 else ""
        by_kind = {"dags": self.values["dag"], "jobs": self.values["job"], "datasets": self.values["dataset"]}
        return {name: by_kind.get(kind, self.values.get(name, "x")) if name == "name" else self.values.get(name, "x")
                for name in names}

    def headers(self, route: Route, body: bytes) -> dict[str, str]:
        if route.rule.startswith("/v1/task/"):
            return {"Authorization": f"Bearer {self.capability}"}
        if route.rule.startswith("/v1/hooks/"):
            stamp = str(int(time.time()))
            return {"X-Trace-Timestamp": stamp, "X-Trace-Signature": triggers.sign(self.hook_secret, stamp, body)}
        return self.tenant.headers("admin")

    def operation(self, route: Route) -> dict[str, Any]:
        return self.doc["paths"].get(route.openapi, {}).get(route.method.lower(), {})

    def body_fields(self, route: Route) -> dict[str, Any]:
        """The route's valid body: documented properties and the base values of ``BASES``."""
        base = dict(BASES.get((route.method, route.openapi), {}))
        content = self.operation(route).get("requestBody", {}).get("content", {}).get(JSON, {})
        for name in _resolve(self.doc, content.get("schema", {})).get("properties", {}):
            base.setdefault(name, "x")
        return base

    def query_params(self, route: Route) -> list[str]:
        return [p["name"] for p in self.operation(route).get("parameters", []) if p.get("in") == "query"]


def _resolve(doc: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref")
    if ref:
        return _resolve(doc, doc["components"]["schemas"][ref.rsplit("/", 1)[1]])
    return schema


def _routes(app: Flask) -> list[Route]:
    """Every served route and method; the task API's catch-all expands to each registered task route."""
    task_api.load_routes()
    found = []
    for rule in app.url_map.iter_rules():
        if rule.rule.startswith("/static"):
            continue
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            if rule.rule == "/v1/task/<path:rest>":
                continue
            found.append(Route(method, rule.rule, re.sub(r"<(?:[^:>]+:)?([^>]+)>", r"{\1}", rule.rule)))
    for method, path in sorted(task_api.HANDLERS):
        found.append(Route(method, path, path))
    for method, prefix in sorted(task_api.PREFIX_HANDLERS):
        found.append(Route(method, prefix + "<path:key>", prefix + "{key}"))
    return found


@pytest.fixture
def world(app: Flask, client: FlaskClient, make_tenant: Callable[[str], Tenant]) -> World:
    tenant = make_tenant("fz")
    make_tenant("fz-other")
    admin = tenant.headers("admin")
    saved = client.put("/v1/dags/fz_pipeline", data=json.dumps(DAG), content_type=JSON, headers=admin)
    assert saved.status_code == 200, saved.get_json()
    run = client.post("/v1/jobs/fz_hello/runs", json={}, headers=admin)
    assert run.status_code == 202, run.get_json()
    bundle = client.post("/v1/bundles", headers=admin, content_type="multipart/form-data", data={
        "file": (io.BytesIO(make_zip(*PY)), "bundle.zip", "application/zip"), "runtime": "python3.11",
        "handler": "trace.handler"})
    assert bundle.status_code == 201, bundle.get_json()
    export = client.post("/v1/query", json={"sql": "SELECT 1 AS one", "format": "csv"}, headers=admin)
    assert export.status_code == 200, export.get_json()
    token = client.post("/v1/tokens", json={"name": "spare"}, headers=admin)
    hook = client.post("/v1/jobs/fz_hello/webhooks", headers=admin)
    assert hook.status_code == 201, hook.get_json()
    capability = tokens.mint(leased_capability(app, tenant.org_id, "fz_hello"),
                             tokens.secret_key(current_settings(app)))
    published = client.post("/v1/task/buffer-publish", json={"rows": [{"address": "0xabc"}], "dataset": "fz_labels"},
                            headers={"Authorization": f"Bearer {capability}"})
    assert published.status_code == 200, published.get_json()
    values = {"dag": "fz_pipeline", "job": "fz_hello", "dataset": "fz_labels", "run_id": run.get_json()["run_id"],
              "bundle_id": bundle.get_json()["id"], "download_id": export.get_json()["download"].rsplit("/", 1)[1],
              "token_id": token.get_json()["id"], "trigger_id": hook.get_json()["id"], "email": "writer@fz.example",
              "key": "nothing/here"}
    doc = client.get("/v1/openapi.json").get_json()
    return World(tenant, values, capability, hook.get_json()["secret"], doc, _routes(app))


def send(client: FlaskClient, world: World, route: Route, *, path: str | None = None, body: bytes | None = None,
         content_type: str = JSON, query: str = "") -> TestResponse:
    data = b"" if body is None else body
    url = (path or world.path(route)) + (f"?{query}" if query else "")
    kwargs: dict[str, Any] = {"data": data, "content_type": content_type} if body is not None else {}
    return client.open(url, method=route.method, headers=world.headers(route, data), **kwargs)


def failures(response: TestResponse, what: str) -> list[str]:
    """Empty when the answer is below 500 and, for an error, in the platform's error shape."""
    status = response.status_code
    if status >= 500:
        return [f"{what}: {status} {response.get_data(as_text=True)[:300]}"]
    if status >= 400 and not (response.mimetype == JSON and _error_shaped(response.get_json(silent=True))):
        return [f"{what}: {status} not the error shape: {response.get_data(as_text=True)[:300]}"]
    return []


def _error_shaped(body: Any) -> bool:
    error = body.get("error") if isinstance(body, dict) else None
    return (isinstance(error, dict) and isinstance(error.get("code"), str) and bool(error["code"])
            and isinstance(error.get("message"), str) and bool(error["message"]))


def _with_body(route: Route) -> bool:
    return route.method in ("POST", "PUT", "PATCH", "DELETE")


def _field_bodies(world: World, route: Route, value: str) -> Iterator[tuple[str, bytes]]:
    """The route's valid body with one field (or one value inside an object or list field) hostile."""
    base = world.body_fields(route)
    for name, valid in base.items():
        yield name, json.dumps({**base, name: "__HOSTILE__"}).replace(_HOLE, value).encode()
        if isinstance(valid, dict):
            inner = {**valid, "v": "__HOSTILE__"}
            yield f"{name}.v", json.dumps({**base, name: inner}).replace(_HOLE, value).encode()
        if isinstance(valid, list) and valid and isinstance(valid[0], dict):
            inner_list = [{**valid[0], **dict.fromkeys(valid[0], "__HOSTILE__")}]
            yield f"{name}[0]", json.dumps({**base, name: inner_list}).replace(_HOLE, value).encode()


def test_routes_and_fields_are_found(world: World) -> None:
    """The suite reaches every kind of route (so an empty enumeration cannot pass silently)."""
    rules = {route.rule for route in world.routes}
    assert {"/v1/query", "/v1/dags/<name>", "/v1/hooks/<trigger_id>", "/v1/task/query",
            "/v1/task/buffer-publish", "/v1/datasets/<name>/rollback"} <= rules
    assert len(world.routes) >= 40
    rollback = next(r for r in world.routes if r.rule == "/v1/datasets/<name>/rollback")
    assert "version" in world.body_fields(rollback)


@pytest.mark.parametrize("kind", HOSTILE_VALUES)
def test_a_hostile_field_value_is_a_4xx(client: FlaskClient, world: World, kind: str) -> None:
    found: list[str] = []
    tried = 0
    for route in world.routes:
        if not _with_body(route) or route.rule.startswith("/v1/bundles") or "<path:" in route.rule:
            continue
        for name, body in _field_bodies(world, route, HOSTILE_VALUES[kind]):
            tried += 1
            found += failures(send(client, world, route, body=body), f"{route.method} {route.rule} {name}")
    assert tried >= 30
    assert not found, "\n".join(found)


@pytest.mark.parametrize("kind", HOSTILE_BODIES)
def test_a_hostile_body_is_a_4xx(client: FlaskClient, world: World, kind: str) -> None:
    body, media = HOSTILE_BODIES[kind]
    found: list[str] = []
    for route in world.routes:
        if _with_body(route):
            found += failures(send(client, world, route, body=body, content_type=media),
                              f"{route.method} {route.rule}")
    assert not found, "\n".join(found)


@pytest.mark.parametrize("kind", HOSTILE_QUERY)
def test_a_hostile_query_parameter_is_a_4xx(client: FlaskClient, world: World, kind: str) -> None:
    found: list[str] = []
    value = HOSTILE_QUERY[kind]
    for route in world.routes:
        for name in [*world.query_params(route), "undocumented"]:
            body = b"{}" if _with_body(route) and not route.rule.startswith("/v1/bundles") else None
            found += failures(send(client, world, route, body=body, query=f"{name}={value}"),
                              f"{route.method} {route.rule} ?{name}")
    assert not found, "\n".join(found)


@pytest.mark.parametrize("kind", HOSTILE_PATHS)
def test_a_hostile_path_segment_is_a_4xx(client: FlaskClient, world: World, kind: str) -> None:
    found: list[str] = []
    for route in world.routes:
        for name in world.args_of(route):
            body = b"{}" if _with_body(route) and not route.rule.startswith("/v1/bundles") else None
            path = world.path(route, {name: HOSTILE_PATHS[kind]})
            found += failures(send(client, world, route, path=path, body=body), f"{route.method} {route.rule} <{name}>")
    assert not found, "\n".join(found)


@pytest.mark.parametrize("kind", ["nul", "long-3000"])
def test_nul_and_overlong_paths_are_refused_at_the_edge(client: FlaskClient, world: World, kind: str) -> None:
    """Before routing reaches a handler (or PostgreSQL): 400 with the code that names it."""
    response = client.get(f"/v1/dags/{HOSTILE_PATHS[kind]}", headers=world.tenant.headers())
    assert response.status_code == 400
    assert response.get_json()["error"]["code"] == {"nul": "invalid_string", "long-3000": "too_long"}[kind]


@pytest.mark.parametrize(("value", "code"), [
    ("[" * 10_000 + "]" * 10_000, "too_deep"), ("NaN", "invalid_json"), ("Infinity", "invalid_json"),
    ("-Infinity", "invalid_json"), ("1e999", "invalid_json"), ("9" * 5000, "number_too_large"),
    ('"\\ud800"', "invalid_string"), ('"a\\u0000b"', "invalid_string"),
])
@pytest.mark.parametrize("target", ["api", "task", "webhook"])
def test_the_json_edge_names_the_problem(client: FlaskClient, world: World, value: str, code: str,
                                         target: str) -> None:
    """The same strict decoder, and the same codes, behind the API, the task API and the webhook."""
    rule, field_name = {"api": ("/v1/jobs/<name>/runs", "parameters"), "task": ("/v1/task/query", "sql"),
                        "webhook": ("/v1/hooks/<trigger_id>", "block")}[target]
    route = next(r for r in world.routes if r.rule == rule and r.method == "POST")
    body = json.dumps({field_name: "__HOSTILE__"}).replace(_HOLE, value).encode()
    response = send(client, world, route, body=body)
    assert response.status_code == 400, response.get_json()
    assert response.get_json()["error"]["code"] == code


@pytest.mark.parametrize(("field_name", "value"), [
    ("version", 2**31), ("version", 0), ("version", -1), ("version", "1"), ("version", 1.5),
])
def test_rollback_version_is_bounded(client: FlaskClient, world: World, field_name: str, value: Any) -> None:
    response = client.post("/v1/datasets/fz_labels/rollback", json={field_name: value},
                           headers=world.tenant.headers("writer"))
    assert response.status_code == 400 and response.get_json()["error"]["code"] == "invalid_request"


@pytest.mark.parametrize("path", ["/v1/runs", "/v1/jobs/fz_hello/firings"])
@pytest.mark.parametrize("limit", ["-1", "0", "100000", str(2**31), "NaN", "1.5"])
def test_limit_is_bounded(client: FlaskClient, world: World, path: str, limit: str) -> None:
    response = client.get(f"{path}?limit={limit}", headers=world.tenant.headers())
    assert response.status_code == 400 and response.get_json()["error"]["code"] == "invalid_request"


# --- deep SQL ---------------------------------------------------------------------------------

DEEP_SQL = {
    "subqueries-500": "SELECT * FROM " + "(SELECT * FROM " * 500 + "range(1)" + ")" * 500,
    "subqueries-3000": "SELECT * FROM " + "(SELECT * FROM " * 3000 + "range(1)" + ")" * 3000,
    "additions-600": "SELECT " + "1+" * 600 + "1",
    "not-800": "SELECT " + "NOT " * 800 + "true",
    "functions-500": "SELECT " + "abs(" * 500 + "1" + ")" * 500,
    "case-400": "SELECT " + "CASE WHEN true THEN " * 400 + "1" + " END" * 400,
    "parentheses-20000": "SELECT " + "(" * 20_000 + "1" + ")" * 20_000,
    "in-lists": "SELECT 1 WHERE 1 IN (" + "(SELECT 1 WHERE 1 IN (" * 300 + "1" + "))" * 300 + ")",
}
SQL_CODES = {"query_too_complex", "query_error", "sql_too_long", "invalid_request", "invalid_value"}


@pytest.mark.parametrize("kind", DEEP_SQL)
def test_deep_sql_is_refused_everywhere(client: FlaskClient, world: World, kind: str) -> None:
    sql = DEEP_SQL[kind]
    admin = world.tenant.headers()
    answers = {
        "query": client.post("/v1/query", json={"sql": sql}, headers=admin),
        "saved": client.post("/v1/saved-queries", json={"name": "deep", "sql": sql}, headers=admin),
        "task": client.post("/v1/task/query", json={"sql": sql},
                            headers={"Authorization": f"Bearer {world.capability}"}),
    }
    when = [{"name": "fz_when", "runtime": "platform", "operator": "noop", "activation": "reactive",
             "inputs": [{"from": {"job": "fz_hello", "output": 0}}], "trigger": {"all_of": [{"when": sql}]}}]
    answers["when"] = client.put("/v1/dags/fz_when", data=json.dumps(when), content_type=JSON, headers=admin)
    for where, response in answers.items():
        assert response.status_code == 400, (where, response.status_code, response.get_data(as_text=True)[:300])
        body = response.get_json()
        code = body["error"]["code"]
        if where == "when":  # a DAG lists each problem; the condition's is invalid_when
            code = body["error"]["details"]["errors"][0]["code"]
            assert code in {"invalid_when", "invalid_value"} | SQL_CODES, body
        else:
            assert code in SQL_CODES, (where, body)


def test_nesting_the_checker_handles_still_runs(client: FlaskClient, world: World) -> None:
    """The bound is generous: 60 nested subqueries and a sum of 150 terms still answer."""
    sql = "SELECT * FROM " + "(SELECT * FROM " * 60 + "range(3)" + ")" * 60
    response = client.post("/v1/query", json={"sql": sql}, headers=world.tenant.headers())
    assert response.status_code == 200 and response.get_json()["row_count"] == 3
    response = client.post("/v1/query", json={"sql": "SELECT " + "1+" * 150 + "1 AS n"}, headers=world.tenant.headers())
    assert response.status_code == 200 and response.get_json()["rows"] == [{"n": 151}]


# --- DAG files ----------------------------------------------------------------------------------

def _alias_bomb() -> str:
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{n}: &a{n} [" + ", ".join([f"*a{n - 1}"] * 9) + "]" for n in range(1, 10)]
    return "- name: fz_bomb\n  runtime: platform\n  operator: noop\n  config:\n" + "\n".join(
        "    " + line for line in lines) + "\n"


HOSTILE_DAGS: dict[str, tuple[str, str, set[str]]] = {
    "yaml-alias-bomb": (_alias_bomb(), "application/yaml", {"too_large", "too_deep"}),
    "yaml-deep-flow": ("- " + "[" * 10_000 + "]" * 10_000, "application/yaml", {"too_deep", "invalid_body"}),
    "yaml-deep-block": ("".join("  " * i + "- \n" for i in range(200)), "application/yaml", {"too_deep"}),
    "yaml-nan": ("- name: fz_x\n  runtime: platform\n  operator: noop\n  config: {v: .nan}\n", "application/yaml",
                 {"invalid_body"}),
    "yaml-inf": ("- name: fz_x\n  runtime: platform\n  operator: noop\n  config: {v: -.inf}\n", "application/yaml",
                 {"invalid_body"}),
    "yaml-nul": ('- name: fz_x\n  runtime: platform\n  operator: noop\n  description: "a\\0b"\n',
                 "application/yaml", {"invalid_string"}),
    "yaml-surrogate": ('- name: fz_x\n  runtime: platform\n  operator: noop\n  description: "\\ud800"\n',
                       "application/yaml", {"invalid_string"}),
    "yaml-binary": ("- name: fz_x\n  runtime: platform\n  operator: noop\n  config: {v: !!binary aGk=}\n",
                    "application/yaml", {"invalid_body"}),
    "yaml-set": ("- name: fz_x\n  runtime: platform\n  operator: noop\n  config: {v: !!set {a}}\n",
                 "application/yaml", {"invalid_body"}),
    "yaml-int-1000-digits": ("- name: fz_x\n  runtime: platform\n  operator: noop\n  max_retries: " + "9" * 1000,
                             "application/yaml", {"number_too_large"}),
    "yaml-int-5000-digits": ("- name: fz_x\n  runtime: platform\n  operator: noop\n  max_retries: " + "9" * 5000,
                             "application/yaml", {"invalid_body", "number_too_large"}),
    "yaml-python-tag": ("- !!python/object/apply:os.system ['true']\n", "application/yaml", {"invalid_body"}),
    "json-deep": ('[{"name": "fz_x", "config": ' + "[" * 10_000 + "]" * 10_000 + "}]", JSON, {"too_deep"}),
    "json-nan": ('[{"name": "fz_x", "runtime": "platform", "operator": "noop", "config": {"v": NaN}}]', JSON,
                 {"invalid_body"}),
    "json-nul-key": ('[{"name": "fz_x", "runtime": "platform", "operator": "noop", "config": {"a\\u0000": 1}}]', JSON,
                     {"invalid_string"}),
    "json-huge-int": ('[{"name": "fz_x", "runtime": "platform", "operator": "noop", "max_retries": ' + "9" * 5000
                      + "}]", JSON, {"number_too_large"}),
    "json-int32-retries": ('[{"name": "fz_x", "runtime": "platform", "operator": "noop", "max_retries": '
                           + str(2**31) + "}]", JSON, {"out_of_range"}),
    "json-long-name": (json.dumps([{"name": "x" * 10_000, "runtime": "platform", "operator": "noop"}]), JSON,
                       {"invalid_value"}),
}


@pytest.mark.parametrize("kind", HOSTILE_DAGS)
def test_a_hostile_dag_file_is_a_400(client: FlaskClient, world: World, kind: str) -> None:
    text, media, codes = HOSTILE_DAGS[kind]
    response = client.put("/v1/dags/fz_hostile", data=text.encode("utf-8", "surrogatepass"), content_type=media,
                          headers=world.tenant.headers())
    assert response.status_code == 400, (response.status_code, response.get_data(as_text=True)[:300])
    error = response.get_json()["error"]
    listed = {item["code"] for item in error.get("details", {}).get("errors", [])}
    assert ({error["code"]} | listed) & codes, error


# --- the gateway socket -------------------------------------------------------------------------

GATEWAY_BODIES = {kind: body for kind, (body, media) in HOSTILE_BODIES.items() if media == JSON}
GATEWAY_BODIES.update({f"field-{kind}": json.dumps({"sql": "__HOSTILE__"}).replace(_HOLE, value).encode()
                       for kind, value in HOSTILE_VALUES.items()})


@pytest.fixture
def gateway(app: Flask, world: World, tmp_path: Path) -> Iterator[Path]:
    from tracecore.execution import tokens as token_module

    claims = token_module.verify(world.capability, token_module.secret_key(current_settings(app)))
    folder = tmp_path / "gw"
    folder.mkdir()
    secret = token_module.secret_key(current_settings(app))
    with TaskGateway(folder / "gateway.sock", app, claims.task_id, secret) as gw:
        yield gw.path


def test_the_gateway_socket_answers_hostile_bodies_with_4xx(world: World, gateway: Path) -> None:
    found = []
    for path in ("/v1/task/query", "/v1/task/buffer-publish", "/v1/task/credentials"):
        for kind, body in GATEWAY_BODIES.items():
            if len(body) > task_api.MAX_BODY_BYTES:
                continue
            status, answer = gateway_call(gateway, "POST", path, world.capability, body,
                                          headers={"Content-Type": JSON})
            if status >= 500 or (status >= 400 and not _error_shaped(answer)):
                found.append(f"{path} {kind}: {status} {str(answer)[:200]}")
    assert len(GATEWAY_BODIES) >= 40
    assert not found, "\n".join(found)


# --- every documented input field is bounded -----------------------------------------------------

def _inputs(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, schema) of every query parameter and JSON body property the document declares."""
    for path, operations in doc["paths"].items():
        for method, operation in operations.items():
            if method == "parameters":  # path parameters, shared by the path's operations
                continue
            for parameter in operation.get("parameters", []):
                if parameter.get("in") == "query":
                    yield f"{method.upper()} {path} ?{parameter['name']}", parameter.get("schema", {})
            content = operation.get("requestBody", {}).get("content", {}).get(JSON, {})
            for name, prop in _resolve(doc, content.get("schema", {})).get("properties", {}).items():
                yield f"{method.upper()} {path} {name}", _resolve(doc, prop)


def _unbounded(schema: dict[str, Any]) -> str | None:
    kinds = schema.get("type")
    kinds = set(kinds) if isinstance(kinds, list) else {kinds}
    if "enum" in schema or schema.get("format") in ("uuid", "date-time"):
        return None
    if "string" in kinds and "maxLength" not in schema and "pattern" not in schema:
        return "a string without maxLength"
    if kinds & {"integer", "number"} and ("minimum" not in schema or "maximum" not in schema):
        return "a number without minimum and maximum"
    if "array" in kinds and "maxItems" not in schema:
        return "an array without maxItems"
    return None  # objects are bounded by the strict decoder (depth) and the body limit


def test_every_documented_input_field_is_bounded(client: FlaskClient) -> None:
    """A new field without bounds fails here, before a fuzzer finds what it lets through."""
    doc = client.get("/v1/openapi.json").get_json()
    fields_seen = list(_inputs(doc))
    assert len(fields_seen) >= 20
    unbounded = {where: why for where, schema in fields_seen if (why := _unbounded(schema))}
    assert not unbounded, unbounded


@pytest.mark.parametrize("runtime", ["python3.11", "provided"])
@pytest.mark.parametrize(("field_name", "value"), [
    ("handler", "trace.hand\x00ler"), ("handler", "x" * 10_000), ("handler", "\x00"), ("handler", "trace.\udc80"),
    ("runtime", "python3.11\x00"), ("runtime", "r" * 10_000), ("handler", ""), ("runtime", ""),
])
def test_hostile_bundle_form_fields_are_a_400(client: FlaskClient, world: World, runtime: str, field_name: str,
                                              value: str) -> None:
    """The multipart upload is parsed by hand: its text fields meet the same bounds."""
    form = {"runtime": runtime, "handler": "bootstrap" if runtime == "provided" else "trace.handler", field_name: value}
    files = (member("bootstrap", "#!/bin/sh\n", mode=0o755),) if runtime == "provided" else PY
    response = client.post("/v1/bundles", headers=world.tenant.headers(), content_type="multipart/form-data", data={
        "file": (io.BytesIO(make_zip(*files)), "bundle.zip", "application/zip"),
        **{k: v.encode("utf-8", "surrogateescape") for k, v in form.items()}})
    assert response.status_code == 400, (response.status_code, response.get_data(as_text=True)[:300])
    assert _error_shaped(response.get_json())
