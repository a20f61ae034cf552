"""A bounded reorg soak (``make soak`` runs the long one, ``benchmarks/ingest.py soak``): 20 random
reorgs and rollbacks of depth 1-10 on a real anvil while the follower ingests, some seen one by one,
some piled up before the follower looks; at the end the hot tables are the node's canonical chain,
hash for hash, transaction for transaction, log for log, with no duplicate, no gap and nothing
above the node's head."""

from __future__ import annotations

import random
import time
from collections.abc import Callable

from flask import Flask
from sqlalchemy import text

from tracecore.chain.chains import get_chain
from tracecore.db.engine import db
from workers.chain.follower import ChainFollower

from .conftest import AnvilNode
from .test_follower import canonical, caught_up, follow, register, stored  # noqa: F401  (follow: a fixture)

REORGS = 20
DUPLICATES = {
    "chain_blocks": "SELECT count(*) FROM (SELECT block_number FROM chain_blocks WHERE chain = 'anvil' "
                    "GROUP BY block_number HAVING count(*) > 1) d",
    "chain_transactions": "SELECT count(*) FROM (SELECT block_number, transaction_index FROM chain_transactions "
                          "WHERE chain = 'anvil' GROUP BY 1, 2 HAVING count(*) > 1) d",
    "chain_logs": "SELECT count(*) FROM (SELECT block_number, log_index FROM chain_logs WHERE chain = 'anvil' "
                  "GROUP BY 1, 2 HAVING count(*) > 1) d",
}


def reorg(node: AnvilNode, depth: int, salt: int) -> None:
    """``anvil_reorg`` with a fresh transaction in each new block: every replaced block gets a new hash.
    (``AnvilNode.reorg`` sends the same transactions each time; repeated over its own blocks it yields
    the very same blocks, which is no reorg.)"""
    fresh = [[node.tx_request(100 * salt + i), i] for i in range(depth)]
    node.rpc("anvil_reorg", [depth, fresh])


def test_random_reorgs_and_rollbacks_end_on_the_canonical_chain(
        anvil: Callable[..., AnvilNode], app: Flask, follow: Callable[..., ChainFollower]) -> None:  # noqa: F811
    rng = random.Random(13)
    node = anvil(block_time=None)
    node.deploy_emitter()
    node.mine(12)
    register(node)
    follower = follow()
    caught_up(node)
    done = {"reorg": 0, "rollback": 0}
    seen = 0  # reorgs of blocks the follower held, looked at before the next step
    for _ in range(REORGS):
        node.send_txs(rng.randint(0, 3))  # automine: a block per transaction
        node.mine(rng.randint(1, 4))
        one_by_one = rng.random() < 0.5
        if one_by_one:
            caught_up(node)
        depth = rng.randint(1, min(10, node.block_number() - 1))
        if rng.random() < 0.6:
            reorg(node, depth, salt=done["reorg"])
            done["reorg"] += 1
        else:
            node.rollback(depth)
            # a fresh transaction (another block than the dropped one), then fewer blocks than dropped,
            # as many, or more
            node.wait_receipt(node.rpc("eth_sendTransaction", [node.tx_request(5000 + done["rollback"])]))
            node.mine(rng.randint(0, depth + 1))
            done["rollback"] += 1
        if one_by_one:
            caught_up(node)
            seen += 1
        else:
            time.sleep(rng.uniform(0, 0.2))  # the next step may pile on before the follower looks
    node.mine(11)  # above every height the chain ever had
    head = caught_up(node, timeout=60)

    assert stored(head) == canonical(node, head)
    db.session.rollback()
    assert db.session.scalar(text("SELECT count(*) FROM chain_blocks WHERE chain = 'anvil'")) == head + 1, "no gap"
    assert db.session.scalar(text("SELECT max(block_number) FROM chain_blocks WHERE chain = 'anvil'")) == head
    assert {table: db.session.scalar(text(query)) for table, query in DUPLICATES.items()} == dict.fromkeys(
        DUPLICATES, 0)
    rows = db.session.execute(text("SELECT old_hashes, beyond_finality FROM chain_reorgs WHERE chain = 'anvil'")).all()
    db.session.rollback()
    assert seen <= len(rows) <= REORGS, "every reorg the follower held was recorded (piled-up ones may count once)"
    final = set(canonical(node, head)["blocks"].values())
    assert not any(set(old) & final for old, _ in rows), "a recorded reorg orphaned only blocks off the chain"
    assert not any(beyond for _, beyond in rows)
    assert get_chain("anvil").state == "following"
    assert done["reorg"] and done["rollback"]
    assert any(c.reorg for c in follower.committed)
