"""Batch artifacts: a UDF's JSON rows as a typed Arrow table, and a table as Parquet bytes.

Kept apart from ``tracecore.data.publish`` (which validates and writes batches) because building a
batch is pure: no database, only the dataset's declared columns. Why rows are typed here and
not left to pyarrow's inference: JSON has no literal for timestamps, dates, decimals or bytes,
so a UDF sends them as ISO text, numbers or ``0x`` hex, and the declared type says how to read
them. A value that does not convert faithfully keeps its own type, so the publish's validation
names the column (``schema_mismatch``) instead of the row silently changing (pyarrow would
truncate 1.5 into an int64 column).
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from tracecore.data.schema import arrow_schema, parse_arrow_type


def encode(table: pa.Table) -> tuple[bytes, str]:
    """The table as Parquet bytes and their SHA-256 (hex): what a manifest pins."""
    sink = io.BytesIO()
    pq.write_table(table, sink)
    data = sink.getvalue()
    return data, hashlib.sha256(data).hexdigest()


def rows_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[Mapping[str, Any]] | None,
               unique_key: Sequence[str] = ()) -> pa.Table:
    """JSON rows as an Arrow table, columns as the rows name them (declared ones typed as declared).

    A declared nullable column that no row names is all nulls (JSON omits nulls); a missing
    unique-key or NOT NULL column stays missing, for the validation to name. No rows at all
    is an empty table of the declared schema.
    """
    if not rows and columns is not None:
        return arrow_schema(columns).empty_table()
    declared = {column["name"]: column for column in columns or ()}
    names = list(dict.fromkeys(name for row in rows for name in row))
    names += [name for name, column in declared.items()
              if name not in names and column["nullable"] and name not in unique_key]
    arrays = [_array([row.get(name) for row in rows], declared[name]["type"] if name in declared else None)
              for name in names]
    return pa.Table.from_arrays(arrays, names=[str(name) for name in names])


def _array(values: list[Any], type_text: str | None) -> pa.Array:
    """One column: as declared when the values convert faithfully, else as they are."""
    target = parse_arrow_type(type_text) if type_text else None
    present = [value for value in values if value is not None]
    if target is not None:
        if pa.types.is_integer(target) and not all(type(v) is int for v in present):
            target = None  # pyarrow would truncate 1.5 silently; keep the float to be refused
        elif pa.types.is_boolean(target) and not all(isinstance(v, bool) for v in present):
            target = None
        elif pa.types.is_floating(target) and not all(type(v) in (int, float) for v in present):
            target = None
    binary = target is not None and (pa.types.is_binary(target) or pa.types.is_large_binary(target)
                                     or pa.types.is_fixed_size_binary(target))
    if binary:  # pyarrow would store the text "0x00ff" itself as bytes
        try:
            return pa.array([_unhex(v) for v in values], type=target)
        except (pa.ArrowException, ValueError, TypeError):
            target = None
    if target is not None:
        try:
            return pa.array(values, type=target)
        except (pa.ArrowException, OverflowError, TypeError, ValueError):
            pass
        if _parsed_from_text(target):
            try:
                return pa.array([str(v) if v is not None else None for v in values]).cast(target)
            except (pa.ArrowException, ValueError):
                pass
    try:
        return pa.array(values)
    except (pa.ArrowException, OverflowError, TypeError, ValueError):
        return pa.array([None if v is None else json.dumps(v, default=str) for v in values], type=pa.string())


def _unhex(value: Any) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    if isinstance(value, str) and value.startswith("0x"):
        return bytes.fromhex(value[2:])
    raise ValueError("binary values travel as 0x-prefixed hex")


def _parsed_from_text(target: pa.DataType) -> bool:
    """Types JSON has no literal for, so a UDF sends them as text (or numbers, for decimals)."""
    t = pa.types
    return t.is_timestamp(target) or t.is_date(target) or t.is_time(target) or t.is_decimal(target)
