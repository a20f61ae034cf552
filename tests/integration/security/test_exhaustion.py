"""Resource exhaustion (issue 11, item 4): answers, exports, long polls and DAG numbers are bounded.

- Query answers are capped in bytes as they stream out of DuckDB: a JSON answer past
  ``query_max_result_bytes`` is a download for a user and 422 ``query_result_too_large`` for a
  task; an export past ``query_max_export_bytes`` stores nothing and is 422 (users and tasks).
- Long polls (``GET /v1/runs/{id}?wait=``) are capped per user, per org and per process: a
  flood from one org gets its extra waits answered at once (``Trace-Wait: refused``) while
  another org's waits are still held and its requests answered.
- Every numeric field of a DAG has a documented minimum and maximum (``tracecore.dags.bounds``):
  outside them 400 ``out_of_range`` with the field's path; NaN, infinity, huge ints and wrong
  units are refused too.

No wall clock decides a test: the flood is ordered by events and by the slots' own counts.
"""

from __future__ import annotations

import json
import math
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import func, select, text

from tests.conftest import Tenant, leased_capability, wait_for
from tracecore.db.engine import db
from tracecore.execution import tokens
from tracecore.execution.lease import RUN_FINISHED_CHANNEL
from tracecore.infra import storage
from tracecore.infra.storage import LocalObjectStore, ObjectStore, S3ObjectStore, object_store
from tracecore.query import engine as query
from tracecore.query.saved import Download
from tracecore.settings import SETTINGS_KEY, Settings, configure, current_settings
from web.long_polls import SLOTS

INLINE_CAP = 256 * 1024
EXPORT_CAP = 2 * 1024 * 1024


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """Small byte caps so that every bomb passes them quickly; small wait caps for the flood."""
    return configure(replace(settings, query_max_result_bytes=INLINE_CAP, query_max_export_bytes=EXPORT_CAP,
                             query_export_threshold=10_000, query_row_limit=1_000_000, query_timeout=60.0,
                             query_memory_limit="256MB", query_threads=1, run_wait_max_total=4,
                             run_wait_max_per_org=2, run_wait_max_per_principal=2))


# -- query answers -----------------------------------------------------------------

_MANY_COLUMNS = ", ".join(f"i + {k} AS c{k}" for k in range(300))

# Each answer holds more than INLINE_CAP bytes within the first 10,000 rows (the JSON threshold).
INLINE_BOMBS = {
    "wide_rows_1GB": "SELECT repeat('x', 100000) AS s FROM range(10000)",
    "many_rows": "SELECT i, i * 2 AS j, i * 3 AS k, i * 4 AS l FROM range(9000) t(i)",
    "many_columns": f"SELECT {_MANY_COLUMNS} FROM range(1000) t(i)",
    "one_huge_value": "SELECT repeat('ab', 400000) AS s",
    "string_agg": "SELECT string_agg(repeat('y', 100), ',') AS s FROM range(10000)",
    "list_of_ints": "SELECT list(i) AS l FROM range(200000) t(i)",
    "list_of_strings": "SELECT list(repeat('z', 50)) AS l FROM range(20000)",
    "range_cross_join": "SELECT a.range AS a, b.range AS b, repeat('q', 40) AS pad FROM range(300) a, range(300) b",
    "struct_values": "SELECT {'a': repeat('m', 1000), 'b': i} AS s FROM range(1000) t(i)",
    "blobs": "SELECT repeat('x', 100000)::BLOB AS b FROM range(100)",
    "unnest": "SELECT unnest(range(50000)) AS i, repeat('u', 30) AS pad",
    "generate_series_md5": "SELECT md5(i::varchar) AS h FROM generate_series(1, 9000) t(i)",
    "json_each_like_nesting": "SELECT [[repeat('n', 100)] || [repeat('o', 100)]] AS l FROM range(5000)",
}

