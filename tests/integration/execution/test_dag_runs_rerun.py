"""Re-runs on real workers: POST /v1/runs/{id}/rerun {scope: self | downstream | failed}."""

from __future__ import annotations

from typing import Any

from flask.testing import FlaskClient

from tests.conftest import Processes, Tenant
from tests.integration.execution.test_dag_runs import DIAMOND, by_job, job, start_dag
from tests.integration.workers.test_dispatcher import put_dag, trigger, wait_run


def rerun(client: FlaskClient, tenant: Tenant, run_id: str, scope: str, job_name: str | None = None,
          role: str = "writer") -> Any:
    body = {"scope": scope, **({"job": job_name} if job_name else {})}
    return client.post(f"/v1/runs/{run_id}/rerun", json=body, headers=tenant.headers(role))


def rerun_ok(client: FlaskClient, tenant: Tenant, run_id: str, scope: str, job_name: str | None = None) -> str:
    response = rerun(client, tenant, run_id, scope, job_name)
    assert response.status_code == 202, response.json
    return response.json["run_id"]


def finished(client: FlaskClient, tenant: Tenant, run_id: str, processes: Processes) -> dict[str, Any]:
    return wait_run(client, tenant, run_id, processes, processes.started, timeout=60)


def test_rerun_self_runs_one_job_without_its_upstream(client: FlaskClient, tenant: Tenant,
                                                     processes: Processes) -> None:
    put_dag(client, tenant, "diamond", DIAMOND)
    processes.worker("w1", concurrency=2)
    original = start_dag(client, tenant, "diamond")
    assert finished(client, tenant, original, processes)["status"] == "succeeded"

    missing = rerun(client, tenant, original, "self")  # several jobs: name one
    assert (missing.status_code, missing.json["error"]["code"]) == (400, "missing_field"), missing.json
    new = rerun_ok(client, tenant, original, "self", "c")
    run = finished(client, tenant, new, processes)
    assert run["status"] == "succeeded", run
    assert (run["cause"], run["job"]) == ("rerun", "c")
    assert run["parameters"] == {"rerun_of": original, "scope": "self", "job": "c"}
    assert [(task["job"], task["status"]) for task in run["tasks"]] == [("c", "succeeded")]

    # A single-job run re-runs that same job.
    put_dag(client, tenant, "single", job("solo", "noop"))
    solo = trigger(client, tenant, "solo")
    assert finished(client, tenant, solo, processes)["status"] == "succeeded"
    again = finished(client, tenant, rerun_ok(client, tenant, solo, "self"), processes)
    assert [(task["job"], task["status"]) for task in again["tasks"]] == [("solo", "succeeded")]
    assert again["parameters"]["rerun_of"] == solo


def test_rerun_downstream_runs_the_job_and_everything_below_it(client: FlaskClient, tenant: Tenant,
                                                               processes: Processes) -> None:
    put_dag(client, tenant, "diamond", DIAMOND)
    processes.worker("w1", concurrency=2)
    original = start_dag(client, tenant, "diamond")
    assert finished(client, tenant, original, processes)["status"] == "succeeded"

    run = finished(client, tenant, rerun_ok(client, tenant, original, "downstream", "b"), processes)
    assert run["status"] == "succeeded", run
    assert run["parameters"] == {"rerun_of": original, "scope": "downstream", "job": "b"}
    tasks = by_job(run)
    assert sorted(tasks) == ["b", "d"]  # not a (upstream), not c (a sibling)
    [b], [d] = tasks["b"]["attempts"], tasks["d"]["attempts"]
    assert b["finished_at"] <= d["started_at"]


def test_rerun_failed_runs_only_the_failed_and_canceled_tasks(client: FlaskClient, tenant: Tenant,
                                                              processes: Processes) -> None:
    body = (job("a") + job("b", "always_fail", "  max_retries: 0", upstream=("a",)) + job("c", upstream=("a",))
            + job("d", upstream=("b", "c")))
    put_dag(client, tenant, "broken", body)
    processes.worker("w1", concurrency=2)
    original = start_dag(client, tenant, "broken")
    assert finished(client, tenant, original, processes)["status"] == "failed"

    run = finished(client, tenant, rerun_ok(client, tenant, original, "failed"), processes)
    assert run["parameters"] == {"rerun_of": original, "scope": "failed"}
    tasks = by_job(run)
    assert {name: task["status"] for name, task in tasks.items()} == {"b": "dead_letter", "d": "canceled"}
    assert run["status"] == "failed"

    # Fixed (the job edited to succeed): the failed part re-runs green, without a or c.
    put_dag(client, tenant, "broken", body.replace("always_fail", "noop"))
    fixed = finished(client, tenant, rerun_ok(client, tenant, original, "failed"), processes)
    assert fixed["status"] == "succeeded", fixed
    assert sorted(by_job(fixed)) == ["b", "d"]
    nothing = rerun(client, tenant, fixed["id"], "failed")
    assert nothing.status_code == 409, nothing.json


def test_a_rerun_needs_a_writer_and_the_callers_own_run(client: FlaskClient, tenant: Tenant,
                                                        make_tenant: Any) -> None:
    put_dag(client, tenant, "diamond", DIAMOND)
    original = start_dag(client, tenant, "diamond")
    assert rerun(client, tenant, original, "self", "a", role="reader").status_code == 403
    other = make_tenant("other")
    assert rerun(client, other, original, "self", "a").status_code == 404
    assert rerun(client, tenant, original, "sideways", "a").status_code == 400
    assert rerun(client, tenant, original, "self", "nope").status_code == 404
