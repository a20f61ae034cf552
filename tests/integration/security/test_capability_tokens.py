"""Issue 11, class 3: a capability token ends with its attempt, and never reaches stored text.

Two halves, over real PostgreSQL, the local object store, the real unix-socket gateway, the
public ``/v1/task/`` routes and (for the end-to-end leaks) a real worker running real Docker
sandboxes:

- Lifecycle: a token works only while its attempt is the task's live one. After success,
  failure, dead-lettering, a lapsed lease, the reaper, a newer lease or a refused (fenced) write,
  every task API call (whoami, query, buffer-publish, objects) answers 401
  ``token_attempt_ended``, over the HTTP route and over the gateway (and the Celery publish).
  Forged and altered tokens are refused with their own codes; a live token of org A reads and
  writes nothing of org B.
- Redaction: whatever a handler does with ``TRACE_CAPABILITY_TOKEN`` (returns it, nests it, uses
  it as a key, raises it, prints it, puts it in its traceback's file name, returns it in rows),
  neither the token nor its signature is in the attempt, the logs or the dataset, and the leaked
  token no longer works once the run is over.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import re
import uuid
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select, text

from tests.conftest import Processes, Tenant, wait_for
from tests.integration.workers.test_gateway import call
from tracecore.data import publish
from tracecore.db.engine import db
from tracecore.exceptions import StaleFence
from tracecore.execution import lease, redaction, runs, tokens
from tracecore.infra.storage import object_store
from tracecore.settings import Settings, current_settings
from workers.gateway import TaskGateway
from workers.operators import udf
from workers.sandbox import Outcome

SCHEMA = [{"name": "k", "type": "string", "nullable": False}, {"name": "v", "type": "string"}]
SHAPE = re.compile(r"trc1\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+|trc_[A-Za-z0-9_-]{20,}")


def _dag(extra: dict[str, Any] | None = None) -> str:
    job = {"name": "emit", "runtime": "platform", "operator": "noop", "unique_key": ["k"],
           "outputs": [{"dataset": "leaks", "kind": "buffered", "schema": SCHEMA}], **(extra or {})}
    return json.dumps([job])


def _apply(client: FlaskClient, tenant: Tenant, body: str, name: str = "tokens") -> None:
    response = client.put(f"/v1/dags/{name}", data=body,
                          headers={**tenant.headers("writer"), "Content-Type": "application/json"})
    assert response.status_code == 200, response.json


@pytest.fixture
def emitting(client: FlaskClient, tenant: Tenant) -> Tenant:
    _apply(client, tenant, _dag())
    return tenant


@pytest.fixture
def secret(app: Flask) -> bytes:
    return tokens.secret_key(current_settings(app))


Leased = tuple[lease.Lease, tokens.Capability]


@pytest.fixture
def lease_emit(app: Flask, emitting: Tenant) -> Callable[..., Leased]:
    """A fresh run of ``emit``, leased as a worker would; answers the lease and its capability."""

    def make(org_id: uuid.UUID | None = None, ttl: float = 60.0) -> Leased:
        _, task_id = runs.create_run(org_id=org_id or emitting.org_id, job_name="emit", cause="manual",
                                     triggered_by=None)
        db.session.commit()
        held = lease.take(task_id, "test-worker", ttl)
        assert isinstance(held, lease.Lease)
        inputs = publish.pinned_inputs(held.org_id, held.job_spec)
        db.session.rollback()
        return held, tokens.for_lease(held, current_settings(app), inputs=inputs)

    return make


def _expire(held: lease.Lease) -> None:
    db.session.execute(text("UPDATE tasks SET lease_expires_at = now() - interval '1 second' WHERE id = :id"),
                       {"id": held.task_id})
    db.session.commit()


class Caller:
    """One transport of the task API: the public HTTP route or the task's own gateway socket."""

    def __init__(self, kind: str, client: FlaskClient, socket_path: Path | None) -> None:
        self.kind, self.client, self.socket_path = kind, client, socket_path

    def __call__(self, method: str, path: str, token: str, body: Any = None) -> tuple[int, dict[str, Any]]:
        data = None if body is None else json.dumps(body).encode()
        if self.kind == "gateway":
            assert self.socket_path is not None
            headers = {"Content-Type": "application/json"} if data is not None else None
            return call(self.socket_path, method, path, token, data, headers=headers)
        response = self.client.open(path, method=method, data=data, content_type="application/json",
                                    headers={"Authorization": f"Bearer {token}"})
        return response.status_code, response.json