# Each of these is more than EXPORT_CAP bytes as CSV and as Parquet (incompressible text).
_EXPORT_SQL = {
    "md5_rows": "SELECT md5(i::varchar) || md5((i + 1)::varchar) AS h FROM range(200000) t(i)",
    "uuids": "SELECT uuid()::varchar AS u, random() AS r FROM range(100000)",
    "string_agg": "SELECT string_agg(md5(i::varchar), '') AS s FROM range(100000) t(i)",
    "list_aggregation_as_text": "SELECT list(md5(i::varchar))::VARCHAR AS l FROM range(100000) t(i)",
    "range_cross_join": "SELECT a.range AS a, b.range AS b, md5((a.range * 1000 + b.range)::varchar) AS h "
                        "FROM range(300) a, range(300) b",
    "wide_rows": "SELECT md5(i::varchar) || repeat(md5((i * 7)::varchar), 1) AS a, uuid()::varchar AS b, "
                 "uuid()::varchar AS c FROM range(50000) t(i)",
}
# CSV holds no lists or structs (400 query_error); Parquet does.
EXPORT_BOMBS = [pytest.param(sql, fmt, id=f"{name}-{fmt}") for name, sql in _EXPORT_SQL.items()
                for fmt in ("csv", "parquet")] + [
    pytest.param("SELECT list(md5(i::varchar)) AS l FROM range(100000) t(i)", "parquet", id="list_aggregation-parquet"),
    pytest.param("SELECT {'h': md5(i::varchar), 'u': uuid()::varchar} AS s FROM range(60000) t(i)", "parquet",
                 id="structs-parquet"),
]


def post_query(client: FlaskClient, tenant: Tenant, sql: str, **extra: Any) -> Any:
    return client.post("/v1/query", json={"sql": sql, **extra}, headers=tenant.headers("reader"))


def task_query(client: FlaskClient, token: str, sql: str, **extra: Any) -> Any:
    return client.post("/v1/task/query", json={"sql": sql, **extra}, headers={"Authorization": f"Bearer {token}"})


@pytest.fixture
def task_token(app: Flask, client: FlaskClient, tenant: Tenant) -> str:
    """A capability of a leased task (a live attempt), as a sandbox holds it."""
    client.put("/v1/dags/reader", data="- name: reader\n  runtime: platform\n  operator: noop\n",
               headers={**tenant.headers(), "Content-Type": "application/yaml"})
    return tokens.mint(leased_capability(app, tenant.org_id, "reader"), tokens.secret_key(current_settings(app)))


def stored_exports(app: Flask) -> list[Path]:
    """Every file of the local store under exports/ and scratch/ (where query exports land)."""
    store = object_store(current_settings(app))
    assert isinstance(store, LocalObjectStore)
    return [path for top in ("exports", "scratch") for path in (store.root / top).rglob("*") if path.is_file()]


def assert_too_large(response: Any, cap: int) -> None:
    assert response.status_code == 422, (response.status_code, response.data[:300])
    error = response.json["error"]
    assert error["code"] == "query_result_too_large" and error["details"]["max_bytes"] == cap, error


@pytest.mark.parametrize("sql", INLINE_BOMBS.values(), ids=INLINE_BOMBS.keys())
def test_a_tasks_inline_answer_over_the_byte_cap_is_refused(client: FlaskClient, task_token: str, sql: str) -> None:
    assert_too_large(task_query(client, task_token, sql), INLINE_CAP)


@pytest.mark.parametrize("sql", INLINE_BOMBS.values(), ids=INLINE_BOMBS.keys())
def test_a_users_inline_answer_over_the_byte_cap_becomes_a_capped_download(app: Flask, client: FlaskClient,
                                                                          tenant: Tenant, sql: str) -> None:
    response = post_query(client, tenant, sql)
    if response.status_code == 422:  # the spilled file itself passed the export cap
        assert_too_large(response, EXPORT_CAP)
        assert db.session.scalar(select(func.count()).select_from(Download)) == 0
        assert stored_exports(app) == []
        return
    assert response.status_code == 200, response.json
    body = response.json
    assert "rows" not in body and body["format"] == "parquet" and body["bytes"] <= EXPORT_CAP, body
    assert len(response.data) < INLINE_CAP // 8  # the answer names the download; it does not carry the rows
    fetched = client.get(body["download"], headers=tenant.headers("reader"), buffered=False)
    assert fetched.status_code == 200 and fetched.is_streamed
    assert int(fetched.headers["Content-Length"]) == body["bytes"]
    assert sum(len(chunk) for chunk in fetched.response) == body["bytes"]
    fetched.close()


