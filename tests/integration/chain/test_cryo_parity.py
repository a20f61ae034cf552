"""Parity with cryo 0.3.2 itself: the same anvil range frozen by ``cryo.freeze`` and built by
``tracecore.chain.cryo.tables_from_rpc`` over ``RpcClient.block_bundles``, written by ``write_parquet``,
must have identical schemas (names, types, nullability, order), equal tables, the same file names
and the same Parquet codec and row grouping."""

from __future__ import annotations

import asyncio
from pathlib import Path

import cryo as cryo_tool  # type: ignore[import-untyped]  # PyPI cryo==0.3.2 (the test extra)
import pyarrow.parquet as pq

from tests.integration.chain.conftest import DEV_ACCOUNTS, AnvilFactory, AnvilNode
from tracecore.chain import cryo
from workers.chain.rpc import RpcClient


def varied_chain(node: AnvilNode) -> None:
    """Blocks with what cryo's columns distinguish: a contract creation (null to_address), legacy
    and EIP-1559 transactions, logs with 0 and 4 topics and data of many lengths, a value past
    2**64, a failed transaction, several transactions per block, empty blocks."""
    node.deploy_emitter()
    node.send_txs(6, one_block=True, legacy_every=3)
    node.mine(2)
    node.rpc("anvil_setBalance", [DEV_ACCOUNTS[1], hex(10**30)])
    big = node.rpc("eth_sendTransaction", [{"from": DEV_ACCOUNTS[1], "to": DEV_ACCOUNTS[2], "value": hex(2**70 + 1)}])
    node.wait_receipt(big)
    assert node.emitter is not None
    failed = node.rpc("eth_sendTransaction", [{"from": DEV_ACCOUNTS[0], "to": node.emitter, "data": "0x" + "00" * 40,
                                                "gas": hex(21_700)}])  # runs out of gas in the emitter
    assert node.wait_receipt(failed)["status"] == "0x0"
    node.send_txs(12, legacy_every=4)  # one block each
    node.send_txs(9, one_block=True)


def test_tables_equal_cryo_freeze(anvil: AnvilFactory, tmp_path: Path) -> None:
    node = anvil()
    varied_chain(node)
    head = node.block_number()
    frozen = tmp_path / "cryo"
    # cryo's "a:b" excludes b. Its own freeze() leaves an event loop open (a ResourceWarning, an error
    # here): the coroutine under asyncio.run instead.
    asyncio.run(cryo_tool.async_freeze(list(cryo.DATASETS), blocks=[f"0:{head + 1}"], rpc=node.rpc_url,
                                       output_dir=str(frozen), hex=False))

    with RpcClient([node.rpc_url], max_batch_blocks=7) as client:
        bundles = client.block_bundles(list(range(head + 1)))
    assert all(bundle is not None for bundle in bundles)
    tables = cryo.tables_from_rpc([b for b in bundles if b is not None], chain_id=31337)
    ours = tmp_path / "ours"
    ours.mkdir()
    for dataset in cryo.DATASETS:
        name = cryo.file_name("network_31337", dataset, 0, head)
        theirs_path = frozen / name
        assert theirs_path.exists(), f"cryo wrote {sorted(p.name for p in frozen.iterdir())}, not {name}"
        cryo.write_parquet(tables[dataset], ours / name)
        theirs, mine = pq.ParquetFile(theirs_path), pq.ParquetFile(ours / name)
        assert mine.schema_arrow.equals(theirs.schema_arrow, check_metadata=True), dataset
        assert mine.schema_arrow.equals(cryo.SCHEMAS[dataset]), dataset
        theirs_table, mine_table = theirs.read(), mine.read()
        assert theirs_table.num_rows > 0
        for column in theirs_table.column_names:
            assert mine_table[column].equals(theirs_table[column]), (dataset, column)
        assert mine_table.equals(theirs_table), dataset
        assert mine.metadata.num_row_groups == theirs.metadata.num_row_groups
        assert mine.metadata.format_version == theirs.metadata.format_version
        codecs = [{f.metadata.row_group(0).column(i).compression for i in range(f.metadata.num_columns)}
                  for f in (mine, theirs)]
        assert codecs[0] == codecs[1] == {"LZ4"}  # LZ4_RAW, as pyarrow names it
    transactions = tables["transactions"]
    assert None in transactions["to_address"].to_pylist() and False in transactions["success"].to_pylist()
    assert {0, 2} <= set(transactions["transaction_type"].to_pylist())
    assert max(v for v in transactions["value_f64"].to_pylist() if v is not None) > 2.0**64
    logs = tables["logs"]
    assert None in logs["topic0"].to_pylist() and logs["topic3"].drop_null().to_pylist() != []


def test_chunk_file_names_equal_cryos(anvil: AnvilFactory, tmp_path: Path) -> None:
    """cryo's names for aligned chunks of a range, end inclusive, and a named network."""
    node = anvil()
    node.mine(30)
    asyncio.run(cryo_tool.async_freeze(["blocks"], blocks=["3:31"], rpc=node.rpc_url, output_dir=str(tmp_path),
                                       hex=False, chunk_size=10, align=True, network_name="anvil"))
    names = sorted(p.name for p in tmp_path.glob("*.parquet"))
    # aligned: the partial chunk before 10 is left out, the one at the end (30..30) is written
    assert names == [cryo.file_name("anvil", "blocks", start, min(start + 9, 30)) for start in (10, 20, 30)]
    assert [cryo.parse_file_name(name) for name in names] == [
        ("anvil", "blocks", 10, 19), ("anvil", "blocks", 20, 29), ("anvil", "blocks", 30, 30)]
