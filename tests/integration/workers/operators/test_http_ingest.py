"""The ``http_ingest`` operator against a real HTTP server, real PostgreSQL and a real worker.

The server (``FeedServer``, a threaded ``http.server`` on 127.0.0.1) stands in for an outside API:
the installation's allowlist names ``http://127.0.0.1:<port>/`` itself, which is what lets a
loopback address through (an entry that only matched by wildcard would not). It serves a good feed
and every hostile answer this suite knows: a huge body, a slow drip, silence, HTML, deep nesting,
NaN, wrong types, redirects to the metadata service and to names that are not on the allowlist, a
redirect loop, gzip, a broken status line, too many headers, a short body.

What is asserted is always what was recorded: the attempt's status and exit reason, the dataset's
versions and rows, the runs the new version fired; never how long anything took (the drip and the
silent server never finish, so the fetch timeout is certain to be what ends them).
"""

from __future__ import annotations

import gzip
import http.server
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select

import tests.conftest
from tests.conftest import Processes, Tenant, wait_for
from tracecore.dags import http_feed
from tracecore.data import datasets
from tracecore.db.engine import db
from tracecore.execution import runs
from tracecore.execution.runs import Run
from tracecore.settings import SETTINGS_KEY, Settings, configure
from workers import dispatcher
from workers.operators.http_ingest import FetchRefused, fetch

MAX_BYTES = 256 << 10

SCHEMA = [{"name": "id", "type": "int64", "nullable": False}, {"name": "symbol", "type": "string"},
          {"name": "usd", "type": "float64"}]


def _dag(**feed: Any) -> list[dict[str, Any]]:
    return [
        {"name": "feed", "runtime": "platform", "operator": "http_ingest", "max_retries": 0, "unique_key": ["id"],
         "outputs": [{"dataset": "prices", "kind": "buffered", "schema": SCHEMA}],
         "config": {"url": "http://127.0.0.1:1/unused", "records": "/data/items"}, **feed},
        {"name": "react", "runtime": "platform", "operator": "noop", "activation": "reactive",
         "inputs": [{"from": {"job": "feed", "output": 0}}], "outputs": 1},
    ]


# -- the server ----------------------------------------------------------------------------------


class FeedServer:
    """A local stand-in for an outside JSON API, friendly on some paths and hostile on the others."""

    def __init__(self) -> None:
        self.items = [{"id": 1, "symbol": "eth", "usd": 3000.5, "extra": {"ignored": True}},
                      {"id": 2, "symbol": "btc", "usd": 97000.0}]
        self.stop = threading.Event()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                route = ROUTES.get(self.path.split("?", 1)[0])
                if route is None:
                    self.send_error(404)
                    return
                try:
                    route(server, self)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up, as it should

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.block_on_close = False
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def _send(handler: http.server.BaseHTTPRequestHandler, body: bytes, content_type: str = "application/json",
          status: int = 200, **headers: str) -> None:
    handler.send_response(status)
    handler.send_header("Content-Type", content_type)
    handler.send_header("Content-Length", str(len(body)))
    for name, value in headers.items():
        handler.send_header(name.replace("_", "-"), value)
    handler.end_headers()
    handler.wfile.write(body)


def _redirect(location: str) -> Callable[[FeedServer, Any], None]:
    def route(server: FeedServer, handler: http.server.BaseHTTPRequestHandler) -> None:
        handler.send_response(302)
        handler.send_header("Location", location.format(port=server.port))
        handler.send_header("Content-Length", "0")
        handler.end_headers()
    return route


def _stream(server: FeedServer, handler: http.server.BaseHTTPRequestHandler, chunk: bytes, pause: float) -> None:
    """A 200 JSON answer without a length that never ends: ``chunk`` after ``chunk`` until the client leaves."""
    handler.send_response(200)
    handler.send_header("Content-Type", "application/json")
    handler.end_headers()
    handler.wfile.write(b"[")
    while not server.stop.is_set():
        handler.wfile.write(chunk)
        handler.wfile.flush()
        if pause:
            time.sleep(pause)


