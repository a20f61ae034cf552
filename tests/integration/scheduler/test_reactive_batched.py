"""Data triggers beyond PerUpdate: Batched coalescing, idle_timeout, ``when`` conditions through the
Query Service, refresh propagation, updates a DAG run covers, and the beat's sweep repairing a lost
hook. Time is passed to the sweep explicitly (``now=``), so windows and timeouts are exact."""

from __future__ import annotations

import hashlib
import json
import uuid
from datetime import datetime, timedelta
from typing import Any

from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import func, select

from scheduler import reactive
from tests.conftest import Processes, Tenant, leased_capability, wait_for
from tracecore.dags.catalog import Job
from tracecore.data import datasets, publish
from tracecore.db.engine import db
from tracecore.execution import dag_runs, lease
from tracecore.execution.runs import Run, Task
from tracecore.infra.storage import object_store
from tracecore.settings import current_settings


def _job(name: str, **fields: Any) -> dict[str, Any]:
    return {"name": name, "runtime": "platform", "operator": "noop", **fields}


SOURCE = _job("follower", outputs=[{"dataset": "blocks", "kind": "raw"}])
READS_BLOCKS = [{"from": {"job": "follower", "output": 0}}]


def _put(client: FlaskClient, tenant: Tenant, name: str, dag: list[dict[str, Any]]) -> None:
    response = client.put(f"/v1/dags/{name}", data=json.dumps(dag),
                          headers={**tenant.headers("writer"), "Content-Type": "application/json"})
    assert response.status_code == 200, response.json
    db.session.expire_all()


def _version(org_id: uuid.UUID, dataset: str, start: int, *, run_id: uuid.UUID | None = None) -> int:
    found = datasets.get_dataset(org_id, dataset)
    key = f"{dataset}/{start}.parquet"
    version = datasets.add_version(found, {"files": [{"key": key, "sha256": hashlib.sha256(key.encode()).hexdigest(),
                                                      "rows": 1, "bytes": 8}]},
                                   partition_key=f"blocks:{start}-{start + 9}", run_id=run_id).version
    db.session.commit()
    return version


def _runs(org_id: uuid.UUID, job: str) -> list[tuple[str, dict[str, Any]]]:
    db.session.expire_all()
    rows = db.session.execute(select(Run.cause, Task.window).join(Task, Task.run_id == Run.id)
                              .join(Job, Job.id == Task.job_id)
                              .where(Run.org_id == org_id, Job.name == job).order_by(Run.created_at)).all()
    db.session.rollback()
    return [(cause, window) for cause, window in rows]


def _now() -> datetime:
    now = db.session.scalar(select(func.now()))
    db.session.rollback()
    return now


def _firings(client: FlaskClient, tenant: Tenant, job: str) -> list[dict[str, Any]]:
    response = client.get(f"/v1/jobs/{job}/firings", headers=tenant.headers("reader"))
    assert response.status_code == 200, response.json
    return response.json


def test_batched_coalesces_a_window_of_updates_and_fires_early_when_full(app: Flask, client: FlaskClient,
                                                                         tenant: Tenant) -> None:
    _put(client, tenant, "batched", [SOURCE, _job("rollup", activation="reactive", execution_strategy="Batched",
                                                  batch={"window": "10m", "max_updates": 3}, inputs=READS_BLOCKS)])
    first = [_version(tenant.org_id, "blocks", start) for start in (0, 10)]
    for version in first:  # the hook of each update: the batch is still open
        assert reactive.on_dataset_updated(datasets.get_dataset(tenant.org_id, "blocks").id, version) == []
    assert reactive.sweep(tenant.org_id, now=_now() + timedelta(minutes=9)) == []
    assert len(reactive.sweep(tenant.org_id, now=_now() + timedelta(minutes=11))) == 1  # the window closed
    assert reactive.sweep(tenant.org_id, now=_now() + timedelta(minutes=30)) == []  # consumed, once
    [(cause, window)] = _runs(tenant.org_id, "rollup")
    assert cause == "data"
    assert window["updates"] == 2 and window["datasets"] == {"blocks": first}
    assert (window["block_start"], window["block_end"]) == (0, 19)

    more = [_version(tenant.org_id, "blocks", start) for start in (20, 30, 40)]
    blocks_id = datasets.get_dataset(tenant.org_id, "blocks").id
    assert len(reactive.on_dataset_updated(blocks_id, more[-1])) == 1  # max_updates reached: no waiting
    assert reactive.on_dataset_updated(blocks_id, more[-1]) == []  # a duplicate delivery
    runs_ = _runs(tenant.org_id, "rollup")
    assert len(runs_) == 2 and runs_[1][1]["datasets"] == {"blocks": more}
    assert (runs_[1][1]["block_start"], runs_[1][1]["block_end"]) == (20, 49)