@pytest.fixture
def transport(request: pytest.FixtureRequest, app: Flask, client: FlaskClient, secret: bytes,
              tmp_path: Path) -> Iterator[Callable[[lease.Lease], Caller]]:
    """``transport(held)``: a caller for the task of ``held`` over the parametrised transport."""
    gateways: list[TaskGateway] = []

    def make(held: lease.Lease) -> Caller:
        if request.param == "http":
            return Caller("http", client, None)
        folder = tmp_path / f"gw{len(gateways)}"
        folder.mkdir()
        gateway = TaskGateway(folder / "gateway.sock", app, held.task_id, secret).start()
        gateways.append(gateway)
        return Caller("gateway", client, gateway.path)

    yield make
    for gateway in gateways:
        gateway.stop()


def _assert_ended(answer: tuple[int, dict[str, Any]], reason: str | None = None) -> None:
    status, body = answer
    assert status == 401, answer
    assert body["error"]["code"] == "token_attempt_ended" and body["error"]["message"], answer
    if reason is not None:
        assert body["error"]["details"]["reason"] == reason, answer


# -- the lifecycle: a token stops working when its attempt ends ----------------------------------

def _end_succeeded(held: lease.Lease) -> None:
    lease.succeed(held, {"done": True})


def _end_failed_retrying(held: lease.Lease) -> None:
    assert lease.fail(held, lease.Failure("error", "E", "boom"), base_delay=60, max_delay=60) is not None


def _end_dead_lettered(held: lease.Lease) -> None:
    assert lease.fail(held, lease.Failure("error", "E", "boom", retryable=False), base_delay=1, max_delay=1) is None


def _end_lease_expired(held: lease.Lease) -> None:
    _expire(held)


def _end_reaped(held: lease.Lease) -> None:
    _expire(held)
    lease.reap(3600)


def _end_fence_moved(held: lease.Lease) -> None:
    _expire(held)
    newer = lease.take(held.task_id, "other-worker", 60)
    assert isinstance(newer, lease.Lease) and newer.fence == held.fence + 1


def _end_fenced(held: lease.Lease) -> None:
    _expire(held)
    with pytest.raises(StaleFence):
        lease.renew(held, 60)  # a zombie's heartbeat: refused, its attempt recorded as fenced


ENDINGS: dict[str, tuple[Callable[[lease.Lease], None], str]] = {
    "succeeded": (_end_succeeded, "attempt_closed"),
    "failed_retrying": (_end_failed_retrying, "attempt_closed"),
    "dead_lettered": (_end_dead_lettered, "attempt_closed"),
    "lease_expired": (_end_lease_expired, "lease_expired"),
    "reaped": (_end_reaped, "attempt_closed"),
    "fence_moved": (_end_fence_moved, "fence_moved"),
    "fenced": (_end_fenced, "attempt_closed"),
}


def _route_call(route: str, capability: tokens.Capability) -> tuple[str, str, Any, set[int]]:
    """(method, path, body, statuses a live token may get) of one task API route."""
    if route == "whoami":
        return "GET", "/v1/task/whoami", None, {200}
    if route == "query":
        return "POST", "/v1/task/query", {"sql": "SELECT 1 AS one"}, {200}
    if route == "publish":
        return "POST", "/v1/task/buffer-publish", {"rows": [{"k": uuid.uuid4().hex, "v": "x"}]}, {200}
    return "GET", f"/v1/task/objects/{capability.output_prefix}nothing-here", None, {404}


@pytest.mark.parametrize("transport", ["http", "gateway"], indirect=True)
@pytest.mark.parametrize("route", ["whoami", "query", "publish", "objects"])
@pytest.mark.parametrize("ending", sorted(ENDINGS))
def test_a_token_stops_working_when_its_attempt_ends(lease_emit: Callable[..., Leased], secret: bytes,
                                                     transport: Callable[[lease.Lease], Caller], route: str,
                                                     ending: str) -> None:
    held, capability = lease_emit()
    token = tokens.mint(capability, secret)
    caller = transport(held)
    method, path, body, live_statuses = _route_call(route, capability)
    live = caller(method, path, token, body)
    assert live[0] in live_statuses, live  # the control: the same call works while the attempt lives
    end, reason = ENDINGS[ending]
    end(held)
    db.session.rollback()
    _assert_ended(caller(method, path, token, body), reason)
    # Still refused on a second try (nothing about the first refusal revived it).
    _assert_ended(caller(method, path, token, body), reason)


