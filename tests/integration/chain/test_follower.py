"""The follower against a real anvil: the hot tables equal the node's canonical chain, hash for
hash, transaction for transaction, log for log; reorgs (anvil_reorg, anvil_rollback) are found
by parent hashes and replaced in one transaction with a chain_reorgs row and an update whose
window names the orphaned hashes; a reorg past finality stops the chain; a second follower waits
for the lease and takes over when the first one is gone, with no gap and no duplicate."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import select, text

from tests.conftest import wait_for
from tracecore import events
from tracecore.chain import chains, registration
from tracecore.chain.hot import ChainReorg
from tracecore.data.datasets import DatasetVersion
from tracecore.db.engine import db
from tracecore.settings import SETTINGS_KEY
from workers.chain.follower import ChainFollower

from .conftest import AnvilNode


def register(node: AnvilNode, *, depth: int = 64, ws: bool = True, name: str = "anvil",
             urls: list[str] | None = None) -> chains.Chain:
    chain = registration.register(chains.parse_spec({
        "name": name, "chain_id": 31337, "rpc_urls": urls or [node.rpc_url],
        **({"ws_url": node.ws_url} if ws else {}), "finality": {"depth": depth}}))
    db.session.commit()
    return chain


@pytest.fixture
def follow(app: Flask) -> Iterator[Callable[..., ChainFollower]]:
    """Start followers in threads (as `trace follow` does); all are stopped at the end."""
    running: list[tuple[threading.Event, threading.Thread]] = []

    def start(owner: str = "test-follower", chain: str = "anvil") -> ChainFollower:
        stop = threading.Event()
        follower = ChainFollower(app, chain, owner, stop)
        thread = threading.Thread(target=follower.run, daemon=True)
        thread.start()
        running.append((stop, thread))
        return follower

    yield start
    for stop, thread in running:
        stop.set()
        thread.join(timeout=15)


def canonical(node: AnvilNode, upto: int) -> dict[str, Any]:
    """The node's chain 0..upto: block hashes, (block, tx index) -> tx hash, (block, log index) -> data."""
    blocks, txs, logs = {}, {}, {}
    for n in range(upto + 1):
        block = node.rpc("eth_getBlockByNumber", [hex(n), True])
        blocks[n] = block["hash"]
        for tx in block["transactions"]:
            txs[(n, int(tx["transactionIndex"], 16))] = tx["hash"]
        for receipt in node.rpc("eth_getBlockReceipts", [hex(n)]) or []:
            for entry in receipt["logs"]:
                logs[(n, int(entry["logIndex"], 16))] = (entry["transactionHash"], entry["data"])
    return {"blocks": blocks, "txs": txs, "logs": logs}


def stored(upto: int) -> dict[str, Any]:
    db.session.rollback()
    blocks = {r[0]: "0x" + bytes(r[1]).hex() for r in db.session.execute(text(
        "SELECT block_number, block_hash FROM chain_blocks WHERE chain = 'anvil' AND block_number <= :n"), {"n": upto})}
    txs = {(r[0], r[1]): "0x" + bytes(r[2]).hex() for r in db.session.execute(text(
        "SELECT block_number, transaction_index, transaction_hash FROM chain_transactions "
        "WHERE chain = 'anvil' AND block_number <= :n"), {"n": upto})}
    logs = {(r[0], r[1]): ("0x" + bytes(r[2]).hex(), "0x" + bytes(r[3]).hex()) for r in db.session.execute(text(
        "SELECT block_number, log_index, transaction_hash, data FROM chain_logs "
        "WHERE chain = 'anvil' AND block_number <= :n"), {"n": upto})}
    db.session.rollback()
    return {"blocks": blocks, "txs": txs, "logs": logs}


def ingested() -> int:
    db.session.rollback()
    value = db.session.scalar(text("SELECT coalesce(ingested_block, -1) FROM chains WHERE name = 'anvil'"))
    db.session.rollback()
    return int(value if value is not None else -1)


def caught_up(node: AnvilNode, timeout: float = 30) -> int:
    """Wait until the hot tables hold the node's current head; answers it."""
    head = node.block_number()
    wait_for(lambda: ingested() >= head and stored(head)["blocks"].get(head) ==
             node.rpc("eth_getBlockByNumber", [hex(head), False])["hash"], timeout=timeout,
             message=f"the follower to reach block {head}")
    return head


