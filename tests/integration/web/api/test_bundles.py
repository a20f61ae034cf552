"""POST/GET /v1/bundles over real PostgreSQL and a local object store; the DAG's bundle check."""

from __future__ import annotations

import io
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select
from werkzeug.test import TestResponse

from tests.conftest import Tenant
from tests.unit.execution.test_bundles import PY, link, make_zip, member
from tracecore.db.engine import db
from tracecore.execution import bundles
from tracecore.infra.storage import LocalObjectStore, object_store
from tracecore.settings import current_settings
from tracecore.tenancy.audit import AuditLog

BUNDLE = make_zip(*PY)
FIELDS = {"id", "sha256", "size", "runtime", "handler", "entries", "unzipped_size", "created_by", "created_at"}


def upload(client: FlaskClient, tenant: Tenant, data: bytes | None = BUNDLE, *, runtime: str | None = "python3.11",
           handler: str | None = "trace.handler", role: str = "writer") -> TestResponse:
    form: dict = {}
    if data is not None:
        form["file"] = (io.BytesIO(data), "bundle.zip", "application/zip")
    if runtime is not None:
        form["runtime"] = runtime
    if handler is not None:
        form["handler"] = handler
    response = client.post("/v1/bundles", data=form, headers=tenant.headers(role), content_type="multipart/form-data")
    # The test client spools a large body to a temp file and, without follow_redirects, never closes it.
    response.request.input_stream.close()
    return response


def assert_error(response: TestResponse, status: int, code: str) -> dict:
    assert response.status_code == status, response.json
    assert set(response.json) == {"error"}
    error = response.json["error"]
    assert error["code"] == code, error
    assert isinstance(error["message"], str) and error["message"]
    return error


def test_upload_answers_201_and_stores_the_zip_by_hash(client: FlaskClient, tenant: Tenant, app: Flask) -> None:
    response = upload(client, tenant)
    assert response.status_code == 201, response.json
    body = response.json
    assert set(body) == FIELDS
    assert (body["size"], body["runtime"], body["handler"], body["entries"]) == (len(BUNDLE), "python3.11",
                                                                                 "trace.handler", 1)
    sha = bundles.validate_archive(BUNDLE, "python3.11", "trace.handler").sha256
    assert body["sha256"] == sha
    store = object_store(current_settings(app))
    assert isinstance(store, LocalObjectStore)
    assert store.get(f"bundles/{tenant.org_id}/{sha}.zip") == BUNDLE
    assert store.root == Path(current_settings(app).home).resolve() / "objects"


def test_the_same_bytes_twice_give_the_same_bundle(client: FlaskClient, tenant: Tenant) -> None:
    first = upload(client, tenant)
    again = upload(client, tenant)
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json == first.json
    other_handler = upload(client, tenant, make_zip(*PY, member("other.py", "def h(e, c): pass\n")),
                           handler="other.h")
    assert other_handler.status_code == 201 and other_handler.json["id"] != first.json["id"]
    listed = client.get("/v1/bundles", headers=tenant.headers("reader"))
    assert listed.status_code == 200
    assert sorted(item["id"] for item in listed.json) == sorted([first.json["id"], other_handler.json["id"]])


def test_the_same_bytes_in_another_org_are_another_bundle(client: FlaskClient, tenant: Tenant,
                                                          make_tenant: Callable[[str], Tenant]) -> None:
    mine = upload(client, tenant).json
    other = make_tenant("initech")
    theirs = upload(client, other)
    assert theirs.status_code == 201 and theirs.json["id"] != mine["id"]
    assert theirs.json["sha256"] == mine["sha256"]
    assert [item["id"] for item in client.get("/v1/bundles", headers=other.headers()).json] == [theirs.json["id"]]


def test_get_one_and_404_for_another_orgs_or_a_malformed_id(client: FlaskClient, tenant: Tenant,
                                                          make_tenant: Callable[[str], Tenant]) -> None:
    created = upload(client, tenant).json
    got = client.get(f"/v1/bundles/{created['id']}", headers=tenant.headers("reader"))
    assert got.status_code == 200 and got.json == created
    other = make_tenant("initech")
    assert_error(client.get(f"/v1/bundles/{created['id']}", headers=other.headers()), 404, "not_found")
    assert_error(client.get("/v1/bundles/not-a-uuid", headers=tenant.headers()), 404, "not_found")
    assert_error(client.get("/v1/bundles/00000000-0000-0000-0000-000000000000", headers=tenant.headers()), 404,
                 "not_found")


def test_a_reader_cannot_upload_and_nobody_without_a_token(client: FlaskClient, tenant: Tenant) -> None:
    assert_error(upload(client, tenant, role="reader"), 403, "forbidden")
    assert_error(client.post("/v1/bundles", data={}), 401, "unauthenticated")
    assert upload(client, tenant, role="admin").status_code == 201
    assert client.get("/v1/bundles", headers=tenant.headers()).json[0]["runtime"] == "python3.11"


@pytest.mark.parametrize("missing", ["file", "runtime", "handler"])
def test_a_missing_field_is_named(client: FlaskClient, tenant: Tenant, missing: str) -> None:
    values: dict = {"data": BUNDLE, "runtime": "python3.11", "handler": "trace.handler"}
    values["data" if missing == "file" else missing] = None
    error = assert_error(upload(client, tenant, values["data"], runtime=values["runtime"],
                                handler=values["handler"]), 400, "missing_field")
    assert error["details"]["path"] == missing