@pytest.mark.parametrize("ending", sorted(ENDINGS))
def test_the_celery_publish_refuses_an_ended_token(app: Flask, lease_emit: Callable[..., Leased], secret: bytes,
                                                   ending: str) -> None:
    held, capability = lease_emit()
    token = tokens.mint(capability, secret)
    store = object_store(current_settings(app))
    manifest = _manifest(store, capability)
    end, reason = ENDINGS[ending]
    end(held)
    db.session.rollback()
    answer = publish.publish_with_token(token, manifest, current_settings(app))
    assert answer["status"] == 401 and answer["error"]["code"] == "token_attempt_ended", answer
    assert answer["error"]["details"]["reason"] == reason
    assert _rows("leaks", held.org_id) == []


def _manifest(store: Any, capability: tokens.Capability) -> dict[str, Any]:
    from tracecore.data.batches import encode, rows_table
    from tracecore.data.schema import normalize_schema, schema_fingerprint

    columns = normalize_schema(SCHEMA)
    data, digest = encode(rows_table([{"k": "late", "v": "zombie"}], columns, ["k"]))
    key = f"{capability.output_prefix}batches/leaks/{digest}.parquet"
    store.put(key, data)
    return {"dataset": "leaks", "schema_fingerprint": schema_fingerprint(columns), "row_count": 1, "sha256": digest,
            "key": key, "task_id": capability.task_id, "fence": capability.fence}


def _rows(dataset: str, org_id: uuid.UUID) -> list[tuple[Any, ...]]:
    from tracecore.data import datasets

    db.session.rollback()
    table = datasets.hot_table_name(datasets.get_dataset(org_id, dataset))
    return [tuple(row) for row in db.session.execute(text(f'SELECT k, v FROM "{table}" ORDER BY 1'))]


def test_a_retry_gets_a_new_token_and_only_the_new_one_works(
        lease_emit: Callable[..., Leased], secret: bytes, app: Flask, client: FlaskClient) -> None:
    held, capability = lease_emit()
    first = tokens.mint(capability, secret)
    assert lease.fail(held, lease.Failure("error", "E", "boom"), base_delay=0.0, max_delay=0.0) is not None
    db.session.execute(text("UPDATE tasks SET next_attempt_at = now() WHERE id = :id"), {"id": held.task_id})
    db.session.commit()
    retry = lease.take(held.task_id, "w2", 60)
    assert isinstance(retry, lease.Lease) and retry.attempt_number == 2
    second = tokens.mint(tokens.for_lease(retry, current_settings(app)), secret)
    caller = Caller("http", client, None)
    _assert_ended(caller("GET", "/v1/task/whoami", first), "fence_moved")
    assert caller("GET", "/v1/task/whoami", second)[0] == 200


# -- forged and altered tokens -----------------------------------------------------------------

def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _with_claims(token: str, **changes: Any) -> str:
    """The token with its claims changed and its signature kept (an attacker without the key)."""
    prefix, claims, signature = token.split(".")
    decoded = json.loads(base64.urlsafe_b64decode(claims + "=" * (-len(claims) % 4)))
    return f"{prefix}.{_b64(json.dumps({**decoded, **changes}, separators=(',', ':')).encode())}.{signature}"


