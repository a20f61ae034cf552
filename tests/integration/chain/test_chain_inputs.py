"""Chain datasets as DAG inputs: ``{from: {dataset: anvil_logs}}`` and seed 002's ``block_follower``
(output 0 blocks, 1 transactions, 2 logs of TRACE_DEFAULT_CHAIN). A reactive job of any org runs
once per chain update, with the block range in its window and, after a reorg, the reorg; its
task reads the chain dataset it names through the task query path."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select

from scheduler.reactive import on_dataset_updated
from tests.conftest import Tenant, leased_capability
from tracecore.data.publish import pinned_inputs
from tracecore.db.engine import db
from tracecore.execution.runs import Run, Task
from tracecore.query.saved import task_query
from workers.chain.follower import ChainFollower

from .conftest import AnvilNode
from .test_follower import caught_up, register

DAG = [
    {"name": "on_logs", "runtime": "platform", "operator": "noop", "activation": "reactive",
     "inputs": [{"from": {"dataset": "anvil_logs"}}], "outputs": 0},
    {"name": "seed_002", "runtime": "platform", "operator": "noop", "activation": "reactive",
     "inputs": [{"from": {"job": "block_follower", "output": 2}}], "outputs": 0},
]


@pytest.fixture
def following(app: Flask, anvil: Any) -> Iterator[tuple[AnvilNode, ChainFollower]]:
    node = anvil(block_time=None)
    node.deploy_emitter()
    register(node)
    stop = threading.Event()
    follower = ChainFollower(app, "anvil", "inputs-test", stop)
    thread = threading.Thread(target=follower.run, daemon=True)
    thread.start()
    caught_up(node)
    yield node, follower
    stop.set()
    thread.join(timeout=15)


def _save(client: FlaskClient, tenant: Tenant, dag: list[dict[str, Any]], name: str = "chain") -> Any:
    return client.put(f"/v1/dags/{name}", data=json.dumps(dag),
                      headers={**tenant.headers("writer"), "Content-Type": "application/json"})


def _windows(tenant: Tenant) -> list[dict[str, Any]]:
    db.session.expire_all()
    return [window for (window,) in db.session.execute(
        select(Task.window).join(Run, Run.id == Task.run_id).where(Run.org_id == tenant.org_id, Run.cause == "data"))]


def _deliver(follower: ChainFollower, seen: int) -> int:
    """Send the follower's committed updates to the reactive hook, as its Celery message does."""
    for done in follower.committed[seen:]:
        for dataset_id, version in done.versions:
            on_dataset_updated(dataset_id, version)
    return len(follower.committed)


def test_both_input_forms_name_the_chain_datasets(following: tuple[AnvilNode, ChainFollower], app: Flask,
                                                  client: FlaskClient, tenant: Tenant) -> None:
    assert _save(client, tenant, DAG).status_code == 200
    answer = client.get("/v1/dags/chain", headers=tenant.headers()).get_json()
    jobs = {job["name"]: job["spec"] for job in answer["jobs"]}
    assert jobs["on_logs"]["inputs"] == [{"dataset": "anvil_logs"}]
    pins = [pinned_inputs(tenant.org_id, jobs[name]) for name in ("on_logs", "seed_002")]
    assert [[pin["dataset"] for pin in pinned] for pinned in pins] == [["anvil_logs"], ["anvil_logs"]]


def test_an_unknown_dataset_input_is_refused_at_the_field(app: Flask, client: FlaskClient, tenant: Tenant) -> None:
    answer = _save(client, tenant, [{**DAG[0], "inputs": [{"from": {"dataset": "nochain_logs"}}]}])
    assert answer.status_code == 400
    errors = answer.get_json()["error"]["details"]["errors"]
    assert [(e["code"], e["path"]) for e in errors] == [("unknown_input_dataset", "jobs[0].inputs[0].from.dataset")]
    mixed = _save(client, tenant, [{**DAG[0], "inputs": [{"from": {"dataset": "anvil_logs", "job": "x"}}]}])
    assert mixed.status_code == 400


def test_a_reactive_job_runs_per_chain_update_with_reorgs_in_its_window(
        following: tuple[AnvilNode, ChainFollower], app: Flask, client: FlaskClient, tenant: Tenant,
        make_tenant: Any) -> None:
    node, follower = following
    other = make_tenant("globex")
    assert _save(client, tenant, DAG[:1]).status_code == 200
    assert _save(client, other, DAG[1:]).status_code == 200
    seen = len(follower.committed)
    node.send_txs(2)
    node.mine(2)
    caught_up(node)
    seen = _deliver(follower, seen)
    windows = _windows(tenant)
    assert windows and all(w["dataset"] == "anvil_logs" and w["chain"] == "anvil" for w in windows)
    assert max(w["block_end"] for w in windows) == node.block_number()
    assert len(_windows(other)) == len(windows), "every org's watcher gets every update"
    orphaned = node.reorg(2, txs=2)
    node.mine(1)
    caught_up(node)
    _deliver(follower, seen)
    reorgs = [w["reorg"] for w in _windows(tenant) if "reorg" in w]
    assert reorgs and reorgs[0]["orphaned_block_hashes"] == orphaned and reorgs[0]["depth"] == 2


def test_a_task_reads_the_chain_dataset_it_names(following: tuple[AnvilNode, ChainFollower], app: Flask,
                                                 client: FlaskClient, tenant: Tenant) -> None:
    node, _ = following
    node.send_txs(3)
    caught_up(node)
    assert _save(client, tenant, DAG[:1]).status_code == 200
    capability = leased_capability(app, tenant.org_id, "on_logs")
    status, result = task_query(capability, {"sql": "SELECT count(*) AS n FROM anvil_logs"})
    assert status == 200, result
    expected = sum(len(receipt["logs"]) for n in range(node.block_number() + 1)
                   for receipt in node.rpc("eth_getBlockReceipts", [hex(n)]) or [])
    assert result["rows"] == [{"n": expected}] and expected > 0
