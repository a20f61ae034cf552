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
the backfill's (1000-block chunks): it works a column at a time (checks over whole columns, one
``bytes.fromhex`` per fixed-size binary column handed to Arrow as buffers, ``pa.array`` with the
target type for the rest), never row dicts: about 12 us per transaction with its two logs here.
"""

from __future__ import annotations

import array
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


# ---- conversions, a column at a time (strict: hostile input) -------------------------------------
#
# Why column-wise: the checks run over a whole column at C speed (``map`` over str methods, ``set``
# of lengths), fixed-size binaries (hashes, addresses, topics) become ONE bytes.fromhex of the joined
# column handed to Arrow as a buffer, and per value only int(v, 16) or bytes.fromhex(v[2:]) remains,
# inside comprehensions. (A regex over the joined column was tried: Python's engine is slower per
# character than these per-value calls.)

_ZERO = {n: "0x" + "00" * n for n in (20, 32)}
_PREFIX = itertools.repeat("0x")


class _BadValue(ValueError):
    """A column holds a value that is not what the JSON-RPC spec promises; ``row`` says where."""

    def __init__(self, column: str, row: int, value: Any, why: str) -> None:
        super().__init__(f"{column}: {why}: {str(value)[:80]!r}")
        self.row = row


def _first_bad(column: str, values: list[Any], good: Any, why: str) -> _BadValue:
    for row, value in enumerate(values):
        try:
            if good(value):
                continue
        except (TypeError, ValueError, AttributeError):
            pass
        return _BadValue(column, row, value, why)
    return _BadValue(column, 0, None, why)  # the column as a whole failed (e.g. misaligned lengths)


def _prefixed(values: list[Any]) -> bool:
    """Every value a str starting with 0x (TypeError when one is not a str)."""
    return all(map(str.startswith, values, _PREFIX))


def _quantities(column: str, values: list[Any], nullable: bool = False) -> list[Any]:
    """Hex quantities as ints (None kept where ``nullable``). ``int(v, 16)`` also takes "0x1_0" or
    surrounding spaces: harmless, the number is the same; ranges are checked by the Arrow types."""
    try:
        if nullable and None in values:
            if not _prefixed([v for v in values if v is not None]):
                raise ValueError
            return [None if v is None else int(v, 16) for v in values]
        if not _prefixed(values):
            raise ValueError
        return [int(v, 16) for v in values]
    except (TypeError, ValueError):
        raise _first_bad(column, values, lambda v: (nullable and v is None) or (
            v.startswith("0x") and int(v, 16) >= 0), "not a hex quantity") from None


def _fixed(column: str, values: list[Any], size: int, nullable: bool = False) -> pa.Array:
    """``size``-byte hex values as a large_binary array built from buffers: ONE fromhex of the
    column and shared offsets. Exact: every value a str of 2 + 2 * size characters (the set of
    lengths), each starting with 0x (every width-th character of the joined column), the rest hex
    (fromhex), and no spaces (fromhex skips them: the decoded length would fall short)."""
    n = len(values)
    if not n:
        return pa.array([], _BIN)
    validity = None
    if nullable and None in values:
        validity = pa.array([v is not None for v in values], _BOOL).buffers()[1]
        values = [_ZERO[size] if v is None else v for v in values]
    width = 2 + 2 * size
    try:
        joined = "".join(values)
        if set(map(len, values)) != {width} or joined[0::width] != "0" * n or joined[1::width] != "x" * n:
            raise ValueError
        data = bytes.fromhex("".join([v[2:] for v in values]))
        if len(data) != size * n:
            raise ValueError
    except (TypeError, ValueError):
        raise _first_bad(column, values, lambda v: len(v) == width and v.startswith("0x") and len(
            bytes.fromhex(v[2:])) == size, f"not {size} bytes of hex") from None
    return pa.LargeBinaryArray.from_buffers(_BIN, n, [validity, _offsets(size, n), pa.py_buffer(data)])


_OFFSETS: dict[int, pa.Buffer] = {}


def _offsets(size: int, n: int) -> pa.Buffer:
    """int64 offsets 0, size, 2 * size, ... for n values: one buffer per size, grown as needed and
    shared (Arrow buffers are immutable), sliced without a copy."""
    offsets = _OFFSETS.get(size)
    if offsets is None or offsets.size < 8 * (n + 1):
        offsets = pa.py_buffer(array.array("q", range(0, size * (2 * n + 1024) + 1, size)).tobytes())
        _OFFSETS[size] = offsets
    return offsets.slice(0, 8 * (n + 1))


def _data(column: str, values: list[Any]) -> list[bytes]:
    try:
        if not _prefixed(values):
            raise ValueError
        return [bytes.fromhex(v[2:]) for v in values]
    except (TypeError, ValueError):
        raise _first_bad(column, values, lambda v: v.startswith("0x") and bytes.fromhex(v[2:]) is not None,
                         "not 0x-prefixed hex data of whole bytes") from None


def tables_from_rpc(bundles: Sequence[tuple[dict[str, Any], list[dict[str, Any]]]],
                    chain_id: int) -> dict[str, pa.Table]:
    """The three datasets of these blocks, exactly as cryo 0.3.2 would write them.

    ``bundles``: per block, ``eth_getBlockByHash(h, true)``'s answer (full transactions) and
    ``eth_getBlockReceipts(h)``'s (one receipt per transaction, in block order), in any block order.
    Raises ``MalformedChainData`` on anything that is not such a pair; the message names the block
    and the column."""
    blocks: list[dict[str, Any]] = []
    txs: list[dict[str, Any]] = []
    receipts: list[dict[str, Any]] = []
    logs: list[dict[str, Any]] = []
    tx_owner: list[int] = []  # row -> its block's index in ``blocks``, to name the block of a bad value
    log_owner: list[int] = []
    for block, block_receipts in bundles:
        try:
            _collect(block, block_receipts, len(blocks), txs, receipts, logs, log_owner)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise _malformed(block, exc) from exc
        tx_owner.extend([len(blocks)] * len(block_receipts))
        blocks.append(block)
    tables = {}
    for dataset, rows, owner in (("blocks", blocks, None), ("transactions", txs, tx_owner), ("logs", logs, log_owner)):
        try:
            if dataset == "blocks":
                columns = _block_columns(blocks)
            elif dataset == "transactions":
                columns = _transaction_columns(txs, receipts)
            else:
                columns = _log_columns(logs)
        except _BadValue as exc:
            raise _malformed(blocks[exc.row if owner is None else owner[exc.row]], exc) from exc
        tables[dataset] = _table(dataset, columns, len(rows), chain_id)
    return tables


def _malformed(block: Any, exc: Exception) -> MalformedChainData:
    where = block.get("hash") if isinstance(block, dict) else None
    where = str(where)[:80] if isinstance(where, str) else repr(block)[:80]
    return MalformedChainData(f"block {where}: {exc}", details={"block": where})


def _collect(block: Any, block_receipts: Any, index: int, txs: list[dict[str, Any]],
             receipts: list[dict[str, Any]], logs: list[dict[str, Any]], log_owner: list[int]) -> None:
    """Shape checks (objects and arrays where the spec has them, one receipt per transaction and
    in its order) and the flat lists of transactions, receipts and (complete) logs."""
    if type(block) is not dict:
        raise ValueError(f"the block is not a JSON object but {type(block).__name__}")
    transactions = block.get("transactions")
    if type(transactions) is not list or type(block_receipts) is not list:
        raise ValueError("transactions and receipts must be JSON arrays")
    if len(block_receipts) != len(transactions):
        raise ValueError(f"{len(transactions)} transactions but {len(block_receipts)} receipts")
    for tx, receipt in zip(transactions, block_receipts, strict=True):
        if type(tx) is not dict:
            raise ValueError("the block's transactions are not objects (ask for full transactions)")
        if type(receipt) is not dict:
            raise ValueError("a receipt is not a JSON object")
        if receipt.get("transactionHash") != tx.get("hash"):
            raise ValueError(f"the receipt of {str(receipt.get('transactionHash'))[:80]} where that of "
                             f"{str(tx.get('hash'))[:80]} was due")
        receipt_logs = receipt.get("logs")
        if type(receipt_logs) is not list:
            raise ValueError("a receipt's logs are not a JSON array")
        for log in receipt_logs:
            if type(log) is not dict:
                raise ValueError("a log is not a JSON object")
            if (log.get("logIndex") is None or log.get("blockNumber") is None or log.get("transactionHash") is None
                    or log.get("transactionIndex") is None):
                continue  # a pending log: cryo skips it too
            if type(log.get("topics")) is not list:
                raise ValueError("a log's topics are not a JSON array")
            logs.append(log)
            log_owner.append(index)
    txs.extend(transactions)
    receipts.extend(block_receipts)


def _block_columns(blocks: list[dict[str, Any]]) -> dict[str, Any]:
    def get(key: str) -> list[Any]:
        return [block.get(key) for block in blocks]

    return {
        "block_hash": _fixed("hash", get("hash"), 32, nullable=True),
        "author": _fixed("miner", get("miner"), 20, nullable=True),
        "block_number": _quantities("number", get("number"), nullable=True),
        "gas_used": _quantities("gasUsed", get("gasUsed")),
        "extra_data": _data("extraData", get("extraData")),
        "timestamp": _quantities("timestamp", get("timestamp")),
        "base_fee_per_gas": _quantities("baseFeePerGas", get("baseFeePerGas"), nullable=True),
    }


def _transaction_columns(txs: list[dict[str, Any]], receipts: list[dict[str, Any]]) -> dict[str, Any]:
    def get(key: str) -> list[Any]:
        return [tx.get(key) for tx in txs]

    raw_values = get("value")
    values = _quantities("value", raw_values)
    if values and max(values) >= _U256_LIMIT:
        raise _BadValue("value", values.index(max(values)), raw_values[values.index(max(values))],
                        "more than 256 bits")
    inputs = _data("input", get("input"))
    n_bytes = [len(data) for data in inputs]
    n_zero = [data.count(0) for data in inputs]
    block_numbers = _quantities("blockNumber", get("blockNumber"), nullable=True)
    gas_used = _quantities("receipt gasUsed", [r.get("gasUsed") for r in receipts], nullable=True)
    statuses = [r.get("status") for r in receipts]
    if None in statuses:
        success = [_success_without_status(tx, number, used) if status is None else None
                   for tx, number, used, status in zip(txs, block_numbers, gas_used, statuses, strict=True)]
        known = _quantities("receipt status", statuses, nullable=True)
        success = [flag if status is None else status == 1 for flag, status in zip(success, known, strict=True)]
    else:
        success = [status == 1 for status in _quantities("receipt status", statuses)]
    return {
        "block_number": block_numbers,
        "transaction_index": _quantities("transactionIndex", get("transactionIndex"), nullable=True),
        "transaction_hash": _fixed("hash", get("hash"), 32),
        "nonce": _quantities("nonce", get("nonce")),
        "from_address": _fixed("from", get("from"), 20),
        "to_address": _fixed("to", get("to"), 20, nullable=True),
        "value_binary": pa.LargeBinaryArray.from_buffers(_BIN, len(values), [
            None, _offsets(32, len(values)), pa.py_buffer(b"".join([v.to_bytes(32, "big") for v in values]))]),
        "value_string": [str(v) for v in values],
        "value_f64": [float(v) for v in values],
        "input": inputs,
        "gas_limit": _quantities("gas", get("gas")),
        "gas_used": gas_used,
        "gas_price": _quantities("gasPrice", get("gasPrice"), nullable=True),
        "transaction_type": _quantities("type", get("type"), nullable=True),
        "max_priority_fee_per_gas": _quantities("maxPriorityFeePerGas", get("maxPriorityFeePerGas"), nullable=True),
        "max_fee_per_gas": _quantities("maxFeePerGas", get("maxFeePerGas"), nullable=True),
        "success": success,
        "n_input_bytes": n_bytes,
        "n_input_zero_bytes": n_zero,
        "n_input_nonzero_bytes": [n - z for n, z in zip(n_bytes, n_zero, strict=True)],
    }


def _success_without_status(tx: dict[str, Any], block_number: int | None, gas_used: int | None) -> bool:
    """cryo 0.3.2's rule for a receipt without status, kept for parity: on chain 1 before Byzantium
    ``gas_used == 0`` (sic); anywhere else the transaction is an error."""
    chain = tx.get("chainId")
    if chain == "0x1" and block_number is not None and block_number < _BYZANTIUM_BLOCK and gas_used is not None:
        return gas_used == 0
    raise _BadValue("receipt status", 0, None, "could not determine the status of transaction (no status)")


def _log_columns(logs: list[dict[str, Any]]) -> dict[str, Any]:
    def get(key: str) -> list[Any]:
        return [log.get(key) for log in logs]

    topics = [log["topics"] for log in logs]
    columns: dict[str, Any] = {
        "block_number": _quantities("blockNumber", get("blockNumber")),
        "transaction_index": _quantities("transactionIndex", get("transactionIndex")),
        "log_index": _quantities("logIndex", get("logIndex")),
        "transaction_hash": _fixed("transactionHash", get("transactionHash"), 32),
        "address": _fixed("address", get("address"), 20),
    }
    for i in range(4):
        columns[f"topic{i}"] = _fixed(f"topic{i}", [t[i] if len(t) > i else None for t in topics], 32, nullable=True)
    columns["data"] = _data("data", get("data"))
    return columns


def _table(dataset: str, columns: dict[str, Any], rows: int, chain_id: int) -> pa.Table:
    schema = SCHEMAS[dataset]
    columns["chain_id"] = [chain_id] * rows
    try:
        arrays = [column if isinstance(column := columns[field.name], pa.Array) else pa.array(column, type=field.type)
                  for field in schema]
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