def _forge(kind: str, capability: tokens.Capability, secret: bytes, other: tokens.Capability,
           api_token: str) -> str:
    token = tokens.mint(capability, secret)
    signed = lambda **changes: tokens.mint(dataclasses.replace(capability, **changes), secret)  # noqa: E731
    return {
        "claims_fence_changed": lambda: _with_claims(token, fence=capability.fence + 1),
        "claims_task_changed": lambda: _with_claims(token, task_id=other.task_id),
        "claims_expiry_extended": lambda: _with_claims(token, expires_at=capability.expires_at + 86400),
        "another_key": lambda: tokens.mint(capability, b"an attacker's own key, not the platform's"),
        "signature_of_another_token": lambda: ".".join(
            [*token.split(".")[:2], tokens.mint(other, secret).split(".")[2]]),
        "truncated_signature": lambda: token[:-3],
        "extra_part": lambda: token + ".x",
        "expired": lambda: signed(expires_at=capability.issued_at - 1),
        "older_fence": lambda: signed(fence=capability.fence - 1),
        "future_fence": lambda: signed(fence=capability.fence + 1),
        "another_org": lambda: signed(org_id=other.org_id),
        "another_run": lambda: signed(run_id=other.run_id),
        "unknown_task": lambda: signed(task_id=str(uuid.uuid4())),
        "api_token": lambda: api_token,
    }[kind]()


FORGERIES: dict[str, tuple[str, str | None]] = {
    "claims_fence_changed": ("bad_signature", None),
    "claims_task_changed": ("bad_signature", None),
    "claims_expiry_extended": ("bad_signature", None),
    "another_key": ("bad_signature", None),
    "signature_of_another_token": ("bad_signature", None),
    "truncated_signature": ("*", None),  # not canonical base64url, or a short signature: refused either way
    "extra_part": ("invalid_token", None),
    "expired": ("token_expired", None),
    "older_fence": ("token_attempt_ended", "fence_moved"),
    "future_fence": ("token_attempt_ended", "fence_moved"),
    "another_org": ("token_attempt_ended", "unknown_task"),
    "another_run": ("token_attempt_ended", "unknown_task"),
    "unknown_task": ("token_attempt_ended", "unknown_task"),
    "api_token": ("invalid_token", None),
}


@pytest.mark.parametrize("transport", ["http", "gateway"], indirect=True)
@pytest.mark.parametrize("forgery", sorted(FORGERIES))
def test_forged_and_altered_tokens_are_refused(lease_emit: Callable[..., Leased], secret: bytes, make_tenant: Any,
                                               emitting: Tenant, transport: Callable[[lease.Lease], Caller],
                                               forgery: str) -> None:
    held, capability = lease_emit()
    other_tenant = make_tenant("other")
    _, other_task = runs.create_run(org_id=emitting.org_id, job_name="emit", cause="manual", triggered_by=None)
    db.session.commit()
    other = dataclasses.replace(capability, task_id=str(other_task), org_id=str(other_tenant.org_id),
                                run_id=str(uuid.uuid4()))
    forged = _forge(forgery, capability, secret, other, emitting.tokens["admin"])
    caller = transport(held)
    code, reason = FORGERIES[forgery]
    for method, path, body in (("GET", "/v1/task/whoami", None),
                               ("POST", "/v1/task/buffer-publish", {"rows": [{"k": "forged", "v": "x"}]})):
        status, answer = caller(method, path, forged, body)
        assert status == 401, (status, answer)
        assert code == "*" or answer["error"]["code"] == code, answer
        if reason is not None:
            assert answer["error"]["details"]["reason"] == reason, answer
    assert _rows("leaks", held.org_id) == []
    # The genuine token still works: the refusals were about the forgeries, not the task.
    assert caller("GET", "/v1/task/whoami", tokens.mint(capability, secret))[0] == 200


# -- one org's token against another org's data ---------------------------------------------------

@pytest.fixture
def foreign(client: FlaskClient, make_tenant: Any, lease_emit: Callable[..., Leased]) -> Tenant:
    """Org B, whose ``leaks`` dataset holds a secret row (published by B's own task)."""
    other = make_tenant("org-b")
    _apply(client, other, _dag())
    held, capability = lease_emit(other.org_id)
    publish.publish_rows(capability, None, [{"k": "b-secret", "v": "only org B may read this"}],
                         store=object_store(current_settings(client.application)))
    lease.succeed(held)
    return other


