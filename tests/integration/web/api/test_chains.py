"""/v1/chains: registration by the installation admin with every field checked, a chain's status
with its lag, finality and reorgs, stop and resume, and the chain's datasets in every org's catalog."""

from __future__ import annotations

import threading
import uuid
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import text

from tests.anvil import AnvilNode
from tests.conftest import Tenant, wait_for
from tests.integration.chain.test_follower import caught_up
from tracecore.db.engine import db
from tracecore.tenancy import orgs
from workers.chain.follower import ChainFollower


@pytest.fixture
def admin(app: Flask) -> dict[str, str]:
    org = orgs.create_org("installation")
    user = orgs.get_or_create_user("root@installation.example", installation_admin=True)
    orgs.add_member(org, user, orgs.Role.admin)
    _, clear = orgs.issue_token(org.id, user.id, installation_admin=True)
    db.session.commit()
    return {"Authorization": f"Bearer {clear}"}


def body(**changes: Any) -> dict[str, Any]:
    return {"name": "anvil", "chain_id": 31337, "rpc_urls": ["http://127.0.0.1:8545"],
            "ws_url": "ws://127.0.0.1:8545", "finality": {"depth": 12}, **changes}


BAD = [
    ({"name": "Anvil"}, "name"), ({"name": "1chain"}, "name"), ({"name": "a_b"}, "name"), ({"name": ""}, "name"),
    ({"chain_id": -1}, "chain_id"), ({"chain_id": "1"}, "chain_id"), ({"rpc_urls": []}, "rpc_urls"),
    ({"rpc_urls": ["ftp://x"]}, "rpc_urls[0]"), ({"rpc_urls": ["http://"]}, "rpc_urls[0]"),
    ({"rpc_urls": ["http://a"] * 9}, "rpc_urls"), ({"ws_url": "http://x"}, "ws_url"),
    ({"finality": {"depth": -1}}, "finality"), ({"finality": {"tag": "latest"}}, "finality"),
    ({"finality": {}}, "finality"), ({"finality": {"depth": 1, "tag": "safe"}}, "finality"),
    ({"start_block": -5}, "start_block"), ({"extra": 1}, "extra"),
]


@pytest.mark.parametrize(("change", "field"), BAD, ids=[f for _, f in BAD])
def test_a_bad_registration_is_a_400_naming_its_field(client: FlaskClient, admin: dict[str, str],
                                                      change: dict[str, Any], field: str) -> None:
    answer = client.post("/v1/chains", json=body(**change), headers=admin)
    assert answer.status_code in (400, 422), answer.get_json()
    error = answer.get_json()["error"]
    assert field.split("[")[0] in str(error), error
    assert client.get("/v1/chains", headers=admin).get_json() == []


def test_register_then_read_and_the_datasets_every_org_sees(client: FlaskClient, admin: dict[str, str],
                                                            tenant: Tenant, make_tenant: Any) -> None:
    made = client.post("/v1/chains", json=body(start_block=1234), headers=admin)
    assert made.status_code == 201, made.get_json()
    status = made.get_json()
    assert (status["state"], status["start_block"], status["cold_boundary"]) == ("following", 1000, 999)
    assert status["datasets"] == ["anvil_blocks", "anvil_transactions", "anvil_logs"]
    again = client.post("/v1/chains", json=body(), headers=admin)
    assert again.status_code == 409 and again.get_json()["error"]["code"] == "chain_exists"
    for reader in (tenant, make_tenant("globex")):
        listed = client.get("/v1/chains", headers=reader.headers("reader")).get_json()
        assert [chain["name"] for chain in listed] == ["anvil"]
        catalog = client.get("/v1/datasets?q=anvil", headers=reader.headers("reader")).get_json()
        names = sorted(item["name"] for item in (catalog["items"] if isinstance(catalog, dict) else catalog))
        assert names == ["anvil_blocks", "anvil_logs", "anvil_transactions"]
    schema = client.post("/v1/query", json={"sql": "SELECT * FROM anvil_logs"}, headers=tenant.headers("reader"))
    assert schema.status_code == 200 and schema.get_json()["rows"] == []
    assert "topic0" in [c["name"] for c in schema.get_json()["columns"]]
    assert client.get("/v1/chains/nochain", headers=tenant.headers()).status_code == 404
    assert client.get(f"/v1/backfills/{uuid.uuid4()}", headers=tenant.headers()).status_code == 404


def test_status_reorgs_stop_and_resume(client: FlaskClient, admin: dict[str, str], tenant: Tenant, app: Flask,
                                       anvil: Any) -> None:
    node: AnvilNode = anvil(block_time=None)
    node.mine(30)
    assert client.post("/v1/chains", json=body(rpc_urls=[node.rpc_url], ws_url=node.ws_url,
                                               finality={"depth": 3}), headers=admin).status_code == 201
    stop = threading.Event()
    follower = ChainFollower(app, "anvil", "api-test", stop)
    thread = threading.Thread(target=follower.run, daemon=True)
    thread.start()
    try:
        head = caught_up(node)
        wait_for(lambda: client.get("/v1/chains/anvil", headers=tenant.headers()).get_json()["rpc_health"],
                 message="the follower's first observation")
        status = client.get("/v1/chains/anvil", headers=tenant.headers()).get_json()
        assert status["ingested_block"] == head and status["lag_blocks"] == 0 and status["finalized_block"] == head - 3
        assert status["follower"]["owner"] == "api-test"
        orphaned = node.reorg(2)
        node.mine(1)
        caught_up(node)
        reorgs = client.get("/v1/chains/anvil/reorgs", headers=tenant.headers("reader")).get_json()
        assert [(r["depth"], r["old_hashes"], r["beyond_finality"]) for r in reorgs] == [(2, orphaned, False)]
        node.reorg(8)
        node.mine(1)

        def state() -> str:
            return str(client.get("/v1/chains/anvil", headers=tenant.headers()).get_json()["state"])

        wait_for(lambda: state() == "stopped", message="the chain to stop")
        status = client.get("/v1/chains/anvil", headers=tenant.headers()).get_json()
        assert "finality" in status["stopped_reason"] and status["last_reorg"]["beyond_finality"]
        assert client.post("/v1/chains/anvil/resume", json={}, headers=tenant.headers("admin")).status_code == 403
        resumed = client.post("/v1/chains/anvil/resume", json={"rewrite_from": 0}, headers=admin)
        assert resumed.status_code == 200 and resumed.get_json()["state"] == "following"
        head = caught_up(node)
        assert client.post("/v1/chains/anvil/resume", json={}, headers=admin).status_code == 409
        db.session.rollback()
        assert db.session.scalar(text("SELECT rewrite_from FROM chains")) is None, "the permission was used once"
        db.session.rollback()
    finally:
        stop.set()
        thread.join(timeout=15)

