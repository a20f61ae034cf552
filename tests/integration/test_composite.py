"""Composite triggers with a real worker: any_of fires once, all_of waits for all, and an any_of
with a timeout fires at the timeout and not again when its upstream completes later."""

from __future__ import annotations

import json
import time
import uuid

from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select

from scheduler.composite import fire_timeouts, on_task_succeeded
from tests.conftest import Processes, Tenant, wait_for
from tracecore import runs
from tracecore.dags import Job
from tracecore.db import db
from tracecore.runs import Run
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
    a_task = _start(app, tenant.org_id, "a")
    assert wait_for(lambda: _runs(tenant.org_id, "either", "succeeded") == 1, timeout=60)
    assert on_task_succeeded(a_task) == []  # a duplicate delivery of the hook fires nothing
    time.sleep(1)
    assert _runs(tenant.org_id, "either") == 1
    assert _runs(tenant.org_id, "both") == 0  # b has not run yet
    _start(app, tenant.org_id, "b")
    assert wait_for(lambda: _runs(tenant.org_id, "both", "succeeded") == 1, timeout=60)
    time.sleep(1)
    assert _runs(tenant.org_id, "both") == 1 and _runs(tenant.org_id, "either") == 1


def test_any_of_with_a_timeout_fires_at_the_timeout_and_not_again(app: Flask, client: FlaskClient,
                                                                  tenant: Tenant, processes: Processes) -> None:
    _put(client, tenant, [DAG[0], DAG[4]])
    a_task = _start(app, tenant.org_id, "a", send=False)  # created in this window, never completes (yet)
    assert fire_timeouts(tenant.org_id) == []  # not yet
    assert _runs(tenant.org_id, "timed") == 0
    time.sleep(2.2)
    fired = fire_timeouts(tenant.org_id)
    assert len(fired) == 1
    assert fire_timeouts(tenant.org_id) == []  # the window fired: once
    processes.worker()
    enqueue(app, fired[0])  # what the beat does after its poll
    assert wait_for(lambda: _runs(tenant.org_id, "timed", "succeeded") == 1, timeout=60)
    enqueue(app, a_task)  # a completes later, in the same window
    assert wait_for(lambda: _runs(tenant.org_id, "a", "succeeded") == 1, timeout=60)
    time.sleep(1)
    assert _runs(tenant.org_id, "timed") == 1
    assert fire_timeouts(tenant.org_id) == []  # no upstream activity since: no new window


def test_the_beat_poll_fires_the_timeout_once(app: Flask, client: FlaskClient, tenant: Tenant,
                                              processes: Processes) -> None:
    _put(client, tenant, [DAG[0], _job("timed", trigger={"any_of": ["a"], "timeout": "1s"})])
    processes.worker()
    processes.beat()
    assert wait_for(lambda: _runs(tenant.org_id, "timed", "succeeded") == 1, timeout=60)
    time.sleep(2.5)  # several polls and timeouts later: no upstream activity, no new window
    assert _runs(tenant.org_id, "timed") == 1