@pytest.mark.parametrize("transport", ["http", "gateway"], indirect=True)
@pytest.mark.parametrize("action", ["query_by_name", "query_by_table", "publish_by_name"])
def test_a_live_token_of_org_a_touches_nothing_of_org_b(lease_emit: Callable[..., Leased], secret: bytes,
                                                        foreign: Tenant, transport: Callable[[lease.Lease], Caller],
                                                        action: str) -> None:
    held, capability = lease_emit()
    caller = transport(held)
    token = tokens.mint(capability, secret)
    if action == "publish_by_name":
        # B's dataset has the same name as A's own: the publish lands in A's, never in B's.
        status, body = caller("POST", "/v1/task/buffer-publish", token,
                              {"rows": [{"k": "from-a", "v": "x"}], "dataset": "leaks"})
        assert status == 200, body
        assert _rows("leaks", foreign.org_id) == [("b-secret", "only org B may read this")]
        assert _rows("leaks", held.org_id) == [("from-a", "x")]
        return
    from tracecore.data import datasets

    db.session.rollback()
    hot = datasets.hot_table_name(datasets.get_dataset(foreign.org_id, "leaks"))
    sql = "SELECT * FROM leaks" if action == "query_by_name" else f'SELECT * FROM "{hot}"'
    status, body = caller("POST", "/v1/task/query", token, {"sql": sql})
    assert 400 <= status < 500 and "error" in body, (status, body)
    assert "only org B" not in json.dumps(body)


# -- redaction of what the platform stores ----------------------------------------------------------

def _token_text(held: lease.Lease, app: Flask, secret: bytes) -> str:
    return tokens.mint(tokens.for_lease(held, current_settings(app)), secret)


LEAKY_RESULTS: dict[str, Callable[[str], Any]] = {
    "literal": lambda t: {"token": t},
    "embedded_in_text": lambda t: {"note": f"Bearer {t}; please keep"},
    "nested": lambda t: {"a": [{"b": {"c": ["x", t]}}]},
    "dict_key": lambda t: {t: 1},
    "bare_string": lambda t: t,
    "list": lambda t: [t, t],
    "api_token": lambda t: {"key": "trc_" + "A" * 43},
    "someone_elses_capability": lambda t: {"other": "trc1.eyJmb28iOjF9.c2lnbmF0dXJlc2lnbmF0dXJl"},
}


@pytest.mark.parametrize("shape", sorted(LEAKY_RESULTS))
def test_a_recorded_result_never_holds_a_token(app: Flask, lease_emit: Callable[..., Leased], secret: bytes,
                                               client: FlaskClient, emitting: Tenant, shape: str) -> None:
    held, _ = lease_emit()
    token = _token_text(held, app, secret)
    lease.succeed(held, LEAKY_RESULTS[shape](token))
    run = client.get(f"/v1/runs/{held.run_id}", headers=emitting.headers("reader")).json
    text_of_run = json.dumps(run)
    assert token not in text_of_run and not SHAPE.search(text_of_run), text_of_run
    assert "[REDACTED]" in json.dumps(run["tasks"][0]["attempts"][0]["result"])


LEAKY_FAILURES: dict[str, Callable[[str], lease.Failure]] = {
    "message": lambda t: lease.Failure("error", "ValueError", f"bad row, token {t}"),
    "stack_trace": lambda t: lease.Failure("error", "ValueError", "boom", f'File "/tmp/{t}.py", line 1\n  {t}'),
    "error_type": lambda t: lease.Failure("error", f"Leak{t}", "boom"),
    "api_token_in_message": lambda t: lease.Failure("error", "E", "curl -H 'Bearer trc_" + "b" * 43 + "'"),
}


@pytest.mark.parametrize("retryable", [True, False], ids=["retrying", "dead_letter"])
@pytest.mark.parametrize("where", sorted(LEAKY_FAILURES))
def test_a_recorded_failure_never_holds_a_token(app: Flask, lease_emit: Callable[..., Leased], secret: bytes,
                                                client: FlaskClient, emitting: Tenant, where: str,
                                                retryable: bool) -> None:
    held, _ = lease_emit()
    token = _token_text(held, app, secret)
    failure = dataclasses.replace(LEAKY_FAILURES[where](token), retryable=retryable)
    lease.fail(held, failure, base_delay=60, max_delay=60)
    run = client.get(f"/v1/runs/{held.run_id}", headers=emitting.headers("reader")).json
    stored = db.session.execute(text("SELECT a.error_type, a.error_message, a.stack_trace, t.last_error "
                                     "FROM attempts a JOIN tasks t ON t.id = a.task_id WHERE a.task_id = :t"),
                                {"t": held.task_id}).one()
    everything = json.dumps(run) + json.dumps(list(stored))
    assert token not in everything and not SHAPE.search(everything), everything
    assert "[REDACTED]" in json.dumps(list(stored))