@pytest.mark.parametrize(("sql", "fmt"), EXPORT_BOMBS)
def test_an_export_over_the_byte_cap_stores_nothing(app: Flask, client: FlaskClient, tenant: Tenant, sql: str,
                                                    fmt: str) -> None:
    assert_too_large(post_query(client, tenant, sql, format=fmt), EXPORT_CAP)
    assert db.session.scalar(select(func.count()).select_from(Download)) == 0
    assert stored_exports(app) == []


@pytest.mark.parametrize(("sql", "fmt"), EXPORT_BOMBS)
def test_a_tasks_export_over_the_byte_cap_stores_nothing(app: Flask, client: FlaskClient, task_token: str,
                                                         sql: str, fmt: str) -> None:
    assert_too_large(task_query(client, task_token, sql, format=fmt), EXPORT_CAP)
    assert stored_exports(app) == []


def test_the_csv_of_a_1GB_answer_stops_at_the_cap(app: Flask, client: FlaskClient, tenant: Tenant) -> None:
    """The issue's query as CSV: 1 GB of text, refused once the file passes the cap (nothing kept)."""
    assert_too_large(post_query(client, tenant, INLINE_BOMBS["wide_rows_1GB"], format="csv"), EXPORT_CAP)
    assert stored_exports(app) == []


def test_answers_under_the_caps_still_answer(app: Flask, client: FlaskClient, tenant: Tenant,
                                             task_token: str) -> None:
    """The caps refuse only what passes them: the same shapes, smaller, answer as before."""
    small = "SELECT repeat('x', 1000) AS s FROM range(100)"  # ~100 kB
    for response in (post_query(client, tenant, small), task_query(client, task_token, small)):
        assert response.status_code == 200 and len(response.json["rows"]) == 100, response.json
    export = post_query(client, tenant, "SELECT md5(i::varchar) AS h FROM range(10000) t(i)", format="csv")
    assert export.status_code == 200 and 0 < export.json["bytes"] <= EXPORT_CAP, export.json
    assert [path.suffix for path in stored_exports(app)] == [".csv"]


# -- long polls --------------------------------------------------------------------

FLOODS = {
    "one_reader_12_waits": [("reader", 12)],
    "three_users_4_waits_each": [("reader", 4), ("writer", 4), ("admin", 4)],
    "two_users_20_waits_each": [("reader", 20), ("admin", 20)],
}


def _queued_run(client: FlaskClient, tenant: Tenant) -> str:
    """A run that stays queued (no worker runs in these tests)."""
    client.put("/v1/dags/slow", data="- name: slow\n  runtime: platform\n  operator: noop\n",
               headers={**tenant.headers(), "Content-Type": "application/yaml"})
    created = client.post("/v1/jobs/slow/runs", json={}, headers=tenant.headers("writer"))
    assert created.status_code == 202, created.json
    return created.json["run_id"]


class Waits:
    """Long polls sent from threads, each with its own test client; results kept in order of arrival."""

    def __init__(self, app: Flask) -> None:
        self.app = app
        self.threads: list[threading.Thread] = []
        self.answers: list[tuple[str, Any]] = []
        self.lock = threading.Lock()

    def send(self, label: str, run_id: str, headers: dict[str, str]) -> None:
        def call() -> None:
            response = self.app.test_client().get(f"/v1/runs/{run_id}?wait=30", headers=headers)
            with self.lock:
                self.answers.append((label, response))

        thread = threading.Thread(target=call, daemon=True)
        self.threads.append(thread)
        thread.start()

    def answered(self, label: str) -> list[Any]:
        with self.lock:
            return [response for got, response in self.answers if got == label]

    def join(self) -> None:
        for thread in self.threads:
            thread.join(timeout=60)
        assert not any(thread.is_alive() for thread in self.threads)


