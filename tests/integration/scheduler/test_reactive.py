"""Reactive PerUpdate triggers: one run (cause ``data``) per upstream version, each with its window;
a duplicate delivery of an update makes no second run (the ``trigger_firings`` guard)."""

from __future__ import annotations

import hashlib
import json
import uuid
from typing import Any

from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select

from scheduler.reactive import on_dataset_updated
from tests.conftest import Processes, Tenant, leased_capability, wait_for
from tracecore.data import datasets
from tracecore.db.engine import db
from tracecore.execution.runs import Run, Task
from workers.app import dataset_updated

DAG = [
    {"name": "follower", "runtime": "platform", "operator": "noop", "outputs": [{"dataset": "blocks", "kind": "raw"}]},
    {"name": "alerts", "runtime": "platform", "operator": "noop", "activation": "reactive",
     "execution_strategy": "PerUpdate", "inputs": [{"from": {"job": "follower", "output": 0}}], "outputs": 1},
    {"name": "manual", "runtime": "platform", "operator": "noop",
     "inputs": [{"from": {"job": "follower", "output": 0}}], "outputs": 1},
]


def _manifest(key: str) -> dict[str, Any]:
    return {"files": [{"key": key, "sha256": hashlib.sha256(key.encode()).hexdigest(), "rows": 3, "bytes": 24}]}


def _setup(client: FlaskClient, tenant: Tenant) -> datasets.Dataset:
    response = client.put("/v1/dags/reactive", data=json.dumps(DAG),
                          headers={**tenant.headers("writer"), "Content-Type": "application/json"})
    assert response.status_code == 200, response.json
    db.session.expire_all()
    return datasets.get_dataset(tenant.org_id, "blocks")


def _data_windows(org_id: uuid.UUID) -> list[dict[str, Any]]:
    db.session.expire_all()
    rows = db.session.execute(select(Task.window, Run.job_id).join(Run, Run.id == Task.run_id)
                              .where(Run.org_id == org_id, Run.cause == "data")).all()
    return sorted((window for window, _ in rows), key=lambda window: window["version"])


def test_one_run_per_version_with_its_window_and_duplicates_fire_once(app: Flask, client: FlaskClient,
                                                                      tenant: Tenant) -> None:
    blocks = _setup(client, tenant)
    versions = [datasets.add_version(blocks, _manifest(f"blocks/{i}.parquet"),
                                     partition_key=f"blocks:{i * 100}-{i * 100 + 99}").version for i in range(3)]
    db.session.commit()
    made = [on_dataset_updated(blocks.id, version) for version in versions]
    assert [len(task_ids) for task_ids in made] == [1, 1, 1]  # only the reactive job, once per update
    assert on_dataset_updated(blocks.id, versions[1]) == []  # the same update delivered twice
    assert on_dataset_updated(str(blocks.id), versions[2]) == []
    windows = _data_windows(tenant.org_id)
    assert windows == [{"dataset": "blocks", "version": versions[i],
                        "partition_key": f"blocks:{i * 100}-{i * 100 + 99}",
                        "block_start": i * 100, "block_end": i * 100 + 99} for i in range(3)]


def test_the_celery_hook_runs_the_reactive_job_with_a_real_worker(app: Flask, client: FlaskClient, tenant: Tenant,
                                                                   processes: Processes) -> None:
    blocks = _setup(client, tenant)
    version = datasets.add_version(blocks, _manifest("blocks/a.parquet")).version
    db.session.commit()
    processes.worker()
    dataset_updated(app, blocks.id, version)
    dataset_updated(app, blocks.id, version)  # a duplicate delivery

    def succeeded() -> list[str]:
        db.session.expire_all()
        states = db.session.scalars(select(Run.state).where(Run.org_id == tenant.org_id, Run.cause == "data")).all()
        return list(states) if states and all(state == "succeeded" for state in states) else []

    assert wait_for(succeeded, timeout=60) == ["succeeded"]
    assert _data_windows(tenant.org_id) == [{"dataset": "blocks", "version": version, "partition_key": None}]


def test_a_publish_that_makes_a_version_sends_the_hook_and_one_that_changes_nothing_does_not(
        app: Flask, client: FlaskClient, tenant: Tenant, monkeypatch: Any) -> None:
    import workers.app
    from tracecore.data import publish
    from tracecore.infra.storage import object_store
    from tracecore.settings import current_settings

    dag = [{"name": "emit", "runtime": "platform", "operator": "noop", "unique_key": ["k"],
            "update_strategy": "append", "outputs": [{"dataset": "emitted", "kind": "buffered",
                                                      "schema": [{"name": "k", "type": "int64", "nullable": False}]}]},
           {"name": "react", "runtime": "platform", "operator": "noop", "activation": "reactive",
            "inputs": [{"from": {"job": "emit", "output": 0}}], "outputs": 1}]
    response = client.put("/v1/dags/pub", data=json.dumps(dag),
                          headers={**tenant.headers("writer"), "Content-Type": "application/json"})
    assert response.status_code == 200, response.json
    sent: list[tuple[str, int]] = []
    monkeypatch.setattr(workers.app, "dataset_updated", lambda _app, dataset_id, version: sent.append(
        (str(dataset_id), version)))
    capability = leased_capability(app, tenant.org_id, "emit")
    store = object_store(current_settings(app))
    first = publish.publish_rows(capability, None, [{"k": 1}, {"k": 2}], store=store)
    publish.publish_rows(capability, None, [{"k": 1}], store=store)  # nothing new: no version, no hook
    emitted = datasets.get_dataset(tenant.org_id, "emitted")
    assert sent == [(str(emitted.id), first.version)]
    assert len(on_dataset_updated(*sent[0])) == 1
    assert _data_windows(tenant.org_id)[0]["dataset"] == "emitted"
