"""The cryo 0.3.2 format: chain data as ``cryo freeze`` writes it, built from JSON-RPC answers.

Why: cold chain data must be readable by every tool that reads cryo's Parquet (and a backfill must
be checkable against cryo itself), so the column names, Arrow types, nullability, column order,
row order, file names and Parquet writer settings here are cryo's, as read from cryo 0.3.2's output
and source (``crates/freeze/src/datasets/{blocks,transactions,logs}.rs``, ``to_df``, ``export.rs``):

- Columns in the order of cryo's structs, every one nullable (Polars writes all columns optional);
  binary as ``large_binary``, strings as ``large_string``. U256 values (only ``value`` here) become
  three columns: ``_binary`` (32 bytes big-endian), ``_string`` (decimal) and ``_f64`` (the decimal
  string parsed as a double, i.e. correctly rounded: Python's ``float(int)`` rounds the same way).
- Rows sorted: blocks by ``block_number``; transactions by ``(block_number, transaction_index)``;
  logs by ``(block_number, log_index)``.
- ``gas_price`` is the transaction's ``gasPrice`` field (for a mined EIP-1559 transaction nodes
  answer the effective price there); ``max_*_fee_per_gas`` and ``transaction_type`` are null when
  the node omits them (legacy transactions); ``to_address`` is null for a contract creation.
- ``success`` is the receipt's ``status == 1``; without a status, cryo's own rule: on chain 1 before
  block 4,370,000 it is ``gas_used == 0`` (sic), otherwise the transaction is an error.
- ``chain_id`` is the chain's id given by the caller (cryo uses its source's), not the transaction's.
- Logs come from the receipts (cryo asks ``eth_getLogs``: the same logs); a log lacking its block
  number, transaction hash, transaction index or log index is skipped, as cryo skips it.
- Files: ``{network}__{dataset}__{start:08d}_to_{end:08d}.parquet``, end inclusive, numbers
  zero-padded to 8 digits and longer past that (so names never sort as numbers: parse them).
- Writer: LZ4 (raw) compression, statistics on, row groups of at most 512 x 512 rows (Polars'
  default, which cryo keeps unless told otherwise), Parquet format 2.6.

Everything a node sends is treated as hostile: wrong types, bad hex, wrong lengths and numbers that
do not fit cryo's column types raise ``MalformedChainData`` naming the block and the field.

``tables_from_rpc`` sits on the follower's hot path (one block of ~50 transactions per head) and
the backfill's (1000-block chunks): columns are built as Python lists and converted once per
column by ``pa.array`` with the target type, never row dicts.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import IO, Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq

from tracecore.exceptions import PlatformError

DATASETS = ("blocks", "transactions", "logs")

_BIN: pa.DataType = pa.large_binary()
_U32: pa.DataType = pa.uint32()
_U64: pa.DataType = pa.uint64()
_STR: pa.DataType = pa.large_string()
_F64: pa.DataType = pa.float64()
_BOOL: pa.DataType = pa.bool_()

SCHEMAS: Mapping[str, pa.Schema] = MappingProxyType({
    "blocks": pa.schema([
        ("block_hash", _BIN), ("author", _BIN), ("block_number", _U32), ("gas_used", _U64),
        ("extra_data", _BIN), ("timestamp", _U32), ("base_fee_per_gas", _U64), ("chain_id", _U64),
    ]),
    "transactions": pa.schema([
        ("block_number", _U32), ("transaction_index", _U64), ("transaction_hash", _BIN), ("nonce", _U64),
        ("from_address", _BIN), ("to_address", _BIN), ("value_binary", _BIN), ("value_string", _STR),
        ("value_f64", _F64), ("input", _BIN), ("gas_limit", _U64), ("gas_used", _U64),
        ("gas_price", _U64), ("transaction_type", _U32), ("max_priority_fee_per_gas", _U64),
        ("max_fee_per_gas", _U64), ("success", _BOOL), ("n_input_bytes", _U32),
        ("n_input_zero_bytes", _U32), ("n_input_nonzero_bytes", _U32), ("chain_id", _U64),
    ]),
    "logs": pa.schema([
        ("block_number", _U32), ("transaction_index", _U32), ("log_index", _U32), ("transaction_hash", _BIN),
        ("address", _BIN), ("topic0", _BIN), ("topic1", _BIN), ("topic2", _BIN), ("topic3", _BIN),
        ("data", _BIN), ("chain_id", _U64),
    ]),
})

SORT_KEYS: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "blocks": ("block_number",),
    "transactions": ("block_number", "transaction_index"),
    "logs": ("block_number", "log_index"),
})

ROW_GROUP_SIZE = 512 * 512
COMPRESSION: Literal["lz4"] = "lz4"  # pyarrow's "lz4" is the LZ4_RAW codec, as Polars' Lz4Raw that cryo asks for
PARQUET_VERSION: Literal["2.6"] = "2.6"

# cryo's exception for pre-Byzantium mainnet receipts (no status field).
_BYZANTIUM_BLOCK = 4_370_000
_U256_LIMIT = 1 << 256


class MalformedChainData(PlatformError):
    """A node's answer is not a block/receipt as the JSON-RPC spec has it (or does not fit cryo's
    types): the node is at fault, not the user."""

    code = "malformed_chain_data"


# ---- hex conversions (strict: hostile input) -----------------------------------------------------

def _int(value: Any) -> int:
    if type(value) is not str or value[:2] != "0x":
        raise ValueError(f"not a 0x-prefixed hex quantity: {str(value)[:80]!r}")
    number = int(value, 16)
    if number < 0:
        raise ValueError(f"a negative quantity: {value[:80]!r}")
    return number


def _opt_int(value: Any) -> int | None:
    return None if value is None else _int(value)


def _bytes(value: Any, length: int | None = None) -> bytes:
    if type(value) is not str or value[:2] != "0x":
        raise ValueError(f"not 0x-prefixed hex data: {str(value)[:80]!r}")
    if length is not None and len(value) != 2 + 2 * length:
        raise ValueError(f"expected {length} bytes of hex, got {len(value) - 2} hex digits")
    return bytes.fromhex(value[2:])


def _opt_bytes(value: Any, length: int | None = None) -> bytes | None:
    return None if value is None else _bytes(value, length)


def _field(record: Any, key: str) -> Any:
    if type(record) is not dict:
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    return record.get(key)


class _Columns:
    """The column lists of one call, filled block by block."""

    def __init__(self) -> None:
        self.blocks: dict[str, list[Any]] = {name: [] for name in SCHEMAS["blocks"].names}
        self.transactions: dict[str, list[Any]] = {name: [] for name in SCHEMAS["transactions"].names}
        self.logs: dict[str, list[Any]] = {name: [] for name in SCHEMAS["logs"].names}


def tables_from_rpc(bundles: Sequence[tuple[dict[str, Any], list[dict[str, Any]]]],
                    chain_id: int) -> dict[str, pa.Table]:
    """The three datasets of these blocks, exactly as cryo 0.3.2 would write them.

    ``bundles``: per block, ``eth_getBlockByHash(h, true)``'s answer (full transactions) and
    ``eth_getBlockReceipts(h)``'s (one receipt per transaction, in block order), in any block order.
    Raises ``MalformedChainData`` on anything that is not such a pair (the message names the block)."""
    columns = _Columns()
    for block, receipts in bundles:
        try:
            _add_block(columns, block, receipts)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
            where = block.get("hash") if isinstance(block, dict) else None
            where = where if isinstance(where, str) else repr(block)[:80]
            raise MalformedChainData(f"block {str(where)[:80]}: {exc}", details={"block": str(where)[:80]}) from exc
    return {dataset: _table(dataset, getattr(columns, dataset), chain_id) for dataset in DATASETS}


def _add_block(columns: _Columns, block: dict[str, Any], receipts: list[dict[str, Any]]) -> None:
    if type(block) is not dict:
        raise ValueError(f"the block is not a JSON object but {type(block).__name__}")
    get = block.get
    number = _opt_int(get("number"))
    b = columns.blocks
    b["block_hash"].append(_opt_bytes(get("hash"), 32))
    b["author"].append(_opt_bytes(get("miner"), 20))
    b["block_number"].append(number)
    b["gas_used"].append(_int(get("gasUsed")))
    b["extra_data"].append(_bytes(get("extraData")))
    b["timestamp"].append(_int(get("timestamp")))
    b["base_fee_per_gas"].append(_opt_int(get("baseFeePerGas")))

    transactions = get("transactions")
    if type(transactions) is not list or type(receipts) is not list:
        raise ValueError("transactions and receipts must be JSON arrays")
    if len(receipts) != len(transactions):
        raise ValueError(f"{len(transactions)} transactions but {len(receipts)} receipts")
    t = columns.transactions
    logs = columns.logs
    for tx, receipt in zip(transactions, receipts, strict=True):
        if type(tx) is not dict:
            raise ValueError("the block's transactions are not objects (ask for full transactions)")
        tx_hash = tx.get("hash")
        if _field(receipt, "transactionHash") != tx_hash:
            raise ValueError(f"receipt of {str(receipt.get('transactionHash'))[:80]} where {str(tx_hash)[:80]} was due")
        tx_input = _bytes(tx.get("input"))
        value = _int(tx.get("value"))
        if value >= _U256_LIMIT:
            raise ValueError("value exceeds 256 bits")
        gas_used = _opt_int(receipt.get("gasUsed"))
        tx_block = _opt_int(tx.get("blockNumber"))
        t["block_number"].append(tx_block)
        t["transaction_index"].append(_opt_int(tx.get("transactionIndex")))
        t["transaction_hash"].append(_bytes(tx_hash, 32))
        t["nonce"].append(_int(tx.get("nonce")))
        t["from_address"].append(_bytes(tx.get("from"), 20))
        t["to_address"].append(_opt_bytes(tx.get("to"), 20))
        t["value_binary"].append(value.to_bytes(32, "big"))
        t["value_string"].append(str(value))
        t["value_f64"].append(float(value))
        t["input"].append(tx_input)
        t["gas_limit"].append(_int(tx.get("gas")))
        t["gas_used"].append(gas_used)
        t["gas_price"].append(_opt_int(tx.get("gasPrice")))
        t["transaction_type"].append(_opt_int(tx.get("type")))
        t["max_priority_fee_per_gas"].append(_opt_int(tx.get("maxPriorityFeePerGas")))
        t["max_fee_per_gas"].append(_opt_int(tx.get("maxFeePerGas")))
        t["success"].append(_success(receipt, tx, tx_block, gas_used))
        n_bytes = len(tx_input)
        n_zero = tx_input.count(0)
        t["n_input_bytes"].append(n_bytes)
        t["n_input_zero_bytes"].append(n_zero)
        t["n_input_nonzero_bytes"].append(n_bytes - n_zero)

        receipt_logs = receipt.get("logs")
        if type(receipt_logs) is not list:
            raise ValueError("a receipt's logs are not a JSON array")
        for log in receipt_logs:
            log_block = _field(log, "blockNumber")
            log_tx, log_tx_index = log.get("transactionHash"), log.get("transactionIndex")
            log_index = log.get("logIndex")
            if log_block is None or log_tx is None or log_tx_index is None or log_index is None:
                continue  # a pending log: cryo skips it too
            topics = log.get("topics")
            if type(topics) is not list:
                raise ValueError("a log's topics are not a JSON array")
            logs["block_number"].append(_int(log_block))
            logs["transaction_index"].append(_int(log_tx_index))
            logs["log_index"].append(_int(log_index))
            logs["transaction_hash"].append(_bytes(log_tx, 32))
            logs["address"].append(_bytes(log.get("address"), 20))
            n_topics = len(topics)
            logs["topic0"].append(_bytes(topics[0], 32) if n_topics > 0 else None)
            logs["topic1"].append(_bytes(topics[1], 32) if n_topics > 1 else None)
            logs["topic2"].append(_bytes(topics[2], 32) if n_topics > 2 else None)
            logs["topic3"].append(_bytes(topics[3], 32) if n_topics > 3 else None)
            logs["data"].append(_bytes(log.get("data")))


def _success(receipt: dict[str, Any], tx: dict[str, Any], block_number: int | None, gas_used: int | None) -> bool:
    status = receipt.get("status")
    if status is not None:
        return _int(status) == 1
    tx_chain = _opt_int(tx.get("chainId"))
    if tx_chain == 1 and block_number is not None and block_number < _BYZANTIUM_BLOCK and gas_used is not None:
        return gas_used == 0  # cryo 0.3.2's rule, kept for parity
    raise ValueError("could not determine the status of transaction (the receipt has no status)")


def _table(dataset: str, columns: dict[str, list[Any]], chain_id: int) -> pa.Table:
    schema = SCHEMAS[dataset]
    rows = len(next(iter(columns.values())))
    columns["chain_id"] = [chain_id] * rows
    try:
        arrays = [pa.array(columns[field.name], type=field.type) for field in schema]
    except (pa.ArrowInvalid, OverflowError, TypeError) as exc:
        raise MalformedChainData(f"{dataset}: a value does not fit cryo's column type: {exc}") from exc
    table = pa.Table.from_arrays(arrays, schema=schema)
    keys = SORT_KEYS[dataset]
    if rows > 1 and not _is_sorted([columns[key] for key in keys]):
        table = table.sort_by([(key, "ascending") for key in keys])
    return table


def _is_sorted(keys: list[list[Any]]) -> bool:
    """True when the rows are already in key order (the usual case: blocks arrive in order and a
    node answers transactions and logs in index order), which spares a sort."""
    rows = list(zip(*keys, strict=True)) if len(keys) > 1 else keys[0]
    try:
        return all(a <= b for a, b in itertools.pairwise(rows))
    except TypeError:  # a null key (a pending block): let Arrow order it
        return False


# ---- files ---------------------------------------------------------------------------------------

_NETWORK = re.compile(r"[A-Za-z0-9_.-]+")
_DATASET = re.compile(r"[a-z0-9_]+")
_RANGE = re.compile(r"([0-9]{8,})_to_([0-9]{8,})")


def file_name(network: str, dataset: str, start: int, end: int) -> str:
    """cryo's name for the chunk of blocks ``start`` to ``end`` (both included)."""
    if "__" in network or not _NETWORK.fullmatch(network):
        raise ValueError(f"a network name of letters, digits, '_', '.', '-' without '__': {network!r}")
    if "__" in dataset or not _DATASET.fullmatch(dataset):
        raise ValueError(f"not a dataset name: {dataset!r}")
    if not 0 <= start <= end:
        raise ValueError(f"not a block range: {start}..{end}")
    return f"{network}__{dataset}__{start:08d}_to_{end:08d}.parquet"


