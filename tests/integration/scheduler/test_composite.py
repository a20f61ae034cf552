"""Composite triggers with a real worker: any_of fires once, all_of waits for all, and an any_of
with a timeout fires at the timeout and not again when its upstream completes later."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import func, select

from scheduler import composite
from scheduler.composite import on_task_succeeded, sweep
from tests.conftest import Processes, Tenant, wait_for
from tracecore.dags.catalog import Job
from tracecore.data import datasets
from tracecore.db.engine import db
from tracecore.execution import lease as leases
from tracecore.execution import runs
from tracecore.execution.runs import Run, Task
from workers.app import enqueue


def _job(name: str, **fields: object) -> dict[str, object]:
    return {"name": name, "runtime": "platform", "operator": "noop", **fields}


DAG = [_job("a"), _job("b"),
       _job("either", trigger={"any_of": ["a"]}),
       _job("both", trigger={"all_of": ["a", "b"]}),
       _job("timed", trigger={"any_of": ["a"], "timeout": "2s"})]


def _put(client: FlaskClient, tenant: Tenant, dag: list[dict[str, object]]) -> None:
    response = client.put("/v1/dags/composite", data=json.dumps(dag),
                          headers={**tenant.headers("writer"), "Content-Type": "application/json"})
    assert response.status_code == 200, response.json


def _runs(org_id: uuid.UUID, job: str, state: str | None = None) -> int:
    db.session.expire_all()
    query = select(Run.id).join(Job, Job.id == Run.job_id).where(Run.org_id == org_id, Job.name == job)
    if state is not None:
        query = query.where(Run.state == state)
    count = len(db.session.scalars(query).all())
    db.session.rollback()
    return count


def _start(app: Flask, org_id: uuid.UUID, job: str, *, send: bool = True) -> uuid.UUID:
    _, task_id = runs.create_run(org_id=org_id, job_name=job, cause="manual", triggered_by=None)
    db.session.commit()
    if send:
        enqueue(app, task_id)
    return task_id


def test_any_of_fires_once_and_all_of_waits_for_all(app: Flask, client: FlaskClient, tenant: Tenant,
                                                   processes: Processes) -> None:
    _put(client, tenant, DAG[:4])
    processes.worker()
    _start(app, tenant.org_id, "a")
    assert wait_for(lambda: _runs(tenant.org_id, "either", "succeeded") == 1, timeout=60)
    assert on_task_succeeded(tenant.org_id, "a") == []  # a duplicate of the hook fires nothing
    time.sleep(1)
    assert _runs(tenant.org_id, "either") == 1
    assert _runs(tenant.org_id, "both") == 0  # b has not run yet
    _start(app, tenant.org_id, "b")
    assert wait_for(lambda: _runs(tenant.org_id, "both", "succeeded") == 1, timeout=60)
    time.sleep(1)
    assert _runs(tenant.org_id, "both") == 1 and _runs(tenant.org_id, "either") == 1


def test_the_close_says_whether_a_composite_names_the_job(app: Flask, client: FlaskClient, tenant: Tenant,
                                                          make_tenant: Any) -> None:
    """The after-success hook runs only when the statement recording the success found a live
    composite of the same org naming the job."""
    _put(client, tenant, DAG[:4])
    other = make_tenant("other")
    _put(client, other, [_job("a")])  # another org's `a`: no composite of its org names it
    for org_id, job, named in ((tenant.org_id, "a", True), (tenant.org_id, "b", True),
                               (tenant.org_id, "either", False), (other.org_id, "a", False)):
        held = leases.take(_start(app, org_id, job, send=False), "w:1", 30.0)
        assert isinstance(held, leases.Lease)
        assert leases.succeed(held).named_by_composite is named, (org_id, job)
    # no hook ran above: evaluating now fires what a and b completed (either, both), once
    assert len(on_task_succeeded(tenant.org_id, "a")) == 2 and on_task_succeeded(tenant.org_id, "b") == []


def test_any_of_with_a_timeout_fires_at_the_timeout_and_not_again(app: Flask, client: FlaskClient,
                                                                  tenant: Tenant, processes: Processes) -> None:
    _put(client, tenant, [DAG[0], DAG[4]])
    a_task = _start(app, tenant.org_id, "a", send=False)  # created in this window, never completes (yet)
    assert sweep(tenant.org_id) == []  # not yet
    assert _runs(tenant.org_id, "timed") == 0
    time.sleep(2.2)
    fired = sweep(tenant.org_id)
    assert len(fired) == 1
    assert sweep(tenant.org_id) == []  # the window fired: once
    processes.worker()
    enqueue(app, fired[0])  # what the beat does after its poll
    assert wait_for(lambda: _runs(tenant.org_id, "timed", "succeeded") == 1, timeout=60)
    enqueue(app, a_task)  # a completes later, in the same window
    assert wait_for(lambda: _runs(tenant.org_id, "a", "succeeded") == 1, timeout=60)
    time.sleep(1)
    assert _runs(tenant.org_id, "timed") == 1
    assert sweep(tenant.org_id) == []  # no upstream activity since: no new window


def test_the_beat_poll_fires_the_timeout_once(app: Flask, client: FlaskClient, tenant: Tenant,
                                              processes: Processes) -> None:
    _put(client, tenant, [DAG[0], _job("timed", trigger={"any_of": ["a"], "timeout": "1s"})])
    processes.worker()
    processes.beat()
    assert wait_for(lambda: _runs(tenant.org_id, "timed", "succeeded") == 1, timeout=60)
    time.sleep(2.5)  # several polls and timeouts later: no upstream activity, no new window
    assert _runs(tenant.org_id, "timed") == 1


def _succeed(app: Flask, processes: Processes, org_id: uuid.UUID, job: str) -> None:
    """Run ``job`` on the worker and wait until the worker is done with it, its composite hook too."""
    _start(app, org_id, job)
    assert wait_for(lambda: _runs(org_id, job, "succeeded") >= 1, timeout=60)
    processes.wait_idle()


def test_a_nested_tree_fires_once_per_round(app: Flask, client: FlaskClient, tenant: Tenant,
                                            processes: Processes) -> None:
    _put(client, tenant, [_job("a"), _job("b"), _job("c"),
                          _job("nested", trigger={"all_of": ["a", {"any_of": ["b", "c"]}]})])
    processes.worker()
    _succeed(app, processes, tenant.org_id, "a")
    time.sleep(0.5)
    assert _runs(tenant.org_id, "nested") == 0  # a alone: the any_of still waits
    _succeed(app, processes, tenant.org_id, "c")
    assert wait_for(lambda: _runs(tenant.org_id, "nested", "succeeded") == 1, timeout=60)
    _succeed(app, processes, tenant.org_id, "b")  # round 1 has b, not yet a
    time.sleep(0.5)
    assert _runs(tenant.org_id, "nested") == 1
    _start(app, tenant.org_id, "a")
    assert wait_for(lambda: _runs(tenant.org_id, "nested", "succeeded") == 2, timeout=60)
    windows = db.session.scalars(select(Task.window).join(Job, Job.id == Task.job_id)
                                 .where(Job.name == "nested", Job.org_id == tenant.org_id)).all()
    assert sorted(window["composite_round"] for window in windows) == [0, 1]


def test_a_when_node_joins_a_tree_through_the_query_service(app: Flask, client: FlaskClient, tenant: Tenant,
                                                            processes: Processes, monkeypatch: Any) -> None:
    import workers.app
    from tests.integration.scheduler.test_reactive_batched import EMIT, READS_EMITTED, _publish

    monkeypatch.setattr(workers.app, "dataset_updated", lambda *args: None)  # the hook is called below

    _put(client, tenant, [EMIT, _job("a"), _job("gated", inputs=READS_EMITTED, trigger={
        "all_of": ["a", {"when": "SELECT count(*) >= 2 FROM emitted"}]})])
    _publish(app, tenant.org_id, "emit", [{"k": 1}])
    processes.worker()
    _succeed(app, processes, tenant.org_id, "a")
    assert sweep(tenant.org_id) == []  # one row: the condition is false
    _publish(app, tenant.org_id, "emit", [{"k": 2}])
    emitted = datasets.get_dataset(tenant.org_id, "emitted").id
    assert composite.on_dataset_updated(tenant.org_id, uuid.uuid4()) == []  # not an input of gated
    assert len(composite.on_dataset_updated(tenant.org_id, emitted)) == 1  # a succeeded, the condition holds
    assert sweep(tenant.org_id) == []  # round 1: a has not run again


def test_tasks_inside_dag_runs_fire_composites_but_not_their_own_dag_job_twice(
        app: Flask, client: FlaskClient, tenant: Tenant, processes: Processes) -> None:
    upstream = [_job("p", outputs=1), _job("q", inputs=[{"from": {"job": "p", "output": 0}}])]
    _put(client, tenant, upstream)
    response = client.put("/v1/dags/watch", data=json.dumps([_job("after_q", trigger={"any_of": ["q"]}),
                                                             _job("s"), _job("own", trigger={"any_of": ["s"]})]),
                          headers={**tenant.headers("writer"), "Content-Type": "application/json"})
    assert response.status_code == 200, response.json
    processes.worker()
    for dag in ("composite", "watch"):
        started = client.post(f"/v1/dags/{dag}/runs", json={}, headers=tenant.headers("writer"))
        assert started.status_code == 202, started.json

    def succeeded_tasks(job: str) -> int:
        db.session.expire_all()
        count = db.session.scalar(select(func.count()).select_from(Task).join(Job, Job.id == Task.job_id).where(
            Job.org_id == tenant.org_id, Job.name == job, Task.state == "succeeded"))
        db.session.rollback()
        return count

    # after_q: in the watch DAG run, and once more fired by q of the other DAG run
    assert wait_for(lambda: succeeded_tasks("after_q") == 2, timeout=60)
    assert wait_for(lambda: succeeded_tasks("own") == 1, timeout=60)
    time.sleep(1)
    assert sweep(tenant.org_id) == []
    # own ran in the watch DAG run only: s of that same run does not fire it again
    causes = dict(db.session.execute(select(Job.name, func.count()).join(Run, Run.job_id == Job.id)
                                     .where(Run.org_id == tenant.org_id, Run.cause == "composite")
                                     .group_by(Job.name)).all())
    assert causes == {"after_q": 1}
    assert succeeded_tasks("own") == 1