@pytest.fixture
def waits(app: Flask) -> Iterator[Waits]:
    sent = Waits(app)
    yield sent
    for thread in sent.threads:  # a failed test must not leave waits behind
        thread.join(timeout=60)


def _wake(run_ids: list[str]) -> None:
    """The run-finished notification the waits LISTEN for (the runs themselves stay queued)."""
    for run_id in run_ids:
        db.session.execute(text("SELECT pg_notify(:channel, :payload)"),
                           {"channel": RUN_FINISHED_CHANNEL, "payload": run_id})
    db.session.commit()


@pytest.mark.parametrize("flood", FLOODS.values(), ids=FLOODS.keys())
def test_a_long_poll_flood_from_one_org_never_holds_the_api_for_another(
        app: Flask, client: FlaskClient, make_tenant: Callable[[str], Tenant], waits: Waits,
        flood: list[tuple[str, int]]) -> None:
    flooder, other = make_tenant("flooder"), make_tenant("other")
    flood_run, other_run = _queued_run(client, flooder), _queued_run(client, other)
    sent = 0
    for role, count in flood:
        for _ in range(count):
            waits.send("flood", flood_run, flooder.headers(role))
            sent += 1
    # The org's cap (2) holds two waits; every other one answers at once with the run as it is.
    wait_for(lambda: len(waits.answered("flood")) == sent - 2, message="the refused waits to answer")
    assert SLOTS.held(flooder.org_id) == 2
    for response in waits.answered("flood"):
        assert response.status_code == 200 and response.json["status"] == "queued"
        assert response.headers["Trace-Wait"] == "refused" and response.headers["Retry-After"] == "1"
    # While the flood holds its waits, the other org is served: its own wait is held, its
    # ordinary requests answer, and none of the flood's held waits has ended.
    waits.send("other", other_run, other.headers("reader"))
    wait_for(lambda: SLOTS.held(other.org_id) == 1, message="the other org's wait to be held")
    assert client.get("/v1/me", headers=other.headers("reader")).status_code == 200
    assert client.get("/v1/runs", headers=other.headers("reader")).status_code == 200
    assert len(waits.answered("flood")) == sent - 2 and waits.answered("other") == []
    _wake([flood_run, other_run])
    waits.join()
    held = [response for response in waits.answered("flood") if response.headers["Trace-Wait"] == "held"]
    assert len(held) == 2 and all(response.json["status"] == "queued" for response in held)
    [mine] = waits.answered("other")
    assert mine.status_code == 200 and mine.headers["Trace-Wait"] == "held"
    assert SLOTS.held() == 0


def test_one_user_holds_at_most_its_own_cap(app: Flask, client: FlaskClient, tenant: Tenant, waits: Waits) -> None:
    """Per user 1: a second wait of the same reader answers at once; another member's is held."""
    app.config[SETTINGS_KEY] = replace(current_settings(app), run_wait_max_per_principal=1)
    run_id = _queued_run(client, tenant)
    waits.send("reader", run_id, tenant.headers("reader"))
    wait_for(lambda: SLOTS.held(tenant.org_id) == 1, message="the first wait to be held")
    second = client.get(f"/v1/runs/{run_id}?wait=30", headers=tenant.headers("reader"))
    assert second.status_code == 200 and second.headers["Trace-Wait"] == "refused"
    waits.send("admin", run_id, tenant.headers("admin"))
    wait_for(lambda: SLOTS.held(tenant.org_id) == 2, message="another member's wait to be held")
    _wake([run_id])
    waits.join()
    assert [r.headers["Trace-Wait"] for r in waits.answered("reader") + waits.answered("admin")] == ["held", "held"]