@pytest.mark.parametrize("where", ["rows_value", "rows_key_column", "dead_letter_fingerprint", "dead_letter_key"])
def test_published_data_and_dead_letters_never_hold_a_token(app: Flask, lease_emit: Callable[..., Leased],
                                                             secret: bytes, where: str) -> None:
    held, capability = lease_emit()
    token = _token_text(held, app, secret)
    store = object_store(current_settings(app))
    if where.startswith("dead_letter"):
        manifest = _manifest(store, capability)
        if where == "dead_letter_fingerprint":  # schema_mismatch: details and manifest quote it
            manifest["schema_fingerprint"] = token
        else:  # file_missing: the message quotes the key, which holds a token's shape
            manifest["key"] = f"{capability.output_prefix}trc1.c2hhcGU.c2lnbmF0dXJlLW9mLWEtdG9rZW4.parquet"
        with pytest.raises(publish.BatchRejected):
            publish.buffer_publish(capability, manifest, store=store)
        letters = db.session.scalars(select(publish.DeadLetter).where(publish.DeadLetter.task_id == held.task_id))
        stored = json.dumps([[letter.message, letter.details, letter.manifest] for letter in letters])
        assert stored != "[]" and token not in stored and not SHAPE.search(stored), stored
        return
    row = {"k": "r1", "v": f"token={token}"} if where == "rows_value" else {"k": token, "v": "x"}
    publish.publish_rows(capability, None, [row], store=store)
    stored = json.dumps(_rows("leaks", held.org_id))
    assert token not in stored and not SHAPE.search(stored) and "[REDACTED]" in stored, stored


SECRETS_CASES: dict[str, Callable[[str, str], Outcome]] = {
    "response_signature_only": lambda t, s: Outcome("ok", response={"sig": t.split(".")[2]}),
    "response_configured_secret": lambda t, s: Outcome("ok", response={"db": f"password {s} here"}),
    "logs_signature_only": lambda t, s: Outcome("ok", logs=f"sig {t.split('.')[2]}\n"),
    "logs_configured_secret": lambda t, s: Outcome("ok", logs=f"secret {s}\n"),
    "error_signature_only": lambda t, s: Outcome("error", error_type="E", error_message=t.split(".")[2],
                                                 stack_trace=f"x {t}"),
    "rows_in_response": lambda t, s: Outcome("ok", response={"rows": [{"k": t, "v": t.split(".")[2]}]}),
}


@pytest.mark.parametrize("case", sorted(SECRETS_CASES))
def test_the_worker_redacts_its_token_and_secrets_literally(app: Flask, lease_emit: Callable[..., Leased],
                                                            secret: bytes, case: str) -> None:
    """What only the worker knows (its token's signature, ``TRACE_REDACT``) is taken out of the outcome."""
    held, _ = lease_emit()
    token = _token_text(held, app, secret)
    configured = "hunter2-configured-secret"
    outcome = udf.redacted(SECRETS_CASES[case](token, configured),
                           (*redaction.token_secrets(token), configured))
    text_of = json.dumps(dataclasses.asdict(outcome))
    assert token not in text_of and token.split(".")[2] not in text_of and configured not in text_of, text_of
    assert "[REDACTED]" in text_of


# -- end to end: a hostile handler in a real sandbox ------------------------------------------------

LEAKER = r'''
import json
import os
import sys

def handler(event, context):
    token = os.environ["TRACE_CAPABILITY_TOKEN"]
    signature = token.split(".")[2]
    # The side channel the test reads the token back from (a re-encoding: deliberately not redacted).
    print("REVERSED:" + token[::-1])
    mode = event["config"]["mode"]
    if mode == "result":
        return {"token": token, "signature": signature}
    if mode == "nested":
        return {"deep": [{"x": {"y": [token, {"sig": signature}]}}]}
    if mode == "dict_key":
        return {token: "value", signature: 1}
    if mode == "stdout":
        print("my token is", token, "and its signature", signature)
        return "printed"
    if mode == "stderr":
        print("token on stderr:", token, file=sys.stderr)
        return "printed"
    if mode == "exception":
        raise ValueError(f"could not use {token} (signature {signature})")
    if mode == "traceback":
        path = f"/tmp/{signature}.py"  # the whole token is too long for a file name; the line holds it
        with open(path, "w") as handle:
            handle.write(f"raise RuntimeError('boom')  # {token}\n")
        exec(compile(open(path).read(), path, "exec"))
    if mode == "rows":
        return {"rows": [{"k": "row-1", "v": f"token {token}"}, {"k": signature, "v": "sig as key"}]}
    raise AssertionError(mode)
'''

