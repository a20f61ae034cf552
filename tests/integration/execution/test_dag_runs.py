"""DAG runs on real workers: POST /v1/dags/{name}/runs becomes a Celery canvas (groups and chords)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from flask.testing import FlaskClient
from sqlalchemy import text

from tests.conftest import Processes, Tenant
from tests.integration.workers.test_dispatcher import put_dag, wait_run, when
from tracecore.db.engine import db
from tracecore.settings import SETTINGS_KEY, Settings, configure


def job(name: str, operator: str = "sleep", *extra: str, upstream: tuple[str, ...] = ()) -> str:
    lines = [f"- name: {name}", "  runtime: platform", f"  operator: {operator}", "  outputs: 1", *extra]
    if operator == "sleep":
        lines.append("  config: {seconds: 0.3}")
    if upstream:
        lines.append("  inputs: [" + ", ".join(f"{{from: {{job: {up}, output: 0}}}}" for up in upstream) + "]")
    return "\n".join(lines) + "\n"


DIAMOND = job("a") + job("b", upstream=("a",)) + job("c", upstream=("a",)) + job("d", upstream=("b", "c"))


def start_dag(client: FlaskClient, tenant: Tenant, name: str) -> str:
    response = client.post(f"/v1/dags/{name}/runs", json={}, headers=tenant.headers("writer"))
    assert response.status_code == 202, response.json
    return response.json["run_id"]


def by_job(run: dict[str, Any]) -> dict[str, dict[str, Any]]:
    tasks = {task["job"]: task for task in run["tasks"]}
    assert len(tasks) == len(run["tasks"]), run["tasks"]
    return tasks


def test_a_diamond_runs_d_once_after_both_b_and_c(client: FlaskClient, tenant: Tenant,
                                                  processes: Processes) -> None:
    put_dag(client, tenant, "diamond", DIAMOND)
    run_id = start_dag(client, tenant, "diamond")
    queued = by_job(wait_run(client, tenant, run_id, processes, [], states=("queued",)))
    assert {name: task["status"] for name, task in queued.items()} == dict.fromkeys("abcd", "queued")

    workers = [processes.worker("w1", concurrency=2)]
    run = wait_run(client, tenant, run_id, processes, workers, timeout=60)
    assert run["status"] == "succeeded", run
    assert run["cause"] == "manual"
    tasks = by_job(run)
    assert {name: task["status"] for name, task in tasks.items()} == dict.fromkeys("abcd", "succeeded")
    for task in tasks.values():
        assert [a["status"] for a in task["attempts"]] == ["succeeded"], task  # each job ran exactly once
    [a], [b], [c], [d] = (tasks[name]["attempts"] for name in "abcd")
    assert when(a["finished_at"]) <= when(b["started_at"]) and when(a["finished_at"]) <= when(c["started_at"])
    assert when(d["started_at"]) >= max(when(b["finished_at"]), when(c["finished_at"])), (b, c, d)


def test_an_independent_pipeline_does_not_wait_for_a_slow_one(client: FlaskClient, tenant: Tenant,
                                                               processes: Processes) -> None:
    """slow -> after_slow beside fast -> after_fast: two chains in a group, so after_fast is done
    while slow still sleeps (a level-by-level canvas would hold it behind slow)."""
    body = job("slow").replace("seconds: 0.3", "seconds: 4") + job("after_slow", upstream=("slow",)) \
        + job("fast") + job("after_fast", upstream=("fast",))
    put_dag(client, tenant, "pipelines", body)
    workers = [processes.worker("w1", concurrency=2)]
    run = wait_run(client, tenant, start_dag(client, tenant, "pipelines"), processes, workers, timeout=60)
    assert run["status"] == "succeeded", run
    attempts = {name: task["attempts"][0] for name, task in by_job(run).items()}
    assert when(attempts["after_fast"]["finished_at"]) < when(attempts["slow"]["finished_at"]), attempts
    assert when(attempts["after_slow"]["started_at"]) >= when(attempts["slow"]["finished_at"])


def test_nested_chords_run_every_job_once_after_its_upstreams(client: FlaskClient, tenant: Tenant,
                                                               processes: Processes) -> None:
    """a -> (b, c) -> d, then (d, e) -> f, and a lone g: a chord whose header holds a chord."""
    edges = {"b": ("a",), "c": ("a",), "d": ("b", "c"), "f": ("d", "e")}
    body = "".join(job(name, upstream=edges.get(name, ())) for name in "abcdefg")
    put_dag(client, tenant, "nested", body)
    workers = [processes.worker("w1", concurrency=2)]
    run = wait_run(client, tenant, start_dag(client, tenant, "nested"), processes, workers, timeout=60)
    assert run["status"] == "succeeded", run
    tasks = by_job(run)
    for task in tasks.values():
        assert [a["status"] for a in task["attempts"]] == ["succeeded"], task
    for name, ups in edges.items():
        for up in ups:
            assert when(tasks[name]["attempts"][0]["started_at"]) >= when(tasks[up]["attempts"][0]["finished_at"])


def test_a_dead_lettered_upstream_cancels_its_downstream_and_fails_the_run(
        client: FlaskClient, tenant: Tenant, processes: Processes) -> None:
    body = (job("a") + job("b", "always_fail", "  max_retries: 0", upstream=("a",)) + job("c", upstream=("a",))
            + job("d", upstream=("b", "c")) + job("e", upstream=("d",)))
    put_dag(client, tenant, "broken", body)
    run_id = start_dag(client, tenant, "broken")
    workers = [processes.worker("w1", concurrency=2)]
    run = wait_run(client, tenant, run_id, processes, workers, timeout=60)
    assert run["status"] == "failed", run
    tasks = by_job(run)
    assert {name: task["status"] for name, task in tasks.items()} == \
        {"a": "succeeded", "b": "dead_letter", "c": "succeeded", "d": "canceled", "e": "canceled"}
    assert tasks["d"]["attempts"] == [] and tasks["e"]["attempts"] == []
    assert "upstream job 'b' failed" in tasks["d"]["last_error"]


def test_a_dag_run_needs_a_writer_and_an_existing_dag(client: FlaskClient, tenant: Tenant,
                                                      make_tenant: Any) -> None:
    put_dag(client, tenant, "diamond", DIAMOND)
    assert client.post("/v1/dags/diamond/runs", json={}, headers=tenant.headers("reader")).status_code == 403
    other = make_tenant("other")
    assert client.post("/v1/dags/diamond/runs", json={}, headers=other.headers("writer")).status_code == 404


def test_a_retried_upstream_finishes_before_its_downstream_starts(client: FlaskClient, tenant: Tenant,
                                                                  processes: Processes) -> None:
    """A failed attempt that will be retried keeps the chord waiting: the canvas task retries itself."""
    body = job("a") + job("b", "fail_first", "  max_retries: 2", upstream=("a",)) + job("c", upstream=("a",)) \
        + job("d", upstream=("b", "c"))
    put_dag(client, tenant, "retried", body)
    workers = [processes.worker("w1", concurrency=2)]
    run = wait_run(client, tenant, start_dag(client, tenant, "retried"), processes, workers, timeout=60)
    assert run["status"] == "succeeded", run
    tasks = by_job(run)
    assert [a["status"] for a in tasks["b"]["attempts"]] == ["failed", "succeeded"]
    assert [a["status"] for a in tasks["d"]["attempts"]] == ["succeeded"]
    assert when(tasks["d"]["attempts"][0]["started_at"]) >= when(tasks["b"]["attempts"][1]["finished_at"])


def test_a_failure_does_not_strand_an_independent_branch(client: FlaskClient, tenant: Tenant,
                                                         processes: Processes) -> None:
    """`lone` fails in the first level and halts the chain; `y` (below `x`, not below `lone`) still runs."""
    body = job("lone", "always_fail", "  max_retries: 0") + job("x") + job("y", upstream=("x",))
    put_dag(client, tenant, "branches", body)
    workers = [processes.worker("w1", concurrency=2)]
    run = wait_run(client, tenant, start_dag(client, tenant, "branches"), processes, workers, timeout=60)
    assert run["status"] == "failed", run
    tasks = by_job(run)
    assert {name: task["status"] for name, task in tasks.items()} == \
        {"lone": "dead_letter", "x": "succeeded", "y": "succeeded"}
    assert when(tasks["y"]["attempts"][0]["started_at"]) >= when(tasks["x"]["attempts"][0]["finished_at"])


def test_dag_runs_and_reruns_share_the_orgs_rate_limit(client: FlaskClient, tenant: Tenant,
                                                       settings: Settings) -> None:
    client.application.config[SETTINGS_KEY] = configure(replace(settings, run_rate_limit=2, run_rate_window=60))
    put_dag(client, tenant, "diamond", DIAMOND)
    run_id = start_dag(client, tenant, "diamond")
    rerun = client.post(f"/v1/runs/{run_id}/rerun", json={"scope": "self", "job": "b"},
                        headers=tenant.headers("writer"))
    assert rerun.status_code == 202, rerun.json
    limited = client.post("/v1/dags/diamond/runs", json={}, headers=tenant.headers("writer"))
    assert limited.status_code == 429 and limited.json["error"]["code"] == "rate_limited"
    assert 1 <= int(limited.headers["Retry-After"]) <= 60
    again = client.post(f"/v1/runs/{run_id}/rerun", json={"scope": "failed"}, headers=tenant.headers("writer"))
    assert again.status_code == 429
    db.session.rollback()
    assert db.session.scalar(text("SELECT count(*) FROM runs WHERE org_id = :o"), {"o": tenant.org_id}) == 2