def test_idle_timeout_runs_the_job_once_per_idle_period_and_an_update_resets_it(
        app: Flask, client: FlaskClient, tenant: Tenant) -> None:
    _put(client, tenant, "idle", [SOURCE, _job("alerts", activation="reactive", idle_timeout="5m",
                                               inputs=READS_BLOCKS)])
    start = _now()
    assert reactive.sweep(tenant.org_id, now=start + timedelta(minutes=4)) == []
    assert len(reactive.sweep(tenant.org_id, now=start + timedelta(minutes=6))) == 1
    assert reactive.sweep(tenant.org_id, now=start + timedelta(minutes=9)) == []  # the next deadline is at 10
    assert len(reactive.sweep(tenant.org_id, now=start + timedelta(minutes=10, seconds=30))) == 1
    made = _runs(tenant.org_id, "alerts")
    assert [cause for cause, _ in made] == ["idle", "idle"]
    assert made[0][1]["idle_timeout_s"] == 300.0
    version = _version(tenant.org_id, "blocks", 0)  # data arrives: a data run, and idleness counts from it
    assert len(reactive.on_dataset_updated(datasets.get_dataset(tenant.org_id, "blocks").id, version)) == 1
    assert reactive.sweep(tenant.org_id, now=_now() + timedelta(minutes=4)) == []
    assert [cause for cause, _ in _runs(tenant.org_id, "alerts")] == ["idle", "idle", "data"]


def _publish(app: Flask, org_id: uuid.UUID, job: str, rows: list[dict[str, Any]]) -> int | None:
    """Publish rows as a task of ``job`` would (a real lease and capability token)."""
    capability = leased_capability(app, org_id, job)
    return publish.publish_rows(capability, None, rows, store=object_store(current_settings(app))).version


EMIT = _job("emit", unique_key=["k"], update_strategy="append",
            outputs=[{"dataset": "emitted", "kind": "buffered",
                      "schema": [{"name": "k", "type": "int64", "nullable": False}]}])
READS_EMITTED = [{"from": {"job": "emit", "output": 0}}]


def test_a_when_condition_gates_each_update_through_the_query_service(
        app: Flask, client: FlaskClient, tenant: Tenant, monkeypatch: Any) -> None:
    import workers.app

    monkeypatch.setattr(workers.app, "dataset_updated", lambda *args: None)  # the sweep does the work here
    _put(client, tenant, "when", [
        EMIT,
        _job("threshold", activation="reactive", inputs=READS_EMITTED,
             trigger={"when": "SELECT count(*) >= 3 FROM emitted"}),
        _job("broken", activation="reactive", inputs=READS_EMITTED, trigger={"when": "SELECT k FROM emitted"}),
    ])
    _publish(app, tenant.org_id, "emit", [{"k": 1}, {"k": 2}])
    assert reactive.sweep(tenant.org_id) == []  # 2 rows: the condition is false
    _publish(app, tenant.org_id, "emit", [{"k": 3}])
    assert len(reactive.sweep(tenant.org_id)) == 1  # 3 rows: it holds
    assert [cause for cause, _ in _runs(tenant.org_id, "threshold")] == ["data"]
    ledger = _firings(client, tenant, "threshold")
    assert [(f["outcome"], f["detail"]) for f in ledger] == [("fired", "1 update(s)"), ("skipped", "condition false")]
    assert ledger[0]["run_id"] is not None and ledger[1]["run_id"] is None
    broken = _firings(client, tenant, "broken")
    assert [f["outcome"] for f in broken] == ["error", "error"]
    assert "exactly one" in broken[0]["detail"]  # three rows: the condition must answer one boolean
    assert _runs(tenant.org_id, "broken") == []


