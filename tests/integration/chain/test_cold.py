"""Hot and cold as one view: compaction of final chunks into cryo Parquet while queries run
(every block counted exactly once throughout), pruning after the grace period, backfills written
as cryo 0.3.2 writes them (compared column by column with cryo itself), resumed without
rewriting, and the completeness check over both."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cryo
import pyarrow.parquet as pq
import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import text

from tests.conftest import Tenant, wait_for
from tracecore.chain import cold
from tracecore.chain.backfills import Backfill
from tracecore.db.engine import db
from tracecore.infra.storage import LocalObjectStore, object_store
from tracecore.settings import current_settings
from tracecore.tenancy import orgs
from workers.chain.backfill import run_chunk
from workers.chain.follower import ChainFollower

from .conftest import AnvilNode
from .test_follower import caught_up, register


@pytest.fixture
def follower(app: Flask) -> Iterator[Callable[[], ChainFollower]]:
    """A follower thread without its compactor: the tests compact by hand, at chosen moments."""
    stop = threading.Event()
    threads: list[threading.Thread] = []

    def start() -> ChainFollower:
        follower = ChainFollower(app, "anvil", "cold-test", stop)
        thread = threading.Thread(target=follower.run, daemon=True)
        thread.start()
        threads.append(thread)
        return follower

    yield start
    stop.set()
    for thread in threads:
        thread.join(timeout=15)


def installation_headers() -> dict[str, str]:
    org = orgs.create_org(f"ops-{uuid.uuid4().hex[:6]}")
    user = orgs.get_or_create_user(f"root-{uuid.uuid4().hex[:6]}@example.com", installation_admin=True)
    orgs.add_member(org, user, orgs.Role.admin)
    _, clear = orgs.issue_token(org.id, user.id, installation_admin=True)
    db.session.commit()
    return {"Authorization": f"Bearer {clear}"}


def count(client: FlaskClient, tenant: Tenant, table: str) -> int:
    answer = client.post("/v1/query", json={"sql": f"SELECT count(*) AS n, count(DISTINCT block_number) AS d "
                                                   f"FROM anvil_{table}" if table == "blocks" else
                                                   f"SELECT count(*) AS n FROM anvil_{table}"},
                         headers=tenant.headers("reader"))
    assert answer.status_code == 200, answer.get_json()
    row = answer.get_json()["rows"][0]
    if table == "blocks":
        assert row["n"] == row["d"], "a block counted twice"
    return int(row["n"])


def test_compaction_racing_queries_counts_every_block_once(anvil: Callable[..., AnvilNode], app: Flask,
                                                           client: FlaskClient, tenant: Tenant,
                                                           follower: Callable[[], ChainFollower]) -> None:
    node = anvil(block_time=None)
    node.deploy_emitter()
    node.send_txs(4)
    node.mine(1100)
    node.send_txs(3)
    register(node, depth=10)
    running = follower()
    head = caught_up(node, timeout=120)
    expected = {"blocks": head + 1, "transactions": count(client, tenant, "transactions"),
                "logs": count(client, tenant, "logs")}
    assert expected["logs"] > 0
    seen: list[dict[str, int]] = []
    done = threading.Event()

    def hammer() -> None:
        with app.app_context():
            with app.test_client() as own:
                while not done.is_set():
                    seen.append({table: count(own, tenant, table) for table in expected})

    thread = threading.Thread(target=hammer)
    thread.start()
    try:
        wait_for(lambda: len(seen) >= 2, message="queries before the compaction")
        assert running.lease is not None
        store = object_store(current_settings(app))
        assert cold.compact_next(running.lease, store, chain_id=31337, finalized=head - 10) == 999
        assert cold.compact_next(running.lease, store, chain_id=31337, finalized=head - 10) is None, "1999 not final"
        after = len(seen)
        wait_for(lambda: len(seen) >= after + 2, message="queries after the compaction")
        assert cold.prune("anvil", grace_s=3600) == -1, "within the grace period nothing is pruned"
        wait_for(lambda: len(seen) >= after + 4, message="more queries")
    finally:
        done.set()
        thread.join(timeout=60)
    assert seen and all(sample == expected for sample in seen), [s for s in seen if s != expected][:3]
    assert cold.prune("anvil", grace_s=0) == 999
    remaining = db.session.execute(text("SELECT min(block_number) FROM chain_blocks WHERE chain = 'anvil'")).scalar()
    db.session.rollback()
    assert remaining == 1000
    assert {table: count(client, tenant, table) for table in expected} == expected
    files = sorted(Path(p).name for p in (LocalObjectStore(current_settings(app).home_path / "objects").path(
        "chains/anvil")).rglob("*.parquet"))
    assert files == ["network_31337__blocks__00000000_to_00000999.parquet",
                     "network_31337__logs__00000000_to_00000999.parquet",
                     "network_31337__transactions__00000000_to_00000999.parquet"]
    result = cold.completeness("anvil")
    assert result["ok"], result


def test_backfill_writes_what_cryo_writes_and_resumes(anvil: Callable[..., AnvilNode], app: Flask,
                                                      client: FlaskClient, tenant: Tenant, tmp_path: Path,
                                                      follower: Callable[[], ChainFollower]) -> None:
    node = anvil(block_time=None)
    node.deploy_emitter()
    node.send_txs(5, legacy_every=2)
    node.mine(990)
    node.send_txs(4)
    node.mine(1020)  # history 0..~2020; the follower starts at 2000
    from tracecore.chain import chains, registration

    registration.register(chains.parse_spec({"name": "anvil", "chain_id": 31337, "rpc_urls": [node.rpc_url],
                                             "finality": {"depth": 5}, "start_block": 2000}))
    db.session.commit()
    follower()
    head = caught_up(node)

    def finalized() -> bool:
        db.session.rollback()
        return (db.session.scalar(text("SELECT finalized_block FROM chains WHERE name = 'anvil'")) or 0) >= 1999

    wait_for(finalized, message="the finality boundary to pass 1999")
    admin = installation_headers()
    too_far = client.post("/v1/chains/anvil/backfills", json={"from_block": 0, "to_block": head}, headers=admin)
    assert too_far.status_code == 400 and too_far.get_json()["error"]["code"] == "beyond_finality"
    made = client.post("/v1/chains/anvil/backfills", json={"from_block": 0, "to_block": 1999}, headers=admin)
    assert made.status_code == 202, made.get_json()
    backfill_id = made.get_json()["id"]
    assert made.get_json()["chunks_total"] == 2
    store = object_store(current_settings(app))
    assert [run_chunk(backfill_id, start, store=store) for start in (0, 1000)] == ["written", "written"]
    assert run_chunk(backfill_id, 0, store=store) == "gone", "a finished backfill takes no more chunks"
    progress = client.get(f"/v1/backfills/{backfill_id}", headers=tenant.headers("reader")).get_json()
    assert (progress["state"], progress["chunks_done"], progress["blocks_written"]) == ("done", 2, 2000)

    again = client.post("/v1/chains/anvil/backfills", json={"from_block": 500, "to_block": 1500}, headers=admin)
    again_id = again.get_json()["id"]
    assert [run_chunk(again_id, start, store=store) for start in (0, 1000)] == ["skipped", "skipped"]
    assert db.session.get(Backfill, uuid.UUID(again_id)).chunks_skipped == 2

    cryo_dir = tmp_path / "cryo"
    cryo_dir.mkdir()
    # cryo's "a:b" excludes b; its freeze() leaves an event loop open, async_freeze does not.
    asyncio.run(cryo.async_freeze(["blocks", "transactions", "logs"], blocks=["0:1000"], rpc=node.rpc_url,
                                  output_dir=str(cryo_dir), hex=False, no_verbose=True))
    local = LocalObjectStore(current_settings(app).home_path / "objects")
    for dataset in ("blocks", "transactions", "logs"):
        name = f"network_31337__{dataset}__00000000_to_00000999.parquet"
        ours = pq.read_table(local.path(f"chains/anvil/{dataset}/{name}"))
        theirs = pq.read_table(cryo_dir / name)
        assert ours.schema == theirs.schema, dataset
        assert ours.num_rows > 0 or dataset != "blocks"
        assert ours.equals(theirs), dataset
    assert count(client, tenant, "blocks") == head + 1, "cold history below the follower's start + hot above"
    result = cold.completeness("anvil")
    assert result["ok"] and result["cold_boundary"] == 1999, result


def test_the_completeness_check_fills_a_gap(anvil: Callable[..., AnvilNode], app: Flask,
                                            follower: Callable[[], ChainFollower]) -> None:
    node = anvil(block_time=None)
    node.deploy_emitter()
    node.send_txs(3)
    node.mine(20)
    register(node)
    running = follower()
    head = caught_up(node)
    for table in ("chain_logs", "chain_transactions", "chain_blocks"):
        db.session.execute(text(f"DELETE FROM {table} WHERE chain = 'anvil' AND block_number IN (2, 3, 7)"))
    db.session.commit()
    assert cold.completeness("anvil")["hot_gaps"] == [2, 3, 7]
    result: dict[str, Any] = {}

    def checked() -> bool:
        db.session.rollback()
        found = db.session.scalar(text("SELECT completeness FROM chains WHERE name = 'anvil'"))
        db.session.rollback()
        result.update(found or {})
        return bool(found and found.get("filled_from") == 2)

    running.next_check = 0.0  # due now
    node.mine(1)  # a head makes the follower step
    wait_for(checked, message="the check to fill the gap")
    assert result["ok"], result
    from .test_follower import canonical, stored

    assert stored(head) == canonical(node, head)
