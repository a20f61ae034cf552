"""The `udf` operator end to end: upload a bundle, run it through a real worker in a Docker
sandbox, read the attempt back; and the integrity check that runs nothing on a mismatch."""

from __future__ import annotations

import io
import uuid
import zipfile
from typing import Any

import docker
import pytest
from flask.testing import FlaskClient

from tests.conftest import Processes, Tenant, wait_for
from tracecore.infra.storage import object_store
from tracecore.settings import Settings

pytestmark = pytest.mark.slow

HANDLER = '''
import os
import trace_sdk

def handler(event, context):
    who = trace_sdk.whoami()
    print("token is", os.environ["TRACE_CAPABILITY_TOKEN"])
    return {"job": event["task"]["job"], "config": event["config"], "whoami_task": who["task_id"],
            "fence_current": who["fence_current"], "now": event["params"]["now"]}
'''


def _zip(files: dict[str, str]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, body in files.items():
            archive.writestr(name, body)
    return buffer.getvalue()


def _upload(client: FlaskClient, tenant: Tenant, data: bytes) -> dict[str, Any]:
    response = client.post("/v1/bundles", headers=tenant.headers("writer"), content_type="multipart/form-data",
                           data={"file": (io.BytesIO(data), "bundle.zip"), "runtime": "python3.11",
                                 "handler": "trace.handler"})
    assert response.status_code in (200, 201), response.json
    return response.json


def _dag(bundle_id: str, *, name: str = "enrich") -> str:
    return (f"- name: {name}\n  runtime: lambda\n  operator: udf\n  max_retries: 0\n  config: {{threshold: 7}}\n"
            f"  limits: {{timeout: 20s}}\n  udf: {{bundle_id: '{bundle_id}', entrypoint: trace.handler}}\n")


def _run(client: FlaskClient, tenant: Tenant, job: str) -> dict[str, Any]:
    run_id = client.post(f"/v1/jobs/{job}/runs", json={}, headers=tenant.headers("writer")).json["run_id"]

    def finished() -> dict[str, Any] | None:
        run = client.get(f"/v1/runs/{run_id}", headers=tenant.headers("reader")).json
        return run if run["status"] in ("succeeded", "failed") else None

    return wait_for(finished, timeout=90, message="the udf run to finish")  # type: ignore[return-value]


def test_udf_runs_in_a_sandbox_and_reaches_the_gateway(client: FlaskClient, tenant: Tenant,
                                                       processes: Processes, settings: Settings) -> None:
    bundle = _upload(client, tenant, _zip({"trace.py": HANDLER}))
    put = client.put("/v1/dags/udfs", data=_dag(bundle["id"]),
                     headers={**tenant.headers("writer"), "Content-Type": "application/yaml"})
    assert put.status_code == 200, put.json
    worker = processes.worker()
    run = _run(client, tenant, "enrich")
    attempt = run["tasks"][0]["attempts"][0]
    assert run["status"] == "succeeded", (attempt, processes.log(worker))
    assert attempt["exit_reason"] == "ok"
    result = attempt["result"]
    assert result["job"] == "enrich" and result["config"] == {"threshold": 7}
    assert result["whoami_task"] == run["tasks"][0]["id"] and result["fence_current"] is True
    # The handler printed its token: the stored log has it redacted.
    logs = object_store(settings).get(attempt["log_location"]).decode()
    assert "token is [REDACTED]" in logs and "trc1." not in logs
    # The worker removes the container in the background once the attempt is recorded: it goes soon after.
    task_label = f"org.trace.task={run['tasks'][0]['id']}"
    engine = docker.from_env()
    wait_for(lambda: engine.containers.list(all=True, filters={"label": task_label}) == [], timeout=30,
             message="the sandbox container to be removed")


def test_a_tampered_bundle_fails_with_integrity_error_and_runs_nothing(
        client: FlaskClient, tenant: Tenant, processes: Processes, settings: Settings) -> None:
    bundle = _upload(client, tenant, _zip({"trace.py": "def handler(e, c):\n    return 1\n"}))
    client.put("/v1/dags/udfs", data=_dag(bundle["id"], name="tampered"),
               headers={**tenant.headers("writer"), "Content-Type": "application/yaml"})
    store = object_store(settings)
    key = f"bundles/{tenant.org_id}/{bundle['sha256']}.zip"
    store.put(key, _zip({"trace.py": "def handler(e, c):\n    return 'evil'\n"}))
    processes.worker()
    run = _run(client, tenant, "tampered")
    attempt = run["tasks"][0]["attempts"][0]
    assert run["status"] == "failed"
    assert attempt["exit_reason"] == "integrity_error" and attempt["result"] is None
    assert run["tasks"][0]["status"] == "dead_letter" and len(run["tasks"][0]["attempts"]) == 1
    # Nothing ran: the bundle was never unpacked for a sandbox, and no sandbox left logs.
    assert not (settings.home_path / "bundle-cache" / bundle["sha256"]).exists()
    assert attempt["log_location"] is None


def test_a_bundle_of_another_org_cannot_be_named(client: FlaskClient, make_tenant: Any) -> None:
    owner, other = make_tenant("owner"), make_tenant("other")
    bundle = _upload(client, owner, _zip({"trace.py": "def handler(e, c):\n    return 1\n"}))
    put = client.put("/v1/dags/x", data=_dag(bundle["id"]),
                     headers={**other.headers("writer"), "Content-Type": "application/yaml"})
    assert put.status_code == 400 and put.json["error"]["code"] == "unknown_bundle"
    assert put.json["error"]["details"]["path"] == "jobs[0].udf.bundle_id"
    assert uuid.UUID(bundle["id"])


def test_the_container_of_a_killed_worker_is_reaped(client: FlaskClient, tenant: Tenant, processes: Processes,
                                                    kill_worker: Any, app: Any) -> None:
    bundle = _upload(client, tenant, _zip({"trace.py": "import time\ndef handler(e, c):\n    time.sleep(60)\n"}))
    client.put("/v1/dags/udfs", data=_dag(bundle["id"], name="sleeper").replace("timeout: 20s", "timeout: 90s"),
               headers={**tenant.headers("writer"), "Content-Type": "application/yaml"})
    first = processes.worker("w1")
    client.post("/v1/jobs/sleeper/runs", json={}, headers=tenant.headers("writer"))
    engine = docker.from_env()
    org_label = {"label": f"org.trace.org={tenant.org_id}"}
    wait_for(lambda: engine.containers.list(filters={**org_label, "status": "running"}), timeout=60,
             message="the sandbox to start")
    kill_worker(first)
    # SIGKILL gave the worker no chance to clean up: its sandbox is still there.
    assert engine.containers.list(all=True, filters=org_label)
    processes.worker("w2")
    removed = app.extensions["celery"].send_task("trace.reap_sandboxes", ignore_result=False).get(timeout=60)
    assert removed >= 1
    assert engine.containers.list(all=True, filters=org_label) == []
