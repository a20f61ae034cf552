"""The credential broker and the gateway's object routes, with real leases and minted capability tokens.

Requests go through :func:`tracecore.taskapi.calls.dispatch`, the function both transports call, and
one test goes through a real gateway socket. Local-store access is checked end to end (files on
disk). For S3 the broker calls STS ``AssumeRole``; STS is AWS itself and cannot run here, so
that call goes to moto's server (``ThreadedMotoServer`` on 127.0.0.1, a free port), the only
fake in this file. What moto recorded is read from moto's own backend in this process
(``moto.sts.models.sts_backends[<account of the role>]["aws"].assumed_roles``: the server thread
shares moto's backends): the role, the session name, the duration, and the session policy as
sent, which is compared with :func:`tracecore.infra.credentials.session_policy`. moto does not enforce
session policies, so the policy's effect is asserted on its exact statements instead.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import http.client
import json
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import text

from tracecore.dags import catalog as dags
from tracecore.db.engine import db
from tracecore.exceptions import PlatformError
from tracecore.execution import lease, runs, tokens
from tracecore.infra import storage
from tracecore.infra.credentials import (
    MAX_CHUNK_BYTES,
    MAX_POLICY_CHARS,
    prefixes_of,
    session_duration,
    session_name,
    session_policy,
)
from tracecore.infra.storage import object_store
from tracecore.settings import SETTINGS_KEY, current_settings
from tracecore.taskapi import calls as task_api
from tracecore.tenancy import orgs
from workers.gateway import TaskGateway

JOB_YAML = "- name: {name}\n  runtime: platform\n  operator: noop\n"
ACCOUNT = "123456789012"
ROLE_ARN = f"arn:aws:iam::{ACCOUNT}:role/trace-udf-data"
BUCKET = "trace-data"
STORE_PREFIX = "prod/eu"
Answer = tuple[int, dict[str, Any]]


def input_prefix(org_id: uuid.UUID, dataset: str, version: int) -> str:
    return f"datasets/{org_id}/{dataset}/v{version}/"


@dataclasses.dataclass
class Task:
    """One leased task and its minted token (inputs: two with a prefix, one without)."""

    lease: lease.Lease
    capability: tokens.Capability
    token: str
    secret: bytes

    def call(self, method: str, path: str, body: bytes = b"", token: str | None = None) -> Answer:
        headers = {"Authorization": f"Bearer {token or self.token}"}
        return task_api.dispatch(method, path, headers, body, self.secret, expected_task_id=self.lease.task_id)

    @property
    def inputs(self) -> list[str]:
        return [input_prefix(self.lease.org_id, "blocks", 3), input_prefix(self.lease.org_id, "prices", 7)]


@pytest.fixture
def make_leased(app: Flask) -> Callable[[], lease.Lease]:
    org = orgs.create_org("broker-org")
    db.session.commit()
    counter = iter(range(1000))

    def make() -> lease.Lease:
        name = f"job{next(counter)}"
        dags.save_dag(org.id, f"dag-{name}", JOB_YAML.format(name=name), content_type="application/yaml",
                      user_id=None)
        _, task_id = runs.create_run(org_id=org.id, job_name=name, cause="manual", triggered_by=None)
        db.session.commit()
        taken = lease.take(task_id, "w", 60)
        assert taken is not None
        return taken

    return make


def mint(app: Flask, leased: lease.Lease, **changes: Any) -> Task:
    secret = tokens.secret_key(current_settings(app))
    org = leased.org_id
    inputs = [{"dataset": "blocks", "version": 3, "prefix": input_prefix(org, "blocks", 3)},
              {"dataset": "prices", "version": 7, "prefix": input_prefix(org, "prices", 7).rstrip("/")},
              {"dataset": "labels", "version": 1}]  # no prefix: Query Service only
    capability = dataclasses.replace(tokens.for_lease(leased, current_settings(app), inputs=inputs), **changes)
    return Task(leased, capability, tokens.mint(capability, secret), secret)


@pytest.fixture
def task(app: Flask, make_leased: Callable[[], lease.Lease]) -> Task:
    return mint(app, make_leased())


def assert_error(answer: Answer, status: int, code: str) -> None:
    assert answer[0] == status, answer
    assert answer[1]["error"]["code"] == code, answer


def objects(key: str) -> str:
    return f"/v1/task/objects/{key}"


# --- local store: the gateway serves the prefixes -------------------------------------------------


def test_local_credentials_name_the_prefixes(task: Task) -> None:
    status, body = task.call("POST", "/v1/task/credentials", b"{}")
    assert status == 200, body
    assert body == {"provider": "local", "objects_path": "/v1/task/objects/", "expiration": body["expiration"],
                    "prefixes": {"inputs": task.inputs, "output": task.capability.output_prefix,
                                 "scratch": task.capability.scratch_prefix}}
    assert body["expiration"].endswith("Z")
    assert datetime.fromisoformat(body["expiration"]).timestamp() == task.capability.expires_at


def test_local_put_and_get_under_the_task_prefixes(task: Task, app: Flask) -> None:
    store = object_store(current_settings(app))
    output, scratch = task.capability.output_prefix, task.capability.scratch_prefix
    for key, data in ((f"{output}part-0.parquet", b"PAR1 rows PAR1"), (f"{scratch}tmp/x.bin", bytes(range(256)))):
        status, body = task.call("PUT", objects(key), data)
        assert status == 201, body
        assert body == {"key": key, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        assert store.get(key) == data  # on disk, in the store the platform reads
        status, body = task.call("GET", objects(key))  # reading back one's own output is allowed
        assert status == 200 and base64.b64decode(body["data_base64"]) == data and body["next_offset"] is None
    # Inputs are readable, whichever way the claim spelled the prefix (with or without its '/').
    for prefix in task.inputs:
        store.put(f"{prefix}part-00000.parquet", b"input " + prefix.encode())
        status, body = task.call("GET", objects(f"{prefix}part-00000.parquet"))
        assert status == 200, body
        assert base64.b64decode(body["data_base64"]) == b"input " + prefix.encode()
    assert_error(task.call("GET", objects(f"{task.inputs[0]}missing.parquet")), 404, "not_found")


def test_local_access_outside_the_prefixes_is_denied(task: Task, app: Flask,
                                                     make_leased: Callable[[], lease.Lease]) -> None:
    store = object_store(current_settings(app))
    other = mint(app, make_leased())
    secret_key = f"{other.capability.output_prefix}theirs.parquet"
    store.put(secret_key, b"another task's output")
    org = task.lease.org_id
    denied_reads = [secret_key, f"datasets/{org}/labels/v1/part-0.parquet",  # an input without a prefix
                    f"datasets/{org}/blocks/v30/part-0.parquet",  # v3/ does not open v30/
                    f"bundles/{org}/abc.zip", "secret-key", f"{task.capability.output_prefix.rstrip('/')}x/y"]
    for key in denied_reads:
        assert_error(task.call("GET", objects(key)), 403, "prefix_denied")
    denied_writes = [f"{task.inputs[0]}part-0.parquet", secret_key, f"bundles/{org}/abc.zip",
                     f"outputs/{org}/x", f"{task.capability.scratch_prefix.rstrip('/')}-evil/x"]
    for key in denied_writes:
        assert_error(task.call("PUT", objects(key), b"overwrite"), 403, "prefix_denied")
    assert store.get(secret_key) == b"another task's output"
    assert not store.exists(f"{task.inputs[0]}part-0.parquet")


@pytest.mark.parametrize("rest", [
    "", "/etc/passwd", "outputs/../../etc/passwd", "{output}../../../secret-key", "{output}./x", "{output}a//b",
    "{output}%2e%2e/%2e%2e/x", "%2Fetc%2Fpasswd", "{output}a%00b", "{output}a%252e", "{output}a\\b", "{output}%ff",
])
def test_traversal_and_malformed_keys_answer_400(task: Task, app: Flask, rest: str) -> None:
    path = objects(rest.format(output=task.capability.output_prefix))
    for method in ("GET", "PUT"):
        assert_error(task.call(method, path, b"x"), 400, "invalid_key")
    assert not (current_settings(app).home_path / "objects" / "secret-key").exists()


def test_percent_encoded_keys_resolve_once(task: Task) -> None:
    key = f"{task.capability.output_prefix}dir/file name.txt"
    encoded = objects(key.replace(" ", "%20").replace("dir/", "dir%2F"))
    assert task.call("PUT", encoded, b"spaced")[0] == 201
    status, body = task.call("GET", objects(key))
    assert status == 200 and body["key"] == key and base64.b64decode(body["data_base64"]) == b"spaced"


def test_large_objects_are_read_in_bounded_chunks(task: Task, app: Flask) -> None:
    key = f"{task.inputs[1]}big.bin"
    data = bytes(range(256)) * (MAX_CHUNK_BYTES // 256 + 1000)  # just over one chunk
    object_store(current_settings(app)).put(key, data)
    status, first = task.call("GET", objects(key))
    assert status == 200 and first["length"] == MAX_CHUNK_BYTES and first["next_offset"] == MAX_CHUNK_BYTES
    assert len(json.dumps(first)) <= task_api.MAX_BODY_BYTES  # the answer keeps the body limit
    status, rest = task.call("GET", objects(key) + f"?offset={first['next_offset']}")
    assert status == 200 and rest["next_offset"] is None
    assert base64.b64decode(first["data_base64"]) + base64.b64decode(rest["data_base64"]) == data
    status, middle = task.call("GET", objects(key) + "?offset=10&length=5")
    assert status == 200 and base64.b64decode(middle["data_base64"]) == data[10:15] and middle["next_offset"] == 15
    status, past = task.call("GET", objects(key) + f"?offset={len(data) + 5}")
    assert status == 200 and past["length"] == 0 and past["next_offset"] is None
    for query in ("offset=-1", "length=0", f"length={MAX_CHUNK_BYTES + 1}", "offset=x"):
        assert_error(task.call("GET", objects(key) + "?" + query), 400, "invalid_range")


def test_bodies_are_bounded_and_other_methods_refused(task: Task, app: Flask) -> None:
    key = f"{task.capability.output_prefix}too-big.bin"
    assert_error(task.call("PUT", objects(key), b"x" * (task_api.MAX_BODY_BYTES + 1)), 413, "payload_too_large")
    assert not object_store(current_settings(app)).exists(key)
    exactly = b"y" * task_api.MAX_BODY_BYTES
    assert task.call("PUT", objects(key), exactly)[0] == 201
    for method in ("POST", "DELETE", "PATCH"):
        assert_error(task.call(method, objects(key)), 405, "method_not_allowed")
    assert_error(task.call("GET", "/v1/task/objects"), 404, "not_found")
    assert_error(task_api.dispatch("GET", objects(key), {}, b"", task.secret), 401, "missing_token")


def test_a_stale_fence_gets_no_credentials_and_writes_nothing(app: Flask, make_leased: Callable[[], lease.Lease]
                                                              ) -> None:
    leased = make_leased()
    old = mint(app, leased)
    key = f"{old.capability.output_prefix}zombie.parquet"
    db.session.execute(text("UPDATE tasks SET lease_expires_at = now() - interval '1 second' WHERE id = :id"),
                       {"id": leased.task_id})
    db.session.commit()
    newer = lease.take(leased.task_id, "w2", 60)
    assert newer is not None and newer.fence == leased.fence + 1
    # A token ends with its attempt (issue 11): the zombie's token no longer works at all.
    assert_error(old.call("POST", "/v1/task/credentials"), 401, "token_attempt_ended")
    assert_error(old.call("PUT", objects(key), b"late"), 401, "token_attempt_ended")
    assert not object_store(current_settings(app)).exists(key)
    current = mint(app, newer)
    assert current.call("PUT", objects(key), b"current")[0] == 201
    assert current.call("GET", objects(key))[0] == 200
    assert_error(old.call("GET", objects(key)), 401, "token_attempt_ended")


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: Path) -> None:
        super().__init__("gateway", timeout=30)
        self.socket_path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect(str(self.socket_path))


def test_objects_through_a_real_gateway_socket(task: Task, app: Flask, tmp_path: Path) -> None:
    """The gateway carries PUT and raw (non-JSON) bodies to the prefix routes unchanged."""
    data = bytes(range(256)) * 4096  # 1 MiB, not JSON, not UTF-8
    key = f"{task.capability.output_prefix}through-socket.bin"
    with TaskGateway(tmp_path / "gw.sock", app, task.lease.task_id, task.secret) as gateway:
        def request(method: str, path: str, body: bytes | None = None) -> Answer:
            connection = UnixHTTPConnection(gateway.path)
            try:
                connection.request(method, path, body=body, headers={"Authorization": f"Bearer {task.token}"})
                response = connection.getresponse()
                return response.status, json.loads(response.read())
            finally:
                connection.close()

        status, body = request("PUT", objects(key), data)
        assert status == 201 and body["sha256"] == hashlib.sha256(data).hexdigest(), body
        status, body = request("GET", objects(key))
        assert status == 200 and base64.b64decode(body["data_base64"]) == data
        assert_error(request("PUT", objects("bundles/x.zip"), b"x"), 403, "prefix_denied")
        assert_error(request("GET", objects(f"{task.capability.output_prefix}../../x")), 400, "invalid_key")
        assert request("POST", "/v1/task/credentials", b"{}")[1]["provider"] == "local"


# --- S3: the session policy ------------------------------------------------------------------------


def test_the_session_policy_names_exactly_the_prefixes(task: Task) -> None:
    output, scratch = task.capability.output_prefix, task.capability.scratch_prefix
    blocks, prices = task.inputs
    arn = f"arn:aws:s3:::{BUCKET}"
    assert session_policy(BUCKET, STORE_PREFIX, task.capability) == {
        "Version": "2012-10-17",
        "Statement": [
            {"Sid": "ReadInputs", "Effect": "Allow", "Action": ["s3:GetObject"],
             "Resource": [f"{arn}/prod/eu/{blocks}*", f"{arn}/prod/eu/{prices}*"]},
            {"Sid": "WriteOutputs", "Effect": "Allow", "Action": ["s3:PutObject"],
             "Resource": [f"{arn}/prod/eu/{output}*", f"{arn}/prod/eu/{scratch}*"]},
            {"Sid": "ListPrefixes", "Effect": "Allow", "Action": ["s3:ListBucket"], "Resource": [arn],
             "Condition": {"StringLike": {"s3:prefix": [f"prod/eu/{blocks}*", f"prod/eu/{prices}*",
                                                        f"prod/eu/{output}*", f"prod/eu/{scratch}*"]}}},
        ]}
    # Every prefix is a folder: "v7" in the claim becomes "v7/", so it never opens "v70/".
    assert prices.endswith("/v7/")
    # No store prefix: the keys are the bucket's own; another partition changes only the ARNs.
    bare = session_policy(BUCKET, "", task.capability, partition="aws-cn")
    assert bare["Statement"][1]["Resource"] == [f"arn:aws-cn:s3:::{BUCKET}/{output}*",
                                                f"arn:aws-cn:s3:::{BUCKET}/{scratch}*"]
    # Nothing but the three statements, and only Allow: the rest is denied by the session policy itself.
    actions = {action for statement in bare["Statement"] for action in statement["Action"]}
    assert actions == {"s3:GetObject", "s3:PutObject", "s3:ListBucket"}
    assert {statement["Effect"] for statement in bare["Statement"]} == {"Allow"}


def test_a_capability_without_inputs_gets_no_read_statement(task: Task) -> None:
    capability = dataclasses.replace(task.capability, inputs=({"dataset": "x", "version": 1},))
    statements = session_policy(BUCKET, "", capability)["Statement"]
    assert [statement["Sid"] for statement in statements] == ["WriteOutputs", "ListPrefixes"]


@pytest.mark.parametrize("prefix", ["*", "datasets/*/x/", "../escape/", "/absolute/", "a//b/", "${aws:username}/",
                                    "a?b/", ""])
def test_unusable_prefixes_in_a_capability_are_refused(task: Task, prefix: str) -> None:
    capability = dataclasses.replace(task.capability, inputs=({"dataset": "x", "version": 1, "prefix": prefix},))
    with pytest.raises(PlatformError) as refused:
        session_policy(BUCKET, "", capability)
    assert refused.value.code == "bad_prefix"


def test_session_duration_follows_the_token_within_sts_bounds(task: Task) -> None:
    now = 1_000_000.0
    for remaining, expected in ((60, 900), (899, 900), (1800, 1800), (3600, 3600), (86_400, 3600)):
        capability = dataclasses.replace(task.capability, expires_at=int(now) + remaining)
        assert session_duration(capability, now) == expected
    assert session_name(task.capability) == f"trace-{task.lease.task_id}-{task.lease.fence}"


# --- S3: STS AssumeRole against moto's server ------------------------------------------------------


@pytest.fixture(scope="module")
def sts_endpoint() -> Iterator[str]:
    """moto's server on a free loopback port, with dummy credentials in the standard chain."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    with pytest.MonkeyPatch.context() as patch:
        for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                            "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": "/nonexistent/aws-config",
                            "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials"}.items():
            patch.setenv(name, value)
        patch.delenv("AWS_SESSION_TOKEN", raising=False)
        storage.reset_clients()
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        try:
            yield f"http://{host}:{port}"
        finally:
            server.stop()
            storage.reset_clients()