def test_the_process_total_caps_every_org_together(app: Flask, client: FlaskClient,
                                                   make_tenant: Callable[[str], Tenant], waits: Waits) -> None:
    """Total 4, per org 2: two orgs fill the process; a third org's wait answers at once."""
    tenants = [make_tenant(f"org{k}") for k in range(3)]
    runs = [_queued_run(client, tenant) for tenant in tenants]
    for tenant, run_id in zip(tenants[:2], runs[:2], strict=True):
        for role in ("reader", "writer"):
            waits.send("held", run_id, tenant.headers(role))
    wait_for(lambda: SLOTS.held() == 4, message="four waits to be held")
    third = client.get(f"/v1/runs/{runs[2]}?wait=30", headers=tenants[2].headers("reader"))
    assert third.status_code == 200 and third.headers["Trace-Wait"] == "refused"
    assert client.get("/v1/me", headers=tenants[2].headers("reader")).status_code == 200
    _wake(runs[:2])
    waits.join()
    assert len(waits.answered("held")) == 4 and SLOTS.held() == 0


# -- DAG bounds --------------------------------------------------------------------

NAN, INF = float("nan"), float("inf")
HUGE = 10 ** 400  # past the API's 256 digits: refused whole (number_too_large) before validation
BIG = 10 ** 200  # reaches the validator

# (field, bad value, expected code). A value that is a number or duration but outside the
# documented bounds is out_of_range; one that is no finite number at all keeps its parse error.
BOUND_CASES: list[tuple[str, Any, str]] = [
    *[("schedule.every", value, "out_of_range") for value in
      ("1ms", "999ms", 0.001, 0.5, 1e30, 10 ** 30, "367d", "9000h", 366 * 86400 + 1)],
    *[("schedule.every", value, "invalid_duration") for value in
      (0, -1, "-5m", NAN, INF, -INF, HUGE, "5 fortnights", "1e30", "1s1s", "", "ms")],
    ("schedule.every", BIG, "out_of_range"),
    ("schedule.every", True, "invalid_type"),
    *[("schedule.catch_up", value, "out_of_range") for value in (-1, 101, 10 ** 9, BIG, HUGE)],
    ("schedule.catch_up", 1.5, "invalid_type"),
    *[("limits.memory", value, "out_of_range") for value in
      (1, 63, "32MB", "63m", 8193, "9GB", "1TB", 10 ** 30, BIG, HUGE)],
    *[("limits.memory", value, "invalid_value") for value in (0, -512, "0.5MB", "512 parsecs", "1PB", "lots")],
    *[("limits.memory", value, "invalid_type") for value in (1e30, NAN, INF, 512.5, [512])],
    *[("limits.cpu", value, "out_of_range") for value in (0, -1, 0.01, 0.09, 4.01, 64, 1e30, BIG, HUGE)],
    *[("limits.cpu", value, "invalid_value") for value in (NAN, INF, -INF)],
    ("limits.cpu", "2", "invalid_type"),
    *[("limits.timeout", value, "out_of_range") for value in ("1ms", "0.5s", 0.5, "3601s", "2h", "1d", 1e30)],
    *[("limits.timeout", value, "invalid_duration") for value in (0, -30, NAN, INF, HUGE, "forever")],
    *[("limits.pids", value, "out_of_range") for value in (0, 1, 15, 4097, -1, 10 ** 30, BIG, HUGE)],
    ("limits.pids", 64.5, "invalid_type"),
    *[("max_retries", value, "out_of_range") for value in (-1, 101, 10 ** 9, BIG, HUGE)],
    ("max_retries", NAN, "invalid_type"),
    *[("max_concurrency", value, "out_of_range") for value in (0, -1, 10_001, 2 ** 31, 2 ** 63, BIG, HUGE)],
    ("max_concurrency", INF, "invalid_type"),
    *[("idle_timeout", value, "out_of_range") for value in ("1ms", "0.5s", "31d", 1e30, 30 * 86400 + 1)],
    *[("idle_timeout", value, "invalid_duration") for value in (0, -1, NAN, INF, HUGE)],
    *[("trigger.any_of.timeout", value, "out_of_range") for value in ("1ms", "31d", 1e30)],
    *[("trigger.any_of.timeout", value, "invalid_duration") for value in (0, NAN, INF)],
    *[("batch.window", value, "out_of_range") for value in ("1ms", "0.9s", "2d", 1e30)],
    *[("batch.window", value, "invalid_duration") for value in (0, NAN, -INF)],
    *[("batch.max_updates", value, "out_of_range") for value in (0, -5, 10_001, HUGE)],
    *[("outputs", value, "out_of_range") for value in (-1, 65, 10 ** 9, BIG, HUGE)],
    ("outputs", "65 declarations", "out_of_range"),
    *[("inputs.output", value, "out_of_range") for value in (-1, 64, 10 ** 9, BIG, HUGE)],
]