def _drip_headers(server: FeedServer, handler: http.server.BaseHTTPRequestHandler) -> None:
    """A status line, then one header byte at a time, forever: each read gets a byte well within any
    per-read timeout, so only a deadline on the whole exchange ends it."""
    handler.wfile.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
    while not server.stop.is_set():
        handler.wfile.write(b"a")
        handler.wfile.flush()
        time.sleep(0.05)


def _silent(server: FeedServer, handler: http.server.BaseHTTPRequestHandler) -> None:
    server.stop.wait(60)


def _raw(data: bytes) -> Callable[[FeedServer, Any], None]:
    def route(server: FeedServer, handler: http.server.BaseHTTPRequestHandler) -> None:
        handler.wfile.write(data)
        handler.close_connection = True
    return route


def _many_headers(server: FeedServer, handler: http.server.BaseHTTPRequestHandler) -> None:
    handler.send_response(200)
    for index in range(150):
        handler.send_header(f"X-Filler-{index}", "x")
    handler.send_header("Content-Type", "application/json")
    handler.end_headers()
    handler.wfile.write(b"[]")


ROUTES: dict[str, Callable[[FeedServer, Any], None]] = {
    "/prices": lambda s, h: _send(h, json.dumps({"data": {"items": s.items}}).encode()),
    "/prices-moved": _redirect("/prices"),
    "/empty": lambda s, h: _send(h, b'{"data": {"items": []}}'),
    "/huge-announced": _raw(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000000000000"
                            b"\r\n\r\n[1,2,3"),
    "/huge-streamed": lambda s, h: _stream(s, h, b"1," * 32768, 0),
    "/drip": lambda s, h: _stream(s, h, b"1,", 0.05),
    "/silent": _silent,
    "/drip-headers": _drip_headers,
    "/html": lambda s, h: _send(h, b"<html><body>{}</body></html>", "text/html"),
    "/deep": lambda s, h: _send(h, b"[" * 100_000 + b"]" * 100_000),
    "/nan": lambda s, h: _send(h, b'{"data": {"items": [{"id": 1, "usd": NaN}]}}'),
    "/garbage": lambda s, h: _send(h, b'{"data": {"items": [{"id": 1,'),
    "/wrong-types": lambda s, h: _send(h, b'{"data": {"items": [{"id": "one", "symbol": 5, "usd": "x"}]}}'),
    "/not-records": lambda s, h: _send(h, b'{"data": {"items": ["eth", "btc"]}}'),
    "/no-records": lambda s, h: _send(h, b'{"data": {}}'),
    "/redirect-metadata": _redirect("http://169.254.169.254/latest/meta-data/iam/security-credentials/"),
    "/redirect-localhost": _redirect("http://localhost:{port}/prices"),
    "/redirect-file": _redirect("file:///etc/passwd"),
    "/redirect-loop": _redirect("/redirect-loop"),
    "/gzip": lambda s, h: _send(h, gzip.compress(b"[" + b"0," * 1_000_000 + b"0]"), Content_Encoding="gzip"),
    "/status-500": lambda s, h: _send(h, b'{"error": "down"}', status=500),
    "/not-http": _raw(b"HELLO THERE\r\n\r\n"),
    "/many-headers": _many_headers,
    "/short": _raw(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 500\r\n\r\n[1,2,3]"),
}


@pytest.fixture
def feed() -> Iterator[FeedServer]:
    server = FeedServer()
    yield server
    server.close()


@pytest.fixture
def settings(settings: Settings, feed: FeedServer) -> Settings:
    """The tests' settings with the stand-in API allowlisted (by its address, named itself)."""
    return configure(replace(settings, http_ingest_allowlist=(f"{feed.url}/",), http_ingest_timeout=2.0,
                             http_ingest_max_bytes=MAX_BYTES))


@pytest.fixture
def worker_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Worker processes get the http_ingest settings too (``process_env`` passes a fixed set)."""
    plain = tests.conftest.process_env

    def with_feed(settings: Settings) -> dict[str, str]:
        return {**plain(settings), "TRACE_HTTP_INGEST_ALLOWLIST": ",".join(settings.http_ingest_allowlist),
                "TRACE_HTTP_INGEST_TIMEOUT": str(settings.http_ingest_timeout),
                "TRACE_HTTP_INGEST_MAX_BYTES": str(settings.http_ingest_max_bytes)}

    monkeypatch.setattr(tests.conftest, "process_env", with_feed)


# -- helpers -------------------------------------------------------------------------------------


def _put(client: FlaskClient, tenant: Tenant, dag: list[dict[str, Any]]) -> None:
    response = client.put("/v1/dags/feeds", data=json.dumps(dag),
                          headers={**tenant.headers("writer"), "Content-Type": "application/json"})
    assert response.status_code == 200, response.json


def _read_run(client: FlaskClient, tenant: Tenant, run_id: str) -> dict[str, Any]:
    db.session.rollback()
    response = client.get(f"/v1/runs/{run_id}", headers=tenant.headers("reader"))
    assert response.status_code == 200 and response.json is not None, response.json
    return response.json


def _run_here(app: Flask, client: FlaskClient, tenant: Tenant, url: str) -> dict[str, Any]:
    """One run of ``feed`` for ``url``, executed by the dispatcher in this process (as a worker would)."""
    run_id, task_id = runs.create_run(org_id=tenant.org_id, job_name="feed", cause="manual", triggered_by=None,
                                      config_overrides={"url": url})
    db.session.commit()
    outcome = dispatcher.execute(app, str(task_id), lambda task, delay: None)
    run = _read_run(client, tenant, str(run_id))
    run["outcome"] = outcome
    return run


def _run_by_worker(client: FlaskClient, tenant: Tenant, processes: Processes, worker: Any,
                   config: dict[str, Any] | None = None) -> dict[str, Any]:
    response = client.post("/v1/jobs/feed/runs", json={"config": config or {}}, headers=tenant.headers("writer"))
    assert response.status_code == 202 and response.json is not None, response.json
    run_id = response.json["run_id"]

    def finished() -> dict[str, Any] | None:
        run = _read_run(client, tenant, run_id)
        return run if run["status"] in ("succeeded", "failed") else None

    try:
        run: dict[str, Any] = wait_for(finished, timeout=60, message="the feed run to finish")  # type: ignore[assignment]
        return run
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{processes.log(worker)}") from None


def _rows(client: FlaskClient, tenant: Tenant) -> list[dict[str, Any]]:
    response = client.post("/v1/query", json={"sql": "SELECT id, symbol, usd FROM prices ORDER BY id"},
                           headers=tenant.headers("reader"))
    assert response.status_code == 200 and response.json is not None, response.json
    rows: list[dict[str, Any]] = response.json["rows"]
    return rows


def _data_runs(org_id: uuid.UUID) -> list[str]:
    db.session.rollback()
    return list(db.session.scalars(select(Run.state).where(Run.org_id == org_id, Run.cause == "data")))


# -- end to end ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_feed_lands_in_its_dataset_once_and_fires_the_jobs_downstream(
        client: FlaskClient, tenant: Tenant, feed: FeedServer, processes: Processes, worker_env: None) -> None:
    _put(client, tenant, _dag(config={"url": f"{feed.url}/prices?api_key=secret-ish", "records": "/data/items"}))
    worker = processes.worker()

    first = _run_by_worker(client, tenant, processes, worker)
    attempt = first["tasks"][0]["attempts"][0]
    assert first["status"] == "succeeded", (attempt, processes.log(worker))
    assert attempt["result"] == {"url": f"{feed.url}/prices", "status": 200, "bytes": attempt["result"]["bytes"],
                                 "records": 2, "received": 2, "inserted": 2, "duplicates": 0, "dataset": "prices",
                                 "version": 1, "updated": 0}
    assert _rows(client, tenant) == [{"id": 1, "symbol": "eth", "usd": 3000.5}, {"id": 2, "symbol": "btc",
                                                                                  "usd": 97000.0}]
    # The new version fired the reactive job downstream (the publish's event, then the worker).
    assert wait_for(lambda: _data_runs(tenant.org_id) == ["succeeded"], timeout=60, message="the reactive run")

    # The same answer again: every row a duplicate, no version, nothing fired.
    again = _run_by_worker(client, tenant, processes, worker)
    assert again["status"] == "succeeded"
    assert again["tasks"][0]["attempts"][0]["result"]["inserted"] == 0
    db.session.rollback()
    assert datasets.get_dataset(tenant.org_id, "prices").current_version == 1

    # One new record (through an allowlisted redirect): one new row, version 2, one more reactive run.
    feed.items.append({"id": 3, "symbol": "sol", "usd": 230.25})
    third = _run_by_worker(client, tenant, processes, worker, {"url": f"{feed.url}/prices-moved"})
    assert third["status"] == "succeeded", third["tasks"][0]["attempts"]
    assert third["tasks"][0]["attempts"][0]["result"]["inserted"] == 1
    assert [row["id"] for row in _rows(client, tenant)] == [1, 2, 3]
    assert wait_for(lambda: _data_runs(tenant.org_id) == ["succeeded", "succeeded"], timeout=60,
                    message="the second reactive run")
    processes.wait_idle()
    assert len(_data_runs(tenant.org_id)) == 2


@pytest.mark.slow
def test_a_scheduled_feed_runs_on_its_schedule(client: FlaskClient, tenant: Tenant, feed: FeedServer,
                                               processes: Processes, worker_env: None) -> None:
    _put(client, tenant, _dag(activation="scheduled", schedule={"every": "1s"},
                              config={"url": f"{feed.url}/prices", "records": "/data/items"}))
    processes.worker()
    processes.beat()

    def scheduled() -> list[str]:
        db.session.rollback()
        return [state for state in db.session.scalars(select(Run.state).where(Run.org_id == tenant.org_id,
                                                                              Run.cause == "schedule"))
                if state == "succeeded"]

    assert wait_for(lambda: len(scheduled()) >= 2, timeout=60, message="two scheduled runs")
    assert [row["id"] for row in _rows(client, tenant)] == [1, 2]
    db.session.rollback()
    assert datasets.get_dataset(tenant.org_id, "prices").current_version == 1  # later ticks found nothing new


@pytest.mark.slow
def test_hostile_answers_fail_attempts_and_the_worker_lives_on(
        client: FlaskClient, tenant: Tenant, feed: FeedServer, processes: Processes, worker_env: None) -> None:
    _put(client, tenant, _dag())
    worker = processes.worker()
    for path, reason in (("/drip", "fetch_timeout"), ("/huge-streamed", "response_too_large"),
                         ("/deep", "too_deep"), ("/redirect-metadata", "url_not_allowed")):
        run = _run_by_worker(client, tenant, processes, worker, {"url": f"{feed.url}{path}"})
        attempt = run["tasks"][0]["attempts"][0]
        assert (run["status"], attempt["exit_reason"]) == ("failed", reason), attempt
        assert worker.poll() is None, processes.log(worker)
    good = _run_by_worker(client, tenant, processes, worker, {"url": f"{feed.url}/prices"})
    assert good["status"] == "succeeded", good["tasks"][0]["attempts"]


# -- the hostile suite (the dispatcher in this process, as a worker runs it) ------------------------


HOSTILE = [
    ("/huge-announced", "response_too_large", "announces 1000000000000 bytes"),
    ("/huge-streamed", "response_too_large", f"exceeds {MAX_BYTES} bytes"),
    ("/drip", "fetch_timeout", "within the fetch timeout"),
    ("/silent", "fetch_timeout", "within the fetch timeout"),
    ("/drip-headers", "fetch_timeout", "within the fetch timeout"),
    ("/html", "not_json", "'text/html'"),
    ("/deep", "too_deep", "more than 64 levels"),
    ("/nan", "invalid_json", "NaN is not a JSON number"),
    ("/garbage", "invalid_json", "not valid JSON"),
    ("/wrong-types", "publish_error", "schema_mismatch"),
    ("/not-records", "invalid_records", "record 0 is a string"),
    ("/no-records", "invalid_records", "no key 'items'"),
    ("/redirect-metadata", "url_not_allowed", "redirects to http://169.254.169.254/latest/meta-data/"),
    ("/redirect-localhost", "url_not_allowed", "redirects to http://localhost:"),
    ("/redirect-file", "url_not_allowed", "scheme must be http or https"),
    ("/redirect-loop", "too_many_redirects", "more than 3 redirects"),
    ("/gzip", "unsupported_encoding", "'gzip'"),
    ("/status-500", "http_status", "answered HTTP 500"),
    ("/not-http", "fetch_failed", "BadStatusLine"),
    ("/many-headers", "fetch_failed", "more than 100 headers"),
    ("/short", "fetch_failed", "bytes short of the announced Content-Length"),
]


@pytest.mark.parametrize(("path", "reason", "words"), HOSTILE, ids=[case[0].strip("/") for case in HOSTILE])
def test_a_hostile_answer_is_a_failed_attempt_with_its_exit_reason(
        app: Flask, client: FlaskClient, tenant: Tenant, feed: FeedServer, path: str, reason: str, words: str) -> None:
    _put(client, tenant, _dag())
    run = _run_here(app, client, tenant, f"{feed.url}{path}")
    [attempt] = run["tasks"][0]["attempts"]
    assert (run["outcome"], run["status"], attempt["status"]) == ("dead_letter", "failed", "failed"), attempt
    assert attempt["exit_reason"] == reason, attempt
    assert words in attempt["error_message"], attempt["error_message"]
    db.session.rollback()
    prices = datasets.get_dataset(tenant.org_id, "prices")
    assert prices.current_version is None  # nothing of a refused answer was written


@pytest.mark.parametrize(("url", "words"), [
    ("http://127.0.0.1:{other}/prices", "is not on the installation's allowlist"),
    ("http://localhost:{port}/prices", "is not on the installation's allowlist"),
    ("http://169.254.169.254/latest/meta-data/", "is not on the installation's allowlist"),
    ("https://127.0.0.1:{port}/prices", "is not on the installation's allowlist"),
])
def test_a_url_off_the_allowlist_is_never_fetched(app: Flask, client: FlaskClient, tenant: Tenant, feed: FeedServer,
                                                  url: str, words: str) -> None:
    _put(client, tenant, _dag())
    run = _run_here(app, client, tenant, url.format(port=feed.port, other=feed.port + 1))
    [attempt] = run["tasks"][0]["attempts"]
    assert (run["status"], attempt["exit_reason"]) == ("failed", "url_not_allowed"), attempt
    assert words in attempt["error_message"]


def test_an_empty_allowlist_allows_nothing(app: Flask, client: FlaskClient, tenant: Tenant, feed: FeedServer,
                                           settings: Settings) -> None:
    app.config[SETTINGS_KEY] = replace(settings, http_ingest_allowlist=())
    _put(client, tenant, _dag())
    run = _run_here(app, client, tenant, f"{feed.url}/prices")
    assert run["tasks"][0]["attempts"][0]["exit_reason"] == "url_not_allowed"


def test_without_a_schema_the_first_answer_gives_the_dataset_its_columns(app: Flask, client: FlaskClient,
                                                                         tenant: Tenant, feed: FeedServer) -> None:
    dag = _dag()
    dag[0]["outputs"] = [{"dataset": "prices", "kind": "buffered"}]
    _put(client, tenant, dag)
    run = _run_here(app, client, tenant, f"{feed.url}/prices")
    assert run["status"] == "succeeded", run["tasks"][0]["attempts"]
    db.session.rollback()
    prices = datasets.get_dataset(tenant.org_id, "prices")
    assert [(column["name"], column["type"]) for column in prices.schema or ()] == [
        ("id", "int64"), ("symbol", "string"), ("usd", "float64"), ("extra", "string")]
    response = client.post("/v1/query", json={"sql": "SELECT extra FROM prices ORDER BY id"},
                           headers=tenant.headers("reader"))
    assert response.json is not None and response.json["rows"] == [{"extra": '{"ignored":true}'}, {"extra": None}]


def test_an_empty_feed_succeeds_and_makes_no_version(app: Flask, client: FlaskClient, tenant: Tenant,
                                                     feed: FeedServer) -> None:
    _put(client, tenant, _dag())
    run = _run_here(app, client, tenant, f"{feed.url}/empty")
    assert run["status"] == "succeeded", run["tasks"][0]["attempts"]
    assert run["tasks"][0]["attempts"][0]["result"]["records"] == 0
    db.session.rollback()
    assert datasets.get_dataset(tenant.org_id, "prices").current_version is None


def test_an_allowed_feed_publishes_in_this_process_too(app: Flask, client: FlaskClient, tenant: Tenant,
                                                       feed: FeedServer) -> None:
    _put(client, tenant, _dag())
    run = _run_here(app, client, tenant, f"{feed.url}/prices")
    assert (run["outcome"], run["status"]) == ("succeeded", "succeeded"), run["tasks"][0]["attempts"]
    assert [row["id"] for row in _rows(client, tenant)] == [1, 2]


# -- names that resolve inside ----------------------------------------------------------------------


def test_a_wildcard_name_that_resolves_to_loopback_is_refused(feed: FeedServer) -> None:
    """A DNS answer of 127.0.0.1 for a name the allowlist only matches by wildcard: refused before any
    connection. (The resolver here stands in for DNS; the server it would reach is real.)"""
    allowlist = http_feed.parse_allowlist([f"http://*.feeds.example:{feed.port}/"])
    for answer in (["127.0.0.1"], ["93.184.215.14", "127.0.0.1"], ["::ffff:169.254.169.254"]):
        def resolve(host: str, port: int, answer: list[str] = answer) -> list[str]:
            return answer

        with pytest.raises(FetchRefused) as refused:
            fetch(f"http://prices.feeds.example:{feed.port}/prices", allowlist, max_bytes=MAX_BYTES, timeout=2.0,
                  resolve=resolve)
        assert refused.value.reason == "address_not_allowed", refused.value.message
        assert "does not name this host itself" in refused.value.message


def test_an_entry_that_names_the_host_may_lead_to_an_internal_address(feed: FeedServer) -> None:
    allowlist = http_feed.parse_allowlist([f"http://prices.feeds.example:{feed.port}/"])
    fetched = fetch(f"http://prices.feeds.example:{feed.port}/prices", allowlist, max_bytes=MAX_BYTES, timeout=2.0,
                    resolve=lambda host, port: ["127.0.0.1"])
    assert fetched.status == 200 and json.loads(fetched.body)["data"]["items"][0]["id"] == 1


def test_the_connection_goes_to_the_address_that_was_checked(feed: FeedServer) -> None:
    """The name is resolved once: the request goes to the checked address whatever DNS says later
    (here the resolver answers once; a second lookup would fail the fetch)."""
    answers = iter([["127.0.0.1"]])
    allowlist = http_feed.parse_allowlist([f"http://prices.feeds.example:{feed.port}/"])
    fetched = fetch(f"http://prices.feeds.example:{feed.port}/prices", allowlist, max_bytes=MAX_BYTES, timeout=2.0,
                    resolve=lambda host, port: next(answers))
    assert fetched.status == 200


def test_a_resolver_that_never_answers_is_a_timeout(feed: FeedServer) -> None:
    """DNS is inside the fetch timeout too (this resolver answers only once the test is over)."""
    released = threading.Event()

    def never(host: str, port: int) -> list[str]:
        released.wait(30)
        return ["127.0.0.1"]

    allowlist = http_feed.parse_allowlist([f"http://prices.feeds.example:{feed.port}/"])
    try:
        with pytest.raises(FetchRefused) as refused:
            fetch(f"http://prices.feeds.example:{feed.port}/prices", allowlist, max_bytes=MAX_BYTES, timeout=0.5,
                  resolve=never)
    finally:
        released.set()
    assert (refused.value.reason, refused.value.retryable) == ("fetch_timeout", True), refused.value.message


def test_a_name_that_does_not_resolve_fails_the_fetch(feed: FeedServer) -> None:
    allowlist = http_feed.parse_allowlist(["http://no-such-host.invalid/"])
    with pytest.raises(FetchRefused) as refused:
        fetch("http://no-such-host.invalid/prices", allowlist, max_bytes=MAX_BYTES, timeout=30.0)
    assert (refused.value.reason, refused.value.retryable) == ("fetch_failed", True), refused.value.message
    assert "cannot resolve 'no-such-host.invalid'" in refused.value.message