@pytest.fixture
def s3_app(app: Flask, sts_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Flask:
    """The app configured for an S3 store and the broker's role, STS at moto."""
    settings = dataclasses.replace(current_settings(app), object_store=f"s3://{BUCKET}/{STORE_PREFIX}",
                                   s3_endpoint="http://s3.internal.example:9000", s3_region="us-east-1",
                                   credentials_role_arn=ROLE_ARN, sts_endpoint=sts_endpoint)
    monkeypatch.setitem(app.config, SETTINGS_KEY, settings)
    return app


def recorded_roles() -> list[Any]:
    from moto.sts.models import sts_backends

    return list(sts_backends[ACCOUNT]["aws"].assumed_roles)


def test_s3_credentials_come_from_assume_role_with_the_session_policy(s3_app: Flask, task: Task) -> None:
    before = len(recorded_roles())
    started = time.time()
    status, body = task.call("POST", "/v1/task/credentials", b"{}")
    assert status == 200, body
    base = f"{STORE_PREFIX}/"
    assert body["provider"] == "s3" and body["bucket"] == BUCKET and body["region"] == "us-east-1"
    assert body["endpoint_url"] == "http://s3.internal.example:9000"
    assert body["prefixes"] == {"inputs": [base + prefix for prefix in task.inputs],
                                "output": base + task.capability.output_prefix,
                                "scratch": base + task.capability.scratch_prefix}
    assert body["access_key_id"] and body["secret_access_key"] and body["session_token"]
    assert body["access_key_id"] != "testing"  # not the broker's own credentials
    # What moto recorded of the AssumeRole call.
    roles = recorded_roles()
    assert len(roles) == before + 1
    role = roles[-1]
    assert role.role_arn == ROLE_ARN and role.access_key_id == body["access_key_id"]
    assert role.session_name == f"trace-{task.lease.task_id}-{task.lease.fence}"
    assert json.loads(role.policy) == session_policy(BUCKET, STORE_PREFIX, task.capability)
    # The token lives the job's timeout plus a lease TTL (63 s here): STS's floor of 900 s applies.
    expiration = datetime.fromisoformat(body["expiration"]).timestamp()
    assert started + 900 - 5 <= expiration <= time.time() + 900 + 5
    assert role.expiration.timestamp() == pytest.approx(expiration, abs=1)


def test_s3_credentials_follow_a_long_lived_token(s3_app: Flask, app: Flask,
                                                  make_leased: Callable[[], lease.Lease]) -> None:
    long_lived = mint(app, make_leased(), expires_at=int(time.time()) + 2 * 3600)
    status, body = long_lived.call("POST", "/v1/task/credentials")
    assert status == 200, body
    assert datetime.fromisoformat(body["expiration"]).timestamp() == pytest.approx(time.time() + 3600, abs=10)


def test_the_broker_without_a_role_or_with_too_many_inputs_refuses(s3_app: Flask, app: Flask, task: Task,
                                                                   make_leased: Callable[[], lease.Lease],
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    before = len(recorded_roles())
    many = [{"dataset": f"d{i}", "version": 1, "prefix": f"datasets/{task.lease.org_id}/d{i}/v1/"}
            for i in range(40)]
    crowded = mint(app, make_leased(), inputs=tuple(many))
    assert len(json.dumps(session_policy(BUCKET, STORE_PREFIX, crowded.capability))) > MAX_POLICY_CHARS
    assert_error(crowded.call("POST", "/v1/task/credentials"), 422, "session_policy_too_large")
    monkeypatch.setitem(app.config, SETTINGS_KEY,
                        dataclasses.replace(current_settings(app), credentials_role_arn=None))
    assert_error(task.call("POST", "/v1/task/credentials"), 503, "broker_not_configured")
    assert len(recorded_roles()) == before  # nothing was asked of STS


def test_an_sts_failure_answers_502_without_secrets(s3_app: Flask, app: Flask, task: Task,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(app.config, SETTINGS_KEY,
                        dataclasses.replace(current_settings(app), sts_endpoint="http://127.0.0.1:9"))
    status, body = task.call("POST", "/v1/task/credentials")
    assert_error((status, body), 502, "sts_failed")
    assert "testing" not in json.dumps(body)


def test_prefixes_of_reads_the_capability(task: Task) -> None:
    prefixes = prefixes_of(task.capability)
    assert prefixes.inputs == tuple(task.inputs)
    assert prefixes.writable == (task.capability.output_prefix, task.capability.scratch_prefix)
    assert prefixes.readable == (*task.inputs, task.capability.output_prefix, task.capability.scratch_prefix)

