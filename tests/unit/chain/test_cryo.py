"""The cryo 0.3.2 format built from JSON-RPC answers (pure: blocks and receipts written here as a
node would answer them). Parity with cryo itself is tests/integration/chain/test_cryo_parity.py."""

from __future__ import annotations

import io
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tracecore.chain import cryo
from tracecore.chain.cryo import MalformedChainData, file_name, parse_file_name, tables_from_rpc, write_parquet

SENDER = "0x" + "aa" * 20
TARGET = "0x" + "bb" * 20
CONTRACT = "0x" + "cc" * 20


def h32(n: int) -> str:
    return "0x" + n.to_bytes(32, "big").hex()


def tx(number: int, index: int, *, to: str | None = TARGET, value: int = 0, data: str = "0x", legacy: bool = False,
       ) -> dict[str, Any]:
    body: dict[str, Any] = {
        "hash": h32(number * 1000 + index), "blockNumber": hex(number), "blockHash": h32(number),
        "transactionIndex": hex(index), "nonce": hex(index), "from": SENDER, "to": to, "value": hex(value),
        "input": data, "gas": hex(100_000), "chainId": "0x7a69",
    }
    if legacy:
        body.update(type="0x0", gasPrice=hex(3_000_000_000))
    else:
        body.update(type="0x2", gasPrice=hex(1_875_534_950), maxPriorityFeePerGas=hex(10**9),
                    maxFeePerGas=hex(2 * 10**9))
    return body


def log(number: int, tx_index: int, log_index: int, topics: list[str], data: str = "0x") -> dict[str, Any]:
    return {"address": CONTRACT, "topics": topics, "data": data, "blockNumber": hex(number),
            "transactionHash": h32(number * 1000 + tx_index), "transactionIndex": hex(tx_index),
            "blockHash": h32(number), "logIndex": hex(log_index), "removed": False}


def receipt(t: dict[str, Any], logs: list[dict[str, Any]] | None = None, status: str | None = "0x1",
            gas_used: int = 21_000) -> dict[str, Any]:
    body: dict[str, Any] = {"transactionHash": t["hash"], "transactionIndex": t["transactionIndex"],
                            "blockNumber": t["blockNumber"], "gasUsed": hex(gas_used), "logs": logs or [],
                            "contractAddress": None}
    if status is not None:
        body["status"] = status
    return body


def block(number: int, txs: list[dict[str, Any]], base_fee: int | None = 7) -> dict[str, Any]:
    body: dict[str, Any] = {"hash": h32(number), "parentHash": h32(number - 1), "number": hex(number),
                            "miner": "0x" + "00" * 20, "gasUsed": hex(21_000 * len(txs)), "extraData": "0xbeef",
                            "timestamp": hex(1_700_000_000 + number), "transactions": txs}
    if base_fee is not None:
        body["baseFeePerGas"] = hex(base_fee)
    return body