MODES = ["result", "nested", "dict_key", "stdout", "stderr", "exception", "traceback", "rows"]


def _zip(files: dict[str, str]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, body in files.items():
            archive.writestr(name, body)
    return buffer.getvalue()


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_a_hostile_handler_cannot_leak_its_token(client: FlaskClient, tenant: Tenant, processes: Processes,
                                                 settings: Settings, mode: str) -> None:
    upload = client.post("/v1/bundles", headers=tenant.headers("writer"), content_type="multipart/form-data",
                         data={"file": (io.BytesIO(_zip({"trace.py": LEAKER})), "bundle.zip"),
                               "runtime": "python3.11", "handler": "trace.handler"})
    assert upload.status_code in (200, 201), upload.json
    _apply(client, tenant, _dag({"runtime": "lambda", "operator": "udf", "max_retries": 0,
                                 "limits": {"timeout": "30s"},
                                 "udf": {"bundle_id": upload.json["id"], "entrypoint": "trace.handler"}}))
    worker = processes.worker()
    run_id = client.post("/v1/jobs/emit/runs", json={"config": {"mode": mode}},
                         headers=tenant.headers("writer")).json["run_id"]

    def finished() -> dict[str, Any] | None:
        run = client.get(f"/v1/runs/{run_id}", headers=tenant.headers("reader")).json
        return run if run["status"] in ("succeeded", "failed") else None

    run = wait_for(finished, timeout=90, message="the leaking run to finish")
    assert isinstance(run, dict)
    attempt = run["tasks"][0]["attempts"][0]
    assert attempt["log_location"], (attempt, processes.log(worker))
    logs = object_store(settings).get(attempt["log_location"]).decode()
    reversed_token = re.search(r"REVERSED:(\S+)", logs)
    assert reversed_token, logs
    token = reversed_token.group(1)[::-1]
    signature = token.split(".")[2]
    assert len(signature) >= 40
    expected_status = "failed" if mode in ("exception", "traceback") else "succeeded"
    assert run["status"] == expected_status, (attempt, processes.log(worker))

    stored = {"run": json.dumps(run), "logs": logs}
    if mode == "rows":
        stored["rows"] = json.dumps(_rows("leaks", tenant.org_id))
        assert len(_rows("leaks", tenant.org_id)) == 2
    for where, body in stored.items():
        assert token not in body and signature not in body, (where, body)
        assert not SHAPE.search(body), (where, body)
    assert "[REDACTED]" in (stored["logs"] if mode in ("stdout", "stderr") else stored["run"] + stored.get("rows", ""))

    # The leaked token (as any org reader could have copied it) no longer works anywhere.
    for method, path, body in (("GET", "/v1/task/whoami", None), ("POST", "/v1/task/query", {"sql": "SELECT 1"}),
                               ("POST", "/v1/task/buffer-publish", {"rows": [{"k": "replayed", "v": "x"}]})):
        response = client.open(path, method=method, json=body, headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == 401 and response.json["error"]["code"] == "token_attempt_ended", response.json
    if mode == "rows":
        assert all(row[0] != "replayed" for row in _rows("leaks", tenant.org_id))


def test_the_redaction_shapes_follow_the_token_formats() -> None:
    """redaction.py imports nothing of the platform: its prefixes must still be the minters' own."""
    from tracecore.tenancy import orgs

    assert redaction.CAPABILITY_PREFIX == tokens.PREFIX and redaction.API_TOKEN_PREFIX == orgs.TOKEN_PREFIX
    api_token = orgs.TOKEN_PREFIX + "x" * 43
    assert redaction.redact(f"a {api_token} b") == "a trc_[REDACTED] b"
    assert redaction.redact("display prefix trc_abcdef stays") == "display prefix trc_abcdef stays"