def test_refresh_auto_reruns_a_derived_job_and_folds_updates_into_a_queued_refresh(
        app: Flask, client: FlaskClient, tenant: Tenant) -> None:
    _put(client, tenant, "refresh", [SOURCE, _job("daily", refresh="auto", inputs=READS_BLOCKS, outputs=1),
                                     _job("by_hand", inputs=READS_BLOCKS, outputs=1)])
    blocks_id = datasets.get_dataset(tenant.org_id, "blocks").id
    [task_id] = reactive.on_dataset_updated(blocks_id, _version(tenant.org_id, "blocks", 0))
    assert reactive.on_dataset_updated(blocks_id, _version(tenant.org_id, "blocks", 10)) == []  # folded in
    assert [cause for cause, _ in _runs(tenant.org_id, "daily")] == ["refresh"]
    assert _runs(tenant.org_id, "by_hand") == []  # refresh: manual (the default)
    ledger = _firings(client, tenant, "daily")
    assert {f["run_id"] for f in ledger} == {ledger[0]["run_id"]} and len(ledger) == 2
    assert lease.take(task_id, "test-worker", 60.0) is not None  # the refresh started: it pinned version 2
    db.session.rollback()
    assert len(reactive.on_dataset_updated(blocks_id, _version(tenant.org_id, "blocks", 20))) == 1
    made = _runs(tenant.org_id, "daily")
    assert [cause for cause, _ in made] == ["refresh", "refresh"]
    assert made[0][1]["refresh"] is True and made[1][1]["datasets"] == {"blocks": [3]}


def test_an_update_made_by_a_dag_run_that_runs_the_job_fires_nothing(app: Flask, client: FlaskClient,
                                                                     tenant: Tenant) -> None:
    _put(client, tenant, "chain", [SOURCE, _job("daily", refresh="auto", inputs=READS_BLOCKS, outputs=1)])
    run_id, _, _ = dag_runs.start_dag(tenant.org_id, "chain", triggered_by=None)
    db.session.commit()
    version = _version(tenant.org_id, "blocks", 0, run_id=run_id)  # the DAG run's follower published it
    assert reactive.on_dataset_updated(datasets.get_dataset(tenant.org_id, "blocks").id, version) == []
    [firing] = _firings(client, tenant, "daily")
    assert firing["outcome"] == "skipped" and "DAG run" in firing["detail"]


def test_the_beat_sweep_fires_an_update_whose_hook_was_lost(app: Flask, client: FlaskClient, tenant: Tenant,
                                                            processes: Processes) -> None:
    _put(client, tenant, "lost", [SOURCE, _job("alerts", activation="reactive", inputs=READS_BLOCKS)])
    version = _version(tenant.org_id, "blocks", 100)  # no dataset_updated message is ever sent
    processes.worker()
    processes.beat()

    def succeeded() -> list[dict[str, Any]]:
        db.session.expire_all()
        rows = db.session.execute(select(Run.state, Task.window).join(Task, Task.run_id == Run.id)
                                  .where(Run.org_id == tenant.org_id, Run.cause == "data")).all()
        db.session.rollback()
        return [window for state, window in rows if state == "succeeded"]

    assert wait_for(succeeded, timeout=60) == [{"dataset": "blocks", "version": version,
                                                "partition_key": "blocks:100-109", "block_start": 100,
                                                "block_end": 109}]