_PATHS = {"schedule.every": "jobs[0].schedule.every", "schedule.catch_up": "jobs[0].schedule.catch_up",
          "trigger.any_of.timeout": "jobs[0].trigger.timeout", "batch.window": "jobs[0].batch.window",
          "batch.max_updates": "jobs[0].batch.max_updates", "inputs.output": "jobs[0].inputs[0].from.output"}


def _dag_with(field: str, value: Any) -> list[dict[str, Any]]:
    job: dict[str, Any] = {"name": "bounded", "runtime": "platform", "operator": "noop"}
    top, _, leaf = field.partition(".")
    if top == "schedule":
        job.update(activation="scheduled", schedule={"every": "1m", leaf: value} if leaf != "every"
                   else {"every": value})
    elif top == "limits":
        job["limits"] = {leaf: value}
    elif top == "trigger":
        job["trigger"] = {"any_of": ["block_follower"], "timeout": value}
    elif top == "batch":
        job.update(activation="reactive", execution_strategy="Batched", inputs=[{"from": {"job": "block_follower",
                                                                                        "output": 0}}],
                   batch={leaf: value})
    elif top == "inputs":
        job["inputs"] = [{"from": {"job": "block_follower", "output": value}}]
    elif field == "outputs" and value == "65 declarations":
        job["outputs"] = [{"dataset": f"out_{k}"} for k in range(65)]
    else:
        job[field] = value
    return [job]


def _body(dag: list[dict[str, Any]]) -> dict[str, Any]:
    """JSON keeps exact types; NaN and infinity, which the API refuses in JSON, go as YAML (.nan, .inf)."""
    if "nan" in repr(dag) or "inf" in repr(dag):
        return {"data": yaml.safe_dump(dag), "content_type": "application/yaml"}
    return {"data": json.dumps(dag), "content_type": "application/json"}


def _case_id(case: tuple[str, Any, str]) -> str:
    field, value, _ = case
    shown = "HUGE" if value is HUGE else "BIG" if value is BIG else repr(value)[:20]
    return f"{field}={shown}"


@pytest.mark.parametrize(("field", "value", "code"), BOUND_CASES, ids=[_case_id(case) for case in BOUND_CASES])
def test_a_dag_number_outside_its_bounds_is_refused(client: FlaskClient, tenant: Tenant, field: str, value: Any,
                                                    code: str) -> None:
    response = client.put("/v1/dags/bounds", **_body(_dag_with(field, value)), headers=tenant.headers())
    assert response.status_code == 400, response.json
    path = _PATHS.get(field, f"jobs[0].{field}")
    problems = {(item["code"], item["path"]) for item in response.json["error"]["details"]["errors"]}
    # NaN, infinity and integers past 256 digits may be refused whole, before any field is read.
    unreadable = value is HUGE or (isinstance(value, float) and not math.isfinite(value))
    at_the_edge = unreadable and problems <= {("invalid_body", ""), ("number_too_large", "")}
    assert (code, path) in problems or at_the_edge, response.json
    assert client.get("/v1/dags/bounds", headers=tenant.headers()).status_code == 404  # nothing stored