@pytest.mark.parametrize(("data", "runtime", "handler", "code"), [
    (b"not a zip at all", "python3.11", "trace.handler", "not_a_zip"),
    (make_zip(*PY, member("/etc/x", "owned")), "python3.11", "trace.handler", "absolute_path"),
    (make_zip(*PY, member("../x", "owned")), "python3.11", "trace.handler", "path_traversal"),
    (make_zip(*PY, link("evil", "../../etc/passwd")), "python3.11", "trace.handler", "symlink_escape"),
    (make_zip(*PY, member("zeros.bin", bytes(4 * 1024 * 1024)), level=1), "python3.11", "trace.handler",
     "zip_bomb"),
    (BUNDLE, "python3.11", "missing.handler", "handler_missing"),
    (BUNDLE, "nodejs", "trace.handler", "handler_missing"),
    (make_zip(member("bootstrap", "#!/bin/sh\n", 0o644)), "provided", "x", "bootstrap_missing"),
    (BUNDLE, "ruby", "trace.handler", "unknown_runtime"),
    (BUNDLE, "python3.11", "nodot", "invalid_handler"),
], ids=["not-a-zip", "absolute", "dotdot", "symlink", "bomb", "py-handler", "node-handler", "bootstrap",
        "runtime", "handler-shape"])
def test_invalid_uploads_answer_400_with_a_precise_code(client: FlaskClient, tenant: Tenant, data: bytes,
                                                        runtime: str, handler: str, code: str, app: Flask) -> None:
    assert_error(upload(client, tenant, data, runtime=runtime, handler=handler), 400, code)
    assert client.get("/v1/bundles", headers=tenant.headers()).json == []
    assert not (Path(current_settings(app).home).resolve() / "objects" / "bundles").exists()


def test_a_provided_bundle_with_an_executable_bootstrap(client: FlaskClient, tenant: Tenant) -> None:
    data = make_zip(member("bootstrap", "#!/bin/sh\nexit 0\n", 0o755, kind=stat.S_IFREG))
    response = upload(client, tenant, data, runtime="provided", handler="function.handler")
    assert response.status_code == 201, response.json


def test_a_body_over_51_mb_answers_413_bundle_too_large(client: FlaskClient, tenant: Tenant) -> None:
    error = assert_error(upload(client, tenant, b"\0" * (bundles.MAX_ZIPPED + 2 * 1024 * 1024)), 413,
                         "bundle_too_large")
    assert error["details"]["path"] == "file"


def test_a_zip_just_over_50_mb_answers_400_bundle_too_large(client: FlaskClient, tenant: Tenant) -> None:
    assert_error(upload(client, tenant, b"\0" * (bundles.MAX_ZIPPED + 1)), 400, "bundle_too_large")


def test_uploads_are_audited(client: FlaskClient, tenant: Tenant, app: Flask) -> None:
    created = upload(client, tenant).json
    upload(client, tenant)
    upload(client, tenant, b"junk")
    rows = db.session.scalars(select(AuditLog).where(AuditLog.action == "bundle.upload")
                              .order_by(AuditLog.created_at)).all()
    assert [(row.object_type, row.object_id, row.details["new"]) for row in rows] == \
        [("bundle", created["id"], True), ("bundle", created["id"], False)]
    assert rows[0].details["sha256"] == created["sha256"] and rows[0].org_id == tenant.org_id


# --- PUT /v1/dags checks udf.bundle_id --------------------------------------------------------------------------

def udf_dag(*bundle_ids: str) -> str:
    return "".join(f"- name: u{index}\n  runtime: lambda\n  operator: udf\n"
                   f"  udf: {{bundle_id: '{bundle_id}', entrypoint: trace.handler}}\n"
                   for index, bundle_id in enumerate(bundle_ids))


def put_dag(client: FlaskClient, tenant: Tenant, body: str) -> TestResponse:
    return client.put("/v1/dags/udfs", data=body, headers={**tenant.headers("writer"),
                                                           "Content-Type": "application/yaml"})


def test_a_dag_may_name_its_orgs_bundles(client: FlaskClient, tenant: Tenant) -> None:
    bundle_id = upload(client, tenant).json["id"]
    response = put_dag(client, tenant, udf_dag(bundle_id, bundle_id))
    assert response.status_code == 200, response.json
    spec = client.get("/v1/jobs/u1", headers=tenant.headers()).json["spec"]
    assert spec["udf"] == {"bundle_id": bundle_id, "entrypoint": "trace.handler"}


@pytest.mark.parametrize("bad", ["<bundle-id>", "00000000-0000-0000-0000-000000000000"])
def test_an_unknown_bundle_is_refused_with_its_path(client: FlaskClient, tenant: Tenant, bad: str) -> None:
    known = upload(client, tenant).json["id"]
    error = assert_error(put_dag(client, tenant, udf_dag(known, bad)), 400, "unknown_bundle")
    assert error["details"]["path"] == "jobs[1].udf.bundle_id"
    assert [item["path"] for item in error["details"]["errors"]] == ["jobs[1].udf.bundle_id"]
    assert client.get("/v1/dags/udfs", headers=tenant.headers()).status_code == 404


def test_another_orgs_bundle_is_unknown(client: FlaskClient, tenant: Tenant,
                                        make_tenant: Callable[[str], Tenant]) -> None:
    other = make_tenant("initech")
    theirs = upload(client, other).json["id"]
    error = assert_error(put_dag(client, tenant, udf_dag(theirs)), 400, "unknown_bundle")
    assert error["details"]["path"] == "jobs[0].udf.bundle_id"
    assert put_dag(client, other, udf_dag(theirs)).status_code == 200