def parse_file_name(name: str) -> tuple[str, str, int, int]:
    """(network, dataset, start, end) of a cryo file name (a bare name, not a path). Sort chunks by
    these integers, never by the name: past 8 digits names do not sort as their numbers."""
    parts = name.removesuffix(".parquet").split("__") if name.endswith(".parquet") else []
    if len(parts) != 3:
        raise ValueError(f"not a cryo file name: {name!r}")
    network, dataset, blocks = parts
    numbers = _RANGE.fullmatch(blocks)
    if not _NETWORK.fullmatch(network) or not _DATASET.fullmatch(dataset) or numbers is None:
        raise ValueError(f"not a cryo file name: {name!r}")
    start, end = int(numbers[1]), int(numbers[2])
    if start > end:
        raise ValueError(f"not a block range in {name!r}")
    return network, dataset, start, end


def write_parquet(table: pa.Table, sink: str | IO[bytes] | Any) -> None:
    """Write one dataset's table with cryo's writer settings. The table must have one of SCHEMAS
    exactly (a wrong file in the cold store would be read as cryo's by everyone)."""
    if not any(table.schema.equals(schema) for schema in SCHEMAS.values()):
        raise ValueError(f"not a cryo schema: {table.schema.names}")
    pq.write_table(table, sink, compression=COMPRESSION, row_group_size=ROW_GROUP_SIZE, write_statistics=True,
                   version=PARQUET_VERSION)
