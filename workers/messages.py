"""``execute_task`` messages written straight onto a Redis broker's queue.

Why: publishing through ``Celery.send_task`` costs about 0.4 ms, most of it kombu building a
new Redis client object for every message; on the manual-trigger path that is a tenth of the
whole dispatch. The message is Celery's task protocol 2, exactly as kombu's Redis transport
stores it (a JSON envelope around a base64 body, LPUSHed onto the queue's list), so the worker
cannot tell the two apart; ``tests/integration/workers/test_messages.py`` compares it with what ``send_task``
writes, field by field, so a Celery or kombu upgrade that changes the format fails there.

Only the plain case takes this path: a ``redis://``, ``rediss://`` or ``unix://`` broker, no
countdown, no task routes and no key prefix in the transport options. Everything else goes
through ``send_task``.

Fairness: an org's messages go onto one of ``TRACE_BROKER_ORG_QUEUES`` queues named
``<default queue>.<n>``, ``n`` a hash of the org id (:func:`org_queue`); the worker consumes all
of them and the default queue with kombu's round-robin order, so a flooding org's backlog sits in
its own list while another org's message is taken next (docs/reliability.md, Fairness).
"""

from __future__ import annotations

import base64
import json
import os
import socket
import threading
import uuid
from typing import Any

import redis
from celery import Celery

_DIRECT_SCHEMES = ("redis://", "rediss://", "unix://")
_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
_clients: dict[tuple[str, int], redis.Redis] = {}
# Seconds a publish may wait on the broker: a manual trigger publishes inside its open
# transaction (tracecore.execution.runs.create_enqueued_run), which must not wait on a hung broker for long.
PUBLISH_TIMEOUT = 5.0
_clients_lock = threading.Lock()


def direct_queue(celery: Celery) -> str | None:
    """The queue an ``execute_task`` message can be LPUSHed onto, or None when only
    ``send_task`` knows where it goes."""
    conf = celery.conf
    if not str(conf.broker_url or "").startswith(_DIRECT_SCHEMES):
        return None
    if conf.task_routes or (conf.broker_transport_options or {}).get("global_keyprefix"):
        return None
    if conf.task_protocol != 2 or conf.task_serializer != "json":
        return None
    return str(conf.task_default_queue)


def queue_names(default_queue: str, org_queues: int) -> list[str]:
    """Every queue a worker consumes: the default queue first, then the org queues."""
    return [default_queue, *(f"{default_queue}.{n}" for n in range(max(0, org_queues)))]


def org_queue(default_queue: str, org_queues: int, org_id: uuid.UUID | str | None) -> str:
    """The queue of an org's ``execute_task`` messages (the default queue when there are no org
    queues or the sender does not know the org).

    A fixed number of queues and a hash, not one queue per org: the worker's BRPOP names every
    queue it consumes, so their set must be known when it starts (stochastic fairness queueing:
    two orgs that hash alike share a queue, first in first out)."""
    if org_queues <= 0 or org_id is None:
        return default_queue
    number = (org_id if isinstance(org_id, uuid.UUID) else uuid.UUID(str(org_id))).int % org_queues
    return f"{default_queue}.{number}"


def task_message(celery: Celery, name: str, args: list[Any], *, ignore_result: bool = True,
                 message_id: str | None = None, queue: str | None = None) -> bytes:
    """The broker's bytes for one task message (protocol 2, JSON, as kombu's Redis transport stores it);
    ``queue`` (default: the default queue) is its routing key, where kombu restores it when unacked."""
    message_id = message_id or str(uuid.uuid4())
    body = json.dumps([args, {}, _EMBED]).encode()
    argsrepr = repr(args)
    headers: dict[str, Any] = {
        "lang": "py", "task": name, "id": message_id, "shadow": None, "eta": None, "expires": None,
        "group": None, "group_index": None, "retries": 0, "timelimit": [None, None], "root_id": message_id,
        "parent_id": None, "argsrepr": argsrepr, "kwargsrepr": "{}", "origin": _origin(),
        "ignore_result": ignore_result, "replaced_task_nesting": 0, "stamped_headers": None, "stamps": {},
    }
    envelope = {
        "body": base64.b64encode(body).decode(), "content-encoding": "utf-8", "content-type": "application/json",
        "headers": headers,
        "properties": {
            "correlation_id": message_id, "reply_to": celery.thread_oid, "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": queue or str(celery.conf.task_default_queue)},
            "priority": 0, "body_encoding": "base64", "delivery_tag": str(uuid.uuid4()),
        },
    }
    return json.dumps(envelope).encode()


def publish(celery: Celery, queue: str, name: str, args: list[Any]) -> None:
    """LPUSH one task message onto ``queue`` (:func:`direct_queue` or an :func:`org_queue` of it)."""
    _client(str(celery.conf.broker_url)).lpush(queue, task_message(celery, name, args, queue=queue))


def _client(url: str) -> redis.Redis:
    """One client per broker URL and process (a forked child must not share its parent's sockets)."""
    key = (url, os.getpid())
    client = _clients.get(key)
    if client is None:
        with _clients_lock:
            client = _clients.get(key)
            if client is None:
                client = _clients[key] = redis.Redis.from_url(url, socket_timeout=PUBLISH_TIMEOUT,
                                                              socket_connect_timeout=PUBLISH_TIMEOUT)
    return client


def _origin() -> str:
    """What Celery's ``anon_nodename()`` answers: the sender's pid and host."""
    return f"gen{os.getpid()}@{socket.gethostname()}"
