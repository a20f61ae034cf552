"""`trace follow` as real processes: TRACE_CHAINS registers the chain at start, two followers
compete for its lease, the writer is SIGKILLed mid-ingestion and the other takes over with no gap
and no duplicate; with the first RPC URL dead, ingestion goes on through the second."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable

from flask import Flask
from sqlalchemy import text

from tests.conftest import Processes, wait_for
from tracecore.db.engine import db

from .conftest import AnvilNode
from .test_follower import canonical, caught_up, stored


def _dead_url() -> str:
    with socket.socket() as probe:  # a port nothing listens on (closed right away)
        probe.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{probe.getsockname()[1]}"


def _env(node: AnvilNode, *urls: str) -> dict[str, str]:
    chain = {"name": "anvil", "chain_id": 31337, "rpc_urls": list(urls) or [node.rpc_url], "ws_url": node.ws_url,
             "finality": {"depth": 64}}
    return {"TRACE_CHAINS": json.dumps([chain]), "TRACE_CHAIN_LEASE_TTL": "2", "TRACE_CHAIN_POLL_INTERVAL": "0.1"}


def _holder() -> str | None:
    db.session.rollback()
    owner = db.session.scalar(text("SELECT lease_owner FROM chains WHERE name = 'anvil'"))
    db.session.rollback()
    return owner


def test_sigkill_of_the_writer_hands_the_chain_over(anvil: Callable[..., AnvilNode], app: Flask,
                                                    processes: Processes,
                                                    kill_worker: Callable[..., None]) -> None:
    node = anvil(block_time=0.2)
    node.deploy_emitter()
    first = processes.start("follow", name="follow-1", env=_env(node))
    wait_for(lambda: _holder() is not None, timeout=60, message="a follower to take the chain")
    second = processes.start("follow", name="follow-2", env=_env(node))
    caught_up(node, timeout=60)
    holder = _holder()
    assert holder is not None and holder.endswith(f":{first.pid}"), holder
    node.send_txs(6, wait=False)
    kill_worker(first)  # mid-ingestion: blocks keep coming every 0.2 s
    wait_for(lambda: (_holder() or "").endswith(f":{second.pid}"), timeout=30,
             message="the second follower to take the lease")
    node.send_txs(4)
    head = caught_up(node, timeout=60)
    db.session.rollback()
    total, distinct, low, high = db.session.execute(text(
        "SELECT count(*), count(DISTINCT block_number), min(block_number), max(block_number) FROM chain_blocks "
        "WHERE chain = 'anvil'")).one()
    db.session.rollback()
    assert total == distinct == high - low + 1 and low == 0, "no gap, no duplicate"
    assert stored(head) == canonical(node, head)
    assert second.poll() is None, processes.log(second)


def test_a_dead_first_rpc_url_fails_over_to_the_second(anvil: Callable[..., AnvilNode], app: Flask,
                                                       processes: Processes) -> None:
    node = anvil(block_time=0.2)
    env = _env(node, _dead_url(), node.rpc_url)
    env["TRACE_CHAINS"] = json.dumps([{**json.loads(env["TRACE_CHAINS"])[0], "ws_url": None}])  # HTTP only
    processes.start("follow", name="follow", env=env)
    node.send_txs(3)
    head = caught_up(node, timeout=60)
    assert stored(head) == canonical(node, head)

    def health() -> list[dict[str, object]]:
        db.session.rollback()
        found = db.session.scalar(text("SELECT health FROM chains WHERE name = 'anvil'"))
        db.session.rollback()
        return list(found or [])

    wait_for(lambda: len(health()) == 2, message="the follower to report its endpoints' health")
    first, second = health()
    assert not first["ok"] and first["last_error"] and second["ok"], (first, second)