@pytest.mark.parametrize(("field", "value"), [
    ("schedule.every", "1s"), ("schedule.every", "366d"), ("schedule.catch_up", 100), ("limits.memory", 64),
    ("limits.memory", "8GB"), ("limits.cpu", 0.1), ("limits.cpu", 4), ("limits.timeout", "1s"),
    ("limits.timeout", "1h"), ("limits.pids", 16), ("limits.pids", 4096), ("max_retries", 0), ("max_retries", 100),
    ("max_concurrency", 1), ("max_concurrency", 10_000), ("idle_timeout", "30d"), ("batch.window", "1d"),
    ("batch.max_updates", 10_000), ("outputs", 64), ("trigger.any_of.timeout", "1s"),
])
def test_the_bounds_themselves_are_accepted(client: FlaskClient, tenant: Tenant, field: str, value: Any) -> None:
    response = client.put(f"/v1/dags/ok-{uuid.uuid4().hex[:8]}", data=json.dumps(_dag_with(field, value)),
                          headers={**tenant.headers(), "Content-Type": "application/json"})
    assert response.status_code in (200, 201), response.json


def test_the_bounds_follow_the_installations_settings(app: Flask, client: FlaskClient, tenant: Tenant) -> None:
    """TRACE_MIN_SCHEDULE_INTERVAL, TRACE_MAX_JOB_MEMORY, _CPU and _TIMEOUT move the bounds."""
    app.config[SETTINGS_KEY] = replace(current_settings(app), min_schedule_interval=60.0, max_job_memory=1024,
                                           max_job_cpu=1.0, max_job_timeout=120.0)
    for field, value, allowed in [("schedule.every", "30s", False), ("schedule.every", "1m", True),
                                  ("limits.memory", "2GB", False), ("limits.memory", "1GB", True),
                                  ("limits.cpu", 2, False), ("limits.cpu", 1, True),
                                  ("limits.timeout", "3m", False), ("limits.timeout", "2m", True)]:
        response = client.put("/v1/dags/moved", data=json.dumps(_dag_with(field, value)),
                              headers={**tenant.headers(), "Content-Type": "application/json"})
        assert (response.status_code in (200, 201)) is allowed, (field, value, response.json)
        if not allowed:
            assert response.json["error"]["code"] == "out_of_range", response.json


# -- the engine over both stores ---------------------------------------------------------


@pytest.fixture(params=["local", "s3"])
def engine_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ObjectStore]:
    """A local store, or the S3 store against the session's S3 server (credentials from the env)."""
    if request.param == "local":
        yield LocalObjectStore(tmp_path / "objects")
        return
    server = request.getfixturevalue("s3_server")
    with pytest.MonkeyPatch.context() as patch:
        for name, value in server.env().items():
            patch.setenv(name, value)
        storage.reset_clients()
        yield S3ObjectStore(server.bucket, f"tests/{uuid.uuid4().hex[:12]}", endpoint_url=server.endpoint_url,
                            region=server.region)
    storage.reset_clients()


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_an_export_streams_into_the_store_and_stops_at_its_cap(engine_store: ObjectStore, fmt: str) -> None:
    sql = _EXPORT_SQL["md5_rows"]
    options: dict[str, Any] = {"store": engine_store, "fmt": fmt, "limit": 1_000_000, "timeout_s": 60.0,
                               "memory_limit": "256MB", "threads": 1}
    with pytest.raises(query.QueryResultTooLarge):
        query.export_query(sql, [], key=f"exports/over.{fmt}", max_bytes=EXPORT_CAP, **options)
    assert not engine_store.exists(f"exports/over.{fmt}")
    result = query.export_query(sql, [], key=f"exports/under.{fmt}", max_bytes=64 * 1024 * 1024, **options)
    assert result.export is not None and result.export.bytes > EXPORT_CAP
    assert len(engine_store.get(f"exports/under.{fmt}")) == result.export.bytes and result.row_count == 200_000