def test_follows_the_tip_hash_for_hash(anvil: Callable[..., AnvilNode], app: Flask,
                                       follow: Callable[..., ChainFollower]) -> None:
    node = anvil(block_time=0.3)
    node.deploy_emitter()
    register(node)
    follow()
    for _ in range(4):
        node.send_txs(6, legacy_every=3)
    head = caught_up(node)
    assert head >= 4
    assert stored(head) == canonical(node, head)
    assert stored(head)["logs"], "the emitter's transactions logged"
    versions = db.session.scalars(select(DatasetVersion.partition_key).where(
        DatasetVersion.partition_key.is_not(None))).all()
    assert f"blocks:{head}-{head}" in versions or any(v.endswith(f"-{head}") for v in versions)


def test_polling_alone_follows_too(anvil: Callable[..., AnvilNode], app: Flask,
                                   follow: Callable[..., ChainFollower]) -> None:
    node = anvil(block_time=None)
    node.send_txs(3)
    register(node, ws=False)
    follow()
    node.mine(5)
    head = caught_up(node)
    assert stored(head) == canonical(node, head)


@pytest.mark.parametrize("depth", [1, 3, 10])
def test_reorgs_are_replaced_and_recorded(depth: int, anvil: Callable[..., AnvilNode], app: Flask,
                                          follow: Callable[..., ChainFollower]) -> None:
    node = anvil(block_time=None)
    node.deploy_emitter()
    node.mine(12)
    register(node)
    follow()
    caught_up(node)
    orphaned = node.reorg(depth, txs=3)
    node.mine(1)  # the head moves on above the replaced blocks
    head = caught_up(node)
    assert stored(head) == canonical(node, head)
    reorgs = db.session.scalars(select(ChainReorg)).all()
    assert len(reorgs) == 1 and reorgs[0].depth == depth and reorgs[0].old_hashes == orphaned
    assert reorgs[0].fork_block == head - depth
    windows = [v.meta["window"] for v in db.session.scalars(select(DatasetVersion)) if "reorg" in v.meta.get(
        "window", {})]
    assert windows and windows[0]["reorg"]["orphaned_block_hashes"] == orphaned
    assert windows[0]["reorg"]["fork_block"] == head - depth


def test_rollback_then_new_blocks(anvil: Callable[..., AnvilNode], app: Flask,
                                  follow: Callable[..., ChainFollower]) -> None:
    node = anvil(block_time=None)
    node.mine(10)
    register(node)
    follow()
    caught_up(node)
    dropped = node.rollback(4)
    node.send_txs(2)  # new blocks at the dropped heights
    node.mine(4)
    head = caught_up(node)
    assert stored(head) == canonical(node, head)
    reorg = db.session.scalars(select(ChainReorg)).one()
    assert reorg.old_hashes == dropped[:reorg.depth] or set(reorg.old_hashes) <= set(dropped)


def test_a_reorg_past_finality_stops_the_chain(anvil: Callable[..., AnvilNode], app: Flask,
                                               follow: Callable[..., ChainFollower]) -> None:
    node = anvil(block_time=None)
    node.mine(20)
    register(node, depth=2)
    announced: list[dict[str, Any]] = []

    def receiver(sender: Any, **data: Any) -> None:
        announced.append(data)

    events.chain_ingestion_stopped.connect(receiver)
    follow()
    head = caught_up(node)
    before = stored(head)
    node.reorg(5, txs=1)
    node.mine(1)

    def stopped() -> bool:
        db.session.rollback()
        return db.session.scalar(text("SELECT state FROM chains WHERE name = 'anvil'")) == "stopped"

    wait_for(stopped, message="the chain to stop")
    chain = chains.get_chain("anvil")
    assert "finality" in (chain.stopped_reason or "")
    assert stored(head) == before, "nothing was rewritten"
    assert db.session.scalars(select(ChainReorg.beyond_finality)).all() == [True]
    wait_for(lambda: announced, message="the system event")
    events.chain_ingestion_stopped.disconnect(receiver)
    assert announced[0]["chain"] == "anvil" and announced[0]["fork_block"] == 16 and announced[0]["depth"] == 5


