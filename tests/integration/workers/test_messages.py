"""workers/messages.py: execute_task messages written straight onto the Redis queue.

The message must be the one ``send_task`` would have written (a real Redis holds both for the
comparison), and a real worker must run it and acknowledge it (acks_late keeps a delivered
message in kombu's ``unacked`` hash until the task returns).
"""

from __future__ import annotations

import base64
import json
import uuid
from typing import Any

import pytest
import redis
from celery import Celery
from flask import Flask
from flask.testing import FlaskClient

from tests.conftest import Processes, Tenant, wait_for
from tests.integration.workers.test_dispatcher import NOOP, put_dag, read_run, trigger
from tracecore.settings import Settings
from workers import messages
from workers.app import EXECUTE_TASK


def _celery(settings: Settings, queue: str, **conf: Any) -> Celery:
    celery = Celery("compare", broker=settings.broker_url, backend=settings.broker_url, set_as_current=False)
    celery.conf.update(task_default_queue=queue, task_serializer="json", **conf)
    return celery


def _envelope(raw: bytes) -> dict[str, Any]:
    envelope = json.loads(raw)
    envelope["body"] = json.loads(base64.b64decode(envelope["body"]))
    return envelope


def test_the_message_is_the_one_send_task_writes(settings: Settings) -> None:
    queue = f"compare-{uuid.uuid4().hex}"
    celery = _celery(settings, queue)
    broker = redis.Redis.from_url(settings.broker_url or "")
    task_id = str(uuid.uuid4())
    try:
        result = celery.send_task(EXECUTE_TASK, args=[task_id], ignore_result=True)
        theirs = _envelope(broker.rpop(queue))  # type: ignore[arg-type]
        assert messages.direct_queue(celery) == queue
        messages.publish(celery, queue, EXECUTE_TASK, [task_id])
        ours_raw = broker.rpop(queue)
        ours = _envelope(messages.task_message(celery, EXECUTE_TASK, [task_id], message_id=result.id))
    finally:
        broker.delete(queue)
    assert ours_raw is not None and _envelope(ours_raw)["body"] == theirs["body"]
    # Every field the same but the per-delivery tag, which kombu makes unique per message.
    assert ours["properties"].pop("delivery_tag") != theirs["properties"].pop("delivery_tag")
    assert ours == theirs
    assert theirs["body"] == [[task_id], {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]


def test_an_org_queue_message_is_the_one_send_task_writes_to_that_queue(settings: Settings) -> None:
    default = f"compare-{uuid.uuid4().hex}"
    org_queue = messages.org_queue(default, 16, uuid.uuid4())
    assert org_queue.startswith(f"{default}.") and org_queue in messages.queue_names(default, 16)
    celery = _celery(settings, default)
    broker = redis.Redis.from_url(settings.broker_url or "")
    task_id = str(uuid.uuid4())
    try:
        result = celery.send_task(EXECUTE_TASK, args=[task_id], ignore_result=True, queue=org_queue)
        theirs = _envelope(broker.rpop(org_queue))  # type: ignore[arg-type]
        messages.publish(celery, org_queue, EXECUTE_TASK, [task_id])
        ours_raw = broker.rpop(org_queue)
        ours = _envelope(messages.task_message(celery, EXECUTE_TASK, [task_id], message_id=result.id,
                                               queue=org_queue))
        assert broker.llen(default) == 0  # nothing went to the default queue
    finally:
        broker.delete(default, org_queue)
    assert ours_raw is not None and _envelope(ours_raw)["properties"]["delivery_info"]["routing_key"] == org_queue
    assert ours["properties"].pop("delivery_tag") != theirs["properties"].pop("delivery_tag")
    assert ours == theirs  # the routing key too: kombu restores an unacked message onto that queue


def test_an_org_has_one_queue_and_orgs_spread_over_all() -> None:
    orgs = [uuid.uuid4() for _ in range(400)]
    assert {messages.org_queue("trace", 16, org) for org in orgs} == set(messages.queue_names("trace", 16)[1:])
    assert all(messages.org_queue("trace", 16, org) == messages.org_queue("trace", 16, str(org)) for org in orgs)
    assert messages.org_queue("trace", 0, orgs[0]) == "trace"  # 0: the one shared queue
    assert messages.org_queue("trace", 16, None) == "trace"  # a sender that does not know the org


@pytest.mark.parametrize(("broker_url", "conf"), [
    ("amqp://guest@localhost//", {}),
    ("sentinel://localhost:26379", {}),
    (None, {"task_routes": {EXECUTE_TASK: {"queue": "elsewhere"}}}),
    (None, {"broker_transport_options": {"global_keyprefix": "tenant-a:"}}),
    (None, {"task_serializer": "pickle"}),
], ids=["amqp", "sentinel", "routes", "key-prefix", "pickle"])
def test_anything_but_the_plain_case_goes_through_send_task(settings: Settings, broker_url: str | None,
                                                            conf: dict[str, Any]) -> None:
    celery = _celery(settings, "trace")
    celery.conf.update(conf)
    if broker_url:
        celery.conf.broker_url = broker_url
    assert messages.direct_queue(celery) is None


def test_a_worker_runs_and_acknowledges_a_direct_message(app: Flask, client: FlaskClient, tenant: Tenant,
                                                         processes: Processes, settings: Settings) -> None:
    celery: Celery = app.extensions["celery"]
    assert messages.direct_queue(celery) == "trace"  # the manual trigger below takes the direct path
    broker = redis.Redis.from_url(settings.broker_url or "")
    processes.worker()
    put_dag(client, tenant, "direct", NOOP)
    run_ids = [trigger(client, tenant, "hello") for _ in range(3)]
    for run_id in run_ids:
        wait_for(lambda run_id=run_id: read_run(client, tenant, run_id)["status"] == "succeeded", timeout=60,
                 message=f"run {run_id} to succeed")
    # acks_late: kombu keeps each delivered message in `unacked` until the task returned.
    wait_for(lambda: broker.hlen("unacked") == 0, timeout=10, message="every message to be acknowledged")
    assert all(broker.llen(queue) == 0 for queue in messages.queue_names("trace", settings.broker_org_queues))
