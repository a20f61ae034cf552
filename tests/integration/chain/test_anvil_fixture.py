"""The anvil fixture itself: a node answers, the emitter logs what its comment says, reorg and
rollback change the chain as documented, a restart keeps the port."""

from __future__ import annotations

from tests.integration.chain.conftest import DEV_ACCOUNTS, EMITTER_TOPIC, AnvilFactory


def test_emitter_logs_and_transactions(anvil: AnvilFactory) -> None:
    node = anvil()
    assert int(node.rpc("eth_chainId"), 16) == 31337
    emitter = node.deploy_emitter()
    hashes = node.send_txs(5, one_block=True, legacy_every=2)
    assert len(hashes) == 5
    block = node.block("latest", full=True)
    assert block is not None
    assert [tx["hash"] for tx in block["transactions"]] == hashes  # --order fifo
    assert [tx["type"] for tx in block["transactions"]] == ["0x0", "0x2", "0x0", "0x2", "0x0"]
    receipts = node.rpc("eth_getBlockReceipts", [block["hash"]])
    assert sum(len(receipt["logs"]) for receipt in receipts) == 10  # two per call
    # the second transaction: sender DEV_ACCOUNTS[1], 1 byte of calldata
    tagged, bare = next(receipt["logs"] for receipt in receipts if receipt["transactionHash"] == hashes[1])
    assert tagged["address"] == emitter
    assert tagged["topics"][0] == EMITTER_TOPIC
    assert int(tagged["topics"][1], 16) == int(DEV_ACCOUNTS[1], 16)
    assert int(tagged["topics"][2], 16) == int(block["number"], 16)
    assert int(tagged["topics"][3], 16) == 1 and tagged["data"] == "0x07"
    assert bare["topics"] == [] and bare["data"] == "0x"


def test_reorg_rollback_restart(anvil: AnvilFactory) -> None:
    node = anvil()
    node.deploy_emitter()  # block 1
    node.mine(4)
    before = [node.block(n)["hash"] for n in range(1, 6)]  # type: ignore[index]
    orphaned = node.reorg(2, txs=3)
    assert orphaned == before[3:]
    after = [node.block(n)["hash"] for n in range(1, 6)]  # type: ignore[index]
    assert after[:3] == before[:3] and not set(after[3:]) & set(before[3:])
    assert node.block_number() == 5
    replaced = [node.rpc("eth_getBlockReceipts", [h]) for h in after[3:]]
    assert sum(len(receipt["logs"]) for receipts in replaced for receipt in receipts) == 6  # 3 emitter calls
    assert node.rollback(1) == after[4:]
    assert node.block_number() == 4
    port = node.port
    node.restart()
    assert node.port == port and node.block_number() == 0
    other = anvil(0.2)
    assert other.port != node.port