def test_another_follower_takes_over_without_gap_or_duplicate(anvil: Callable[..., AnvilNode], app: Flask,
                                                              follow: Callable[..., ChainFollower]) -> None:
    node = anvil(block_time=0.2)
    register(node)
    first = follow(owner="first")
    second = follow(owner="second")
    caught_up(node)
    db.session.rollback()
    holder = db.session.scalar(text("SELECT lease_owner FROM chains WHERE name = 'anvil'"))
    db.session.rollback()
    assert holder in ("first", "second")
    gone = first if holder == "first" else second
    gone.stop.set()  # stops without releasing? run() releases on a clean stop; simulate a crash instead
    wait_for(lambda: gone.lease is None, message="the first follower to stop")
    db.session.execute(text("UPDATE chains SET lease_expires_at = now() - interval '1 second' WHERE name = 'anvil'"))
    db.session.commit()
    head = caught_up(node, timeout=40)
    db.session.rollback()
    assert db.session.scalar(text("SELECT lease_owner FROM chains WHERE name = 'anvil'")) != holder
    counts = db.session.execute(text("SELECT count(*), count(DISTINCT block_number), min(block_number), "
                                     "max(block_number) FROM chain_blocks WHERE chain = 'anvil'")).one()
    assert counts[0] == counts[1] == counts[3] - counts[2] + 1, "no gap, no duplicate"
    assert stored(head) == canonical(node, head)


def test_updates_reach_the_query_service(anvil: Callable[..., AnvilNode], app: Flask, client: Any,
                                         tenant: Any, follow: Callable[..., ChainFollower]) -> None:
    node = anvil(block_time=None)
    node.deploy_emitter()
    node.send_txs(5, one_block=True)
    register(node)
    follow()
    head = caught_up(node)
    answer = client.post("/v1/query", json={"sql": "SELECT count(*) AS n, max(block_number) AS top FROM anvil_blocks"},
                         headers=tenant.headers("reader"))
    assert answer.status_code == 200, answer.get_json()
    row = answer.get_json()["rows"][0]
    assert row == {"n": head + 1, "top": head}
    logs = client.post("/v1/query", json={"sql": "SELECT count(*) AS n FROM anvil_logs"},
                       headers=tenant.headers("reader")).get_json()["rows"][0]["n"]
    assert logs == len(canonical(node, head)["logs"])
    assert uuid.UUID(str(tenant.org_id))


def test_a_finality_tag_is_the_nodes_own_answer(anvil: Callable[..., AnvilNode], app: Flask,
                                                follow: Callable[..., ChainFollower]) -> None:
    node = anvil(block_time=None)
    node.mine(100)
    chain = registration.register(chains.parse_spec({"name": "anvil", "chain_id": 31337, "rpc_urls": [node.rpc_url],
                                                     "finality": {"tag": "finalized"}}))
    db.session.commit()
    assert chain.finality == {"tag": "finalized"}
    follow()
    caught_up(node)
    final = int(node.rpc("eth_getBlockByNumber", ["finalized", False])["number"], 16)
    assert 0 < final < node.block_number()

    def recorded() -> int | None:
        db.session.rollback()
        value = db.session.scalar(text("SELECT finalized_block FROM chains WHERE name = 'anvil'"))
        db.session.rollback()
        return value

    wait_for(lambda: recorded() == final, message="the node's finalized block to be recorded")


def test_a_catch_up_longer_than_the_lease_keeps_the_lease(anvil: Callable[..., AnvilNode], app: Flask,
                                                           follow: Callable[..., ChainFollower],
                                                           caplog: pytest.LogCaptureFixture) -> None:
    # A lease far shorter than the catch-up (hundreds of 4-block commits): the follower renews it
    # between commits instead of losing it mid-way and starting over (found by benchmarks/ingest.py:
    # 2,000 blocks behind, the lease ran out every TTL and each loss threw away a fetched batch).
    app.config[SETTINGS_KEY] = replace(app.config[SETTINGS_KEY], chain_lease_ttl=0.6, chain_catchup_batch=4)
    node = anvil(block_time=None)
    node.mine(400)
    register(node)
    follower = follow()
    head = caught_up(node, timeout=90)
    assert stored(head)["blocks"] == canonical(node, head)["blocks"]
    assert len(follower.committed) >= 100
    assert not [r for r in caplog.records if "lease lost" in r.getMessage()]
    db.session.rollback()
    owner, fence = db.session.execute(text("SELECT lease_owner, fence FROM chains WHERE name = 'anvil'")).one()
    db.session.rollback()
    assert follower.lease is not None and (owner, fence) == ("test-follower", follower.lease.fence)
