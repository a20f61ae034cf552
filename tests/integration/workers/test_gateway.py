"""The task gateway over a real unix socket and the public /v1/task/ routes, over real PostgreSQL.

Tasks and leases are made with tracecore's own functions (no worker): the gateway must tell a
current fence from a stale one exactly as the lease module does.
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import logging
import os
import socket
import stat
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import text

from tests.conftest import Tenant, wait_for
from tracecore.dags import catalog as dags
from tracecore.db.engine import db
from tracecore.execution import lease, runs, tokens
from tracecore.settings import current_settings
from tracecore.tenancy import orgs
from workers.gateway import TaskGateway

JOB_YAML = "- name: {name}\n  runtime: platform\n  operator: noop\n"


def _connect(path: Path, timeout: float = 10.0) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        if len(os.fsencode(path)) <= 107:
            sock.connect(str(path))
            return sock
        directory = os.open(path.parent, os.O_PATH | os.O_DIRECTORY)
        try:
            sock.connect(f"/proc/self/fd/{directory}/{path.name}")
        finally:
            os.close(directory)
    except OSError:
        sock.close()
        raise
    return sock


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: Path) -> None:
        super().__init__("gateway", timeout=10)
        self.path = path

    def connect(self) -> None:
        self.sock = _connect(self.path)


def call(sock_path: Path, method: str, path: str, token: str | None = None, body: bytes | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    connection = UnixHTTPConnection(sock_path)
    sent = dict(headers or {})
    if token is not None:
        sent["Authorization"] = f"Bearer {token}"
    try:
        connection.request(method, path, body=body, headers=sent)
        response = connection.getresponse()
        assert response.getheader("Content-Type") == "application/json"
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def raw_exchange(sock_path: Path, request: bytes) -> tuple[int, dict[str, Any]]:
    """Send bytes as they are (no body after the headers) and parse the one answer."""
    with _connect(sock_path) as sock:
        if request:
            sock.sendall(request)
        response = http.client.HTTPResponse(sock)
        response.begin()
        return response.status, json.loads(response.read())


def assert_error(answer: tuple[int, dict[str, Any]], status: int, code: str) -> None:
    assert answer[0] == status, answer
    error = answer[1]["error"]
    assert error["code"] == code and isinstance(error["message"], str) and error["message"], answer


@dataclasses.dataclass
class Made:
    task_id: uuid.UUID
    org_id: uuid.UUID


@pytest.fixture
def make_task(app: Flask) -> Callable[[], Made]:
    org = orgs.create_org("gateway-org")
    db.session.commit()
    counter = iter(range(1000))

    def make() -> Made:
        name = f"job{next(counter)}"
        dags.save_dag(org.id, f"dag-{name}", JOB_YAML.format(name=name), content_type="application/yaml",
                      user_id=None)
        _, task_id = runs.create_run(org_id=org.id, job_name=name, cause="manual", triggered_by=None)
        db.session.commit()
        return Made(task_id, org.id)

    return make


@pytest.fixture
def secret(app: Flask) -> bytes:
    return tokens.secret_key(current_settings(app))


@pytest.fixture
def leased(make_task: Callable[[], Made]) -> lease.Lease:
    made = make_task()
    taken = lease.take(made.task_id, "w", 60)
    assert taken is not None
    return taken


@pytest.fixture
def token(leased: lease.Lease, app: Flask, secret: bytes) -> str:
    return tokens.mint(tokens.for_lease(leased, current_settings(app)), secret)


@pytest.fixture
def gateway(app: Flask, leased: lease.Lease, secret: bytes, tmp_path: Path,
            caplog: pytest.LogCaptureFixture) -> Iterator[TaskGateway]:
    caplog.set_level(logging.DEBUG)
    folder = tmp_path / "run"
    folder.mkdir(mode=0o711)
    with TaskGateway(folder / "gateway.sock", app, leased.task_id, secret) as gw:
        yield gw


def test_whoami_answers_the_claims_and_a_current_fence(gateway: TaskGateway, leased: lease.Lease,
                                                       token: str) -> None:
    mode = os.stat(gateway.path).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o666
    status, body = call(gateway.path, "GET", "/v1/task/whoami", token)
    assert status == 200, body
    assert body["task_id"] == str(leased.task_id) and body["run_id"] == str(leased.run_id)
    assert body["org_id"] == str(leased.org_id) and body["job"] == leased.job_name
    assert (body["fence"], body["attempt"], body["fence_current"]) == (leased.fence, 1, True)
    assert body["output_prefix"] == f"outputs/{leased.org_id}/{leased.job_name}/{leased.run_id}/{leased.task_id}/"
    assert body["scratch_prefix"] == f"scratch/{leased.org_id}/{leased.task_id}/{leased.fence}/"
    assert body["inputs"] == [] and body["expires_at"] > time.time()
    assert token not in json.dumps(body)


def test_a_newer_lease_makes_the_old_token_stale(app: Flask, make_task: Callable[[], Made], secret: bytes,
                                                 tmp_path: Path) -> None:
    task_id = make_task().task_id
    first = lease.take(task_id, "w1", 1.0)
    assert first is not None
    old = tokens.mint(tokens.for_lease(first, current_settings(app)), secret)
    with TaskGateway(tmp_path / "gw.sock", app, task_id, secret) as gw:
        assert call(gw.path, "GET", "/v1/task/whoami", old)[1]["fence_current"] is True

        def expired() -> bool:
            db.session.rollback()
            return bool(db.session.execute(text("SELECT lease_expires_at < clock_timestamp() FROM tasks "
                                                "WHERE id = :id"), {"id": task_id}).scalar_one())

        wait_for(expired, timeout=10, message="the first lease to expire")
        # A token works only while its attempt holds the task (issue 11): a lapsed lease ends it...
        status, body = call(gw.path, "GET", "/v1/task/whoami", old)
        assert (status, body["error"]["code"], body["error"]["details"]["reason"]) == (
            401, "token_attempt_ended", "lease_expired")
        second = lease.take(task_id, "w2", 60)
        assert second is not None and second.fence == first.fence + 1
        new = tokens.mint(tokens.for_lease(second, current_settings(app)), secret)

        # ...and so does a newer lease.
        status, body = call(gw.path, "GET", "/v1/task/whoami", old)
        assert (status, body["error"]["code"], body["error"]["details"]["reason"]) == (
            401, "token_attempt_ended", "fence_moved")
        status, body = call(gw.path, "GET", "/v1/task/whoami", new)
        assert (status, body["fence"], body["fence_current"]) == (200, second.fence, True)


def test_missing_bad_and_expired_tokens_answer_401(gateway: TaskGateway, leased: lease.Lease, app: Flask,
                                                   token: str, secret: bytes) -> None:
    assert_error(call(gateway.path, "GET", "/v1/task/whoami"), 401, "missing_token")
    assert_error(call(gateway.path, "GET", "/v1/task/whoami", headers={"Authorization": f"Basic {token}"}),
                 401, "missing_token")
    assert_error(call(gateway.path, "GET", "/v1/task/whoami", "garbage"), 401, "invalid_token")
    assert_error(call(gateway.path, "GET", "/v1/task/whoami", token[:-2] + ("AA" if token[-2:] != "AA" else "BA")),
                 401, "bad_signature")
    other_key = tokens.mint(tokens.for_lease(leased, current_settings(app)), b"another key entirely")
    assert_error(call(gateway.path, "GET", "/v1/task/whoami", other_key), 401, "bad_signature")
    capability = tokens.for_lease(leased, current_settings(app))
    stale = tokens.mint(dataclasses.replace(capability, expires_at=int(time.time()) - 1), secret)
    assert_error(call(gateway.path, "GET", "/v1/task/whoami", stale), 401, "token_expired")


def test_a_token_for_another_task_answers_403(gateway: TaskGateway, make_task: Callable[[], Made], app: Flask,
                                              secret: bytes) -> None:
    other = lease.take(make_task().task_id, "w", 60)
    assert other is not None
    foreign = tokens.mint(tokens.for_lease(other, current_settings(app)), secret)
    assert_error(call(gateway.path, "GET", "/v1/task/whoami", foreign), 403, "wrong_task")


@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/v1/other"), ("GET", "/internal/x"), ("GET", "/v1/task/nope"), ("POST", "/v1/task/query-not-yet"),
    ("GET", "/v1/task/"), ("GET", "/v1/task/whoami/"), ("GET", "/v1/task/../runs"), ("GET", "/"),
    ("GET", "http://169.254.169.254/latest/meta-data/"), ("DELETE", "/v1/dags/x"),
])
def test_nothing_but_the_task_api_is_served(gateway: TaskGateway, token: str, method: str, path: str) -> None:
    assert_error(call(gateway.path, method, path, token), 404, "not_found")


def test_a_known_path_with_another_method_answers_405(gateway: TaskGateway, token: str) -> None:
    assert_error(call(gateway.path, "POST", "/v1/task/whoami", token, body=b"{}"), 405, "method_not_allowed")
    status, body = call(gateway.path, "GET", "/v1/task/whoami?debug=1", token)  # a query string changes nothing
    assert status == 200 and body["fence_current"] is True


def test_oversized_bodies_and_headers_are_refused(gateway: TaskGateway, token: str) -> None:
    big = b"x" * (8 * 1024 * 1024 + 1)
    assert_error(call(gateway.path, "POST", "/v1/task/whoami", token, body=big), 413, "payload_too_large")
    # Refused from the header alone, before any of the body is read.
    request = (f"POST /v1/task/whoami HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer {token}\r\n"
               f"Content-Length: {10 ** 12}\r\n\r\n").encode()
    assert_error(raw_exchange(gateway.path, request), 413, "payload_too_large")
    headers = "".join(f"X-Pad-{i}: {'y' * 1000}\r\n" for i in range(40))
    request = f"GET /v1/task/whoami HTTP/1.1\r\nHost: gateway\r\n{headers}\r\n".encode()
    assert_error(raw_exchange(gateway.path, request), 431, "request_header_fields_too_large")
    request = f"GET /v1/task/whoami?{'z' * 10_000} HTTP/1.1\r\nHost: gateway\r\n\r\n".encode()
    assert raw_exchange(gateway.path, request)[0] == 414
    request = b"POST /v1/task/whoami HTTP/1.1\r\nHost: gateway\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    assert_error(raw_exchange(gateway.path, request), 411, "length_required")
    assert call(gateway.path, "GET", "/v1/task/whoami", token)[0] == 200  # still serving


def test_one_connection_carries_several_requests(gateway: TaskGateway, token: str) -> None:
    connection = UnixHTTPConnection(gateway.path)
    try:
        for _ in range(3):
            connection.request("GET", "/v1/task/whoami", headers={"Authorization": f"Bearer {token}"})
            response = connection.getresponse()
            assert response.status == 200 and json.loads(response.read())["fence_current"] is True
    finally:
        connection.close()


def test_connections_beyond_the_cap_are_refused_and_idle_ones_time_out(app: Flask, leased: lease.Lease,
                                                                       secret: bytes, token: str,
                                                                       tmp_path: Path) -> None:
    with TaskGateway(tmp_path / "gw.sock", app, leased.task_id, secret, max_connections=2,
                     connection_timeout=0.5) as gw:
        idle = [_connect(gw.path), _connect(gw.path)]
        try:
            time.sleep(0.1)  # both are accepted and hold their slots
            assert_error(raw_exchange(gw.path, b""), 503, "gateway_busy")  # answered on connect
            for sock in idle:  # the idle timeout ends them and frees the slots
                assert sock.recv(1) == b""
        finally:
            for sock in idle:
                sock.close()
        wait_for(lambda: call(gw.path, "GET", "/v1/task/whoami", token)[0] == 200, timeout=5,
                 message="a free slot")


def test_the_socket_file_is_removed_on_exit_even_at_a_long_path(app: Flask, leased: lease.Lease, secret: bytes,
                                                                token: str, tmp_path: Path) -> None:
    folder = tmp_path / ("d" * 60) / ("e" * 60)
    folder.mkdir(parents=True)
    path = folder / "gateway.sock"
    assert len(os.fsencode(path)) > 108
    with TaskGateway(path, app, leased.task_id, secret) as gw:
        assert path.exists() and call(gw.path, "GET", "/v1/task/whoami", token)[0] == 200
    assert not path.exists()
    with pytest.raises(OSError):
        _connect(path)
    # A stale socket left at the path (a killed worker) is replaced; another kind of file is not.
    leftover = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    short = tmp_path / "stale.sock"
    leftover.bind(str(short))
    leftover.close()
    with TaskGateway(short, app, leased.task_id, secret) as gw:
        assert call(gw.path, "GET", "/v1/task/whoami", token)[0] == 200
    assert not short.exists()
    (tmp_path / "plain").write_text("not a socket")
    with pytest.raises(FileExistsError):
        TaskGateway(tmp_path / "plain", app, leased.task_id, secret).start()


def test_the_token_never_reaches_the_logs(gateway: TaskGateway, token: str,
                                          caplog: pytest.LogCaptureFixture) -> None:
    call(gateway.path, "GET", "/v1/task/whoami", token)
    call(gateway.path, "GET", f"/v1/task/whoami?token={token}", token)
    call(gateway.path, "GET", "/v1/task/nope", token)
    call(gateway.path, "GET", "/v1/task/whoami", token + "x")
    # http.server quotes a malformed request line in its own log message.
    assert raw_exchange(gateway.path, f"GET /v1/task/whoami?{token} extra HTTP/1.1\r\n\r\n".encode())[0] == 400
    gateway.stop()
    records = [r for r in caplog.records if r.name == "workers.gateway"]
    assert any("/v1/task/whoami -> 200" in r.getMessage() for r in records)
    assert any("Bad request syntax" in r.getMessage() and "trc1.[REDACTED]" in r.getMessage() for r in records)
    for record in caplog.records:
        assert token not in record.getMessage()
    assert token not in caplog.text


def test_the_public_api_serves_the_same_calls(client: FlaskClient, leased: lease.Lease, token: str,
                                              tenant: Tenant) -> None:
    response = client.get("/v1/task/whoami", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200, response.json
    assert response.json["task_id"] == str(leased.task_id) and response.json["fence_current"] is True
    response = client.get("/v1/task/whoami", headers=tenant.headers("admin"))  # a user's API token is no capability
    assert response.status_code == 401 and response.json["error"]["code"] == "invalid_token"
    response = client.get("/v1/task/whoami")
    assert response.status_code == 401 and response.json["error"]["code"] == "missing_token"
    response = client.get("/v1/task/nope", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 404 and response.json["error"]["code"] == "not_found"
    response = client.post("/v1/task/whoami", data=b"x" * (8 * 1024 * 1024 + 1),
                           headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 413 and response.json["error"]["code"] == "payload_too_large"
    # A capability token opens nothing outside /v1/task/.
    response = client.get("/v1/runs", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 401


def test_the_public_route_is_documented_with_the_capability_scheme(client: FlaskClient) -> None:
    spec = client.get("/v1/openapi.json").json
    assert spec["components"]["securitySchemes"]["capability"]["scheme"] == "bearer"
    operations = spec["paths"]["/v1/task/{rest}"]
    assert {"get", "post"} <= set(operations)
    assert operations["get"]["security"] == [{"capability": []}]