def bundle(number: int, txs: list[dict[str, Any]], logs: dict[int, list[dict[str, Any]]] | None = None,
           **block_args: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    return block(number, txs, **block_args), [receipt(t, (logs or {}).get(i)) for i, t in enumerate(txs)]


def test_schemas_are_cryos() -> None:
    assert cryo.DATASETS == ("blocks", "transactions", "logs")
    assert cryo.SCHEMAS["blocks"].names == ["block_hash", "author", "block_number", "gas_used", "extra_data",
                                            "timestamp", "base_fee_per_gas", "chain_id"]
    assert cryo.SCHEMAS["transactions"].field("transaction_index").type == pa.uint64()
    assert cryo.SCHEMAS["logs"].field("transaction_index").type == pa.uint32()
    assert cryo.SCHEMAS["transactions"].field("value_string").type == pa.large_string()
    assert all(field.nullable for schema in cryo.SCHEMAS.values() for field in schema)


def test_empty_input_and_empty_blocks() -> None:
    tables = tables_from_rpc([], 1)
    assert {name: t.num_rows for name, t in tables.items()} == {"blocks": 0, "transactions": 0, "logs": 0}
    assert all(tables[name].schema.equals(cryo.SCHEMAS[name]) for name in cryo.DATASETS)
    tables = tables_from_rpc([bundle(5, [])], 1)
    assert tables["blocks"].to_pylist() == [{
        "block_hash": bytes.fromhex(h32(5)[2:]), "author": bytes(20), "block_number": 5, "gas_used": 0,
        "extra_data": b"\xbe\xef", "timestamp": 1_700_000_005, "base_fee_per_gas": 7, "chain_id": 1}]
    assert tables["transactions"].num_rows == tables["logs"].num_rows == 0


def test_pre_london_block_has_no_base_fee() -> None:
    tables = tables_from_rpc([bundle(5, [], base_fee=None)], 1)
    assert tables["blocks"]["base_fee_per_gas"].to_pylist() == [None]


def test_legacy_and_1559_contract_creation_and_big_values() -> None:
    big = 2**70 + 12345
    txs = [tx(9, 0, legacy=True, data="0x0001000203"), tx(9, 1, to=None, value=big), tx(9, 2, value=2**256 - 1)]
    rows = tables_from_rpc([bundle(9, txs)], 31337)["transactions"].to_pylist()
    legacy, creation, huge = rows
    assert legacy["transaction_type"] == 0 and legacy["gas_price"] == 3_000_000_000
    assert legacy["max_fee_per_gas"] is None and legacy["max_priority_fee_per_gas"] is None
    assert (legacy["n_input_bytes"], legacy["n_input_zero_bytes"], legacy["n_input_nonzero_bytes"]) == (5, 2, 3)
    assert legacy["input"] == b"\x00\x01\x00\x02\x03"
    assert creation["to_address"] is None and creation["transaction_type"] == 2
    assert creation["gas_price"] == 1_875_534_950 and creation["max_fee_per_gas"] == 2 * 10**9
    assert creation["value_binary"] == big.to_bytes(32, "big")
    assert creation["value_string"] == "1180591620717411315769"
    assert creation["value_f64"] == 1.1805916207174113e21
    assert huge["value_string"] == str(2**256 - 1) and huge["value_f64"] == float(2**256 - 1)
    assert huge["value_binary"] == b"\xff" * 32
    assert [r["transaction_index"] for r in rows] == [0, 1, 2] and {r["chain_id"] for r in rows} == {31337}
    assert all(r["success"] for r in rows) and all(r["gas_used"] == 21_000 for r in rows)


def test_logs_topics_data_and_pending_logs() -> None:
    txs = [tx(3, 0), tx(3, 1)]
    pending = log(3, 1, 9, [h32(1)])
    pending["logIndex"] = None
    logs = {0: [log(3, 0, 0, [h32(1), h32(2), h32(3), h32(4)], "0x1234"), log(3, 0, 1, [])],
            1: [log(3, 1, 2, [h32(7)]), pending]}
    rows = tables_from_rpc([bundle(3, txs, logs)], 1)["logs"].to_pylist()
    assert [r["log_index"] for r in rows] == [0, 1, 2]
    assert rows[0]["topic3"] == bytes.fromhex(h32(4)[2:]) and rows[0]["data"] == b"\x12\x34"
    assert rows[1]["topic0"] is None and rows[1]["data"] == b""
    assert rows[2]["topic0"] == bytes.fromhex(h32(7)[2:]) and rows[2]["topic1"] is None
    assert rows[2]["transaction_index"] == 1 and rows[2]["address"] == bytes.fromhex(CONTRACT[2:])


def test_rows_sorted_as_cryo_sorts_them() -> None:
    b7 = bundle(7, [tx(7, 0), tx(7, 1)], {0: [log(7, 0, 0, [])], 1: [log(7, 1, 1, [])]})
    b6 = bundle(6, [tx(6, 0)], {0: [log(6, 0, 0, [])]})
    shuffled = (b7[0] | {"transactions": b7[0]["transactions"][::-1]}, b7[1][::-1])
    tables = tables_from_rpc([shuffled, b6], 1)
    assert tables["blocks"]["block_number"].to_pylist() == [6, 7]
    assert [(r["block_number"], r["transaction_index"]) for r in tables["transactions"].to_pylist()] == [
        (6, 0), (7, 0), (7, 1)]
    assert [(r["block_number"], r["log_index"]) for r in tables["logs"].to_pylist()] == [(6, 0), (7, 0), (7, 1)]


def test_status_rules() -> None:
    failed = tx(4, 0)
    tables = tables_from_rpc([(block(4, [failed]), [receipt(failed, status="0x0")])], 1)
    assert tables["transactions"]["success"].to_pylist() == [False]
    old = tx(100, 0) | {"chainId": "0x1"}  # pre-Byzantium mainnet, no status: cryo's rule
    tables = tables_from_rpc([(block(100, [old]), [receipt(old, status=None, gas_used=0)])], 1)
    assert tables["transactions"]["success"].to_pylist() == [True]
    with pytest.raises(MalformedChainData, match="status"):
        tables_from_rpc([(block(4, [failed]), [receipt(failed, status=None)])], 1)


@pytest.mark.parametrize("spoil", [
    lambda b, r: b.update(number="12"),                       # not 0x-prefixed
    lambda b, r: b.update(gasUsed="0xzz"),                     # not hex
    lambda b, r: b.update(hash="0x1234"),                      # a hash of 2 bytes
    lambda b, r: b.update(timestamp=hex(2**32)),               # does not fit cryo's uint32
    lambda b, r: b.update(number="-0x1"),                      # negative
    lambda b, r: b.update(transactions=[b["transactions"][0]["hash"]]),  # hashes, not full transactions
    lambda b, r: r.pop(),                                      # a receipt missing
    lambda b, r: r.reverse(),                                  # receipts out of order
    lambda b, r: r[0].update(logs={"0": 1}),                   # logs not a list
    lambda b, r: r[0]["logs"].append("not an object"),          # a log that is not an object
    lambda b, r: r[0]["logs"].append(log(8, 0, 0, [h32(1)]) | {"topics": "0x01"}),  # topics not a list
    lambda b, r: r[0]["logs"].append(log(8, 0, 0, [h32(1)]) | {"address": "0x12"}),  # a short address
    lambda b, r: b["transactions"][0].update(value=hex(2**256)),  # value past 256 bits
    lambda b, r: b["transactions"][0].update(gas=7),           # a number where hex is due
])
def test_hostile_answers_raise_malformed_chain_data(spoil: Any) -> None:
    txs = [tx(8, 0), tx(8, 1)]
    b, r = bundle(8, txs)
    tables_from_rpc([(b, r)], 1)  # sound before it is spoiled
    spoil(b, r)
    with pytest.raises(MalformedChainData):
        tables_from_rpc([(b, r)], 1)


def test_not_a_dict_block() -> None:
    with pytest.raises(MalformedChainData):
        tables_from_rpc([("0x12", [])], 1)  # type: ignore[list-item]


def test_file_names() -> None:
    assert file_name("ethereum", "blocks", 0, 999) == "ethereum__blocks__00000000_to_00000999.parquet"
    assert file_name("network_31337", "logs", 123_456_000, 123_456_999) == \
        "network_31337__logs__123456000_to_123456999.parquet"
    for args in [("network_31337", "transactions", 5, 5), ("base", "logs", 99_999_000, 100_000_999)]:
        assert parse_file_name(file_name(*args)) == args
    names = [file_name("ethereum", "blocks", start, start + 999) for start in (100_000_000, 99_999_000, 1000)]
    assert sorted(names) != sorted(names, key=parse_file_name)  # as strings, 100,000,000 sorts first
    assert [parse_file_name(n)[2] for n in sorted(names, key=parse_file_name)] == [1000, 99_999_000, 100_000_000]


@pytest.mark.parametrize("name", [
    "ethereum__blocks__0_to_999.parquet",                         # not padded to 8 digits
    "ethereum__blocks__00001000_to_00000999.parquet",             # start after end
    "ethereum__blocks__00000000_to_00000999.csv",
    "eth__ereum__blocks__00000000_to_00000999.parquet",
    "../ethereum__blocks__00000000_to_00000999.parquet",
    "ethereum__blocks__00000000_to_00000999.parquet.tmp",
])
def test_bad_file_names(name: str) -> None:
    with pytest.raises(ValueError):
        parse_file_name(name)


@pytest.mark.parametrize("args", [("", "blocks", 0, 1), ("a__b", "blocks", 0, 1), ("eth", "blocks", 5, 4),
                                  ("eth", "blocks", -1, 4), ("eth/x", "blocks", 0, 1), ("eth", "Blocks", 0, 1)])
def test_bad_file_name_arguments(args: tuple[str, str, int, int]) -> None:
    with pytest.raises(ValueError):
        file_name(*args)


def test_write_parquet_settings_and_round_trip() -> None:
    tables = tables_from_rpc([bundle(3, [tx(3, 0), tx(3, 1, legacy=True)], {0: [log(3, 0, 0, [h32(1)])]})], 1)
    for dataset, table in tables.items():
        sink = io.BytesIO()
        write_parquet(table, sink)
        sink.seek(0)
        parquet = pq.ParquetFile(sink)
        meta = parquet.metadata
        assert meta.num_row_groups == 1 and meta.format_version == "2.6", dataset
        assert {meta.row_group(0).column(i).compression for i in range(meta.num_columns)} == {"LZ4"}
        assert meta.row_group(0).column(0).is_stats_set
        assert parquet.read().equals(table)
    with pytest.raises(ValueError, match="not a cryo schema"):
        write_parquet(pa.table({"x": [1]}), io.BytesIO())
