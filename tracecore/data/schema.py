"""Dataset schemas: Arrow types spelled as text, checked with pyarrow, mapped to PostgreSQL.

Partition keys and version manifests are checked here too, for the same reason.

This module is pure (stdlib and pyarrow, no database) because two callers need it without
one: the DAG parser (``outputs[i].schema`` is checked when a DAG is saved, with the DAG's
error paths) and the dataset service. A schema is a JSON list of columns
``[{"name", "type", "nullable"}]``; ``type`` is an Arrow type in the spelling DuckDB and
pyarrow both understand (``int64``, ``float64``, ``string``, ``bool``, ``date32``,
``timestamp[us, tz=UTC]``, ``decimal128(38, 0)``, ``binary``, ``list<string>`` ...).

Every type has one canonical spelling (``double`` becomes ``float64``, ``decimal128(38,0)``
becomes ``decimal128(38, 0)``), so that two schemas that mean the same thing have the same
fingerprint: the fingerprint is what a batch manifest quotes to say which schema it was
written against. Columns are matched by name, never by position.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from datetime import date
from typing import Any, Literal, cast
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import pyarrow as pa

from tracecore.exceptions import ValidationError
from tracecore.infra.storage import check_key

KINDS = ("raw", "derived", "buffered")
# Dataset names follow job names (the int form of `outputs` names datasets after jobs), longer
# because `<job>_<i>` must fit. Column names are lower case: DuckDB compares identifiers without
# case and PostgreSQL folds unquoted ones, so `Value` and `value` would collide in one of them.
DATASET_NAME_RE = re.compile(r"[a-z][a-z0-9_-]{0,127}")
COLUMN_NAME_RE = re.compile(r"[a-z][a-z0-9_]{0,62}")
# Columns every hot table adds itself; a schema may not declare them.
RESERVED_COLUMNS = frozenset({"org_id"})
MAX_COLUMNS = 1000

_COLUMN_KEYS = ("name", "type", "nullable")
_OUTPUT_KEYS = ("dataset", "kind", "schema", "pii", "description")
_ALIASES = {
    "double": "float64", "float": "float32", "f8": "float64", "f4": "float32", "utf8": "string", "str": "string",
    "large_utf8": "large_string", "large_str": "large_string", "boolean": "bool", "i1": "int8", "i2": "int16",
    "i4": "int32", "i8": "int64", "u1": "uint8", "u2": "uint16", "u4": "uint32", "u8": "uint64",
    "date32[day]": "date32", "date64[ms]": "date64",
}
_SCALARS: dict[str, pa.DataType] = {
    "int8": pa.int8(), "int16": pa.int16(), "int32": pa.int32(), "int64": pa.int64(), "uint8": pa.uint8(),
    "uint16": pa.uint16(), "uint32": pa.uint32(), "uint64": pa.uint64(), "float32": pa.float32(),
    "float64": pa.float64(), "bool": pa.bool_(), "string": pa.string(), "large_string": pa.large_string(),
    "binary": pa.binary(), "large_binary": pa.large_binary(), "date32": pa.date32(), "date64": pa.date64(),
}
# The units the patterns below admit, as pyarrow's constructors spell them.
_Unit = Literal["s", "ms", "us", "ns"]
_Time32Unit = Literal["s", "ms"]
_Time64Unit = Literal["us", "ns"]
_TIMESTAMP = re.compile(r"timestamp\[\s*(s|ms|us|ns)\s*(?:,\s*tz\s*=\s*([^\]\s]+)\s*)?\]")
_TIME = re.compile(r"(time32|time64)\[\s*(s|ms|us|ns)\s*\]")
_DECIMAL = re.compile(r"(decimal128|decimal256|decimal)\(\s*(\d{1,3})\s*,\s*(\d{1,3})\s*\)")
_FIXED_BINARY = re.compile(r"fixed_size_binary\[\s*(\d{1,6})\s*\]")
_LIST = re.compile(r"list<\s*(?:item\s*:\s*)?(.+?)\s*>")
_OFFSET = re.compile(r"[+-](?:[01]\d|2[0-3]):[0-5]\d")

_SHA256 = re.compile(r"[0-9a-f]{64}")
_BLOCKS = re.compile(r"blocks:(\d{1,20})-(\d{1,20})")
_DATES = re.compile(r"date:(\d{4}-\d{2}-\d{2})(?:\.\.(\d{4}-\d{2}-\d{2}))?")

Problem = tuple[str, str, str]  # (code, path, message), as dag_spec reports them


def parse_arrow_type(text: str) -> pa.DataType:
    """The Arrow type a type string names; ValueError says why it names none we support.

    Supported: signed and unsigned integers, float32/float64, bool, (large_)string,
    (large_)binary, fixed_size_binary[n], date32/date64, time32/time64, timestamp with a unit
    and an optional IANA or ``+HH:MM`` zone, decimal128/decimal256, and ``list<T>`` of those.
    Not supported: half floats, nested lists, structs, maps, durations: neither PostgreSQL
    (hot rows) nor DuckDB (queries) agree on them.
    """
    if not isinstance(text, str):
        raise ValueError(f"a type is a string, got {type(text).__name__}")
    spelled = text.strip()
    if match := _LIST.fullmatch(spelled):
        inner = _scalar(match.group(1))
        return pa.list_(inner)
    return _scalar(spelled)


def _scalar(text: str) -> pa.DataType:
    name = _ALIASES.get(text, text)
    if name in _SCALARS:
        return _SCALARS[name]
    if match := _TIMESTAMP.fullmatch(text):
        unit, tz = match.groups()
        if tz is not None:
            _check_zone(tz)
        return pa.timestamp(cast(_Unit, unit), tz=tz)
    if match := _TIME.fullmatch(text):
        kind, unit = match.groups()
        if (kind == "time32") != (unit in ("s", "ms")):
            raise ValueError(f"{kind} takes {'s or ms' if kind == 'time32' else 'us or ns'}, not {unit}")
        return pa.time32(cast(_Time32Unit, unit)) if kind == "time32" else pa.time64(cast(_Time64Unit, unit))
    if match := _DECIMAL.fullmatch(text):
        kind, precision, scale = match.group(1), int(match.group(2)), int(match.group(3))
        if scale > precision:
            raise ValueError(f"decimal scale {scale} exceeds its precision {precision}")
        make = pa.decimal256 if kind == "decimal256" or (kind == "decimal" and precision > 38) else pa.decimal128
        return make(precision, scale)  # ValueError when the precision is out of range
    if match := _FIXED_BINARY.fullmatch(text):
        width = int(match.group(1))
        if width < 1:
            raise ValueError("fixed_size_binary needs a width >= 1")
        return pa.binary(width)
    if text.startswith("list<"):
        raise ValueError("a list holds a scalar type; nested lists are not supported")
    raise ValueError(f"unknown or unsupported type {text!r} (examples: int64, float64, string, bool, date32, "
                     "timestamp[us, tz=UTC], decimal128(38, 0), binary, list<string>)")


def _check_zone(tz: str) -> None:
    if tz == "UTC" or _OFFSET.fullmatch(tz):
        return
    try:
        ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise ValueError(f"unknown time zone {tz!r} (IANA names such as UTC or Europe/Paris, or +HH:MM)") from None


def type_name(arrow_type: pa.DataType) -> str:
    """The canonical spelling of a supported type; ``parse_arrow_type`` reads it back unchanged."""
    if pa.types.is_list(arrow_type):
        return f"list<{type_name(arrow_type.value_type)}>"
    for name in ("float64", "float32", "date32", "date64"):
        if arrow_type == _SCALARS[name]:
            return name
    return str(arrow_type)


def canonical_type(text: str) -> str:
    """``type_name(parse_arrow_type(text))``: how a type string is stored."""
    return type_name(parse_arrow_type(text))


def check_columns(raw: Any, path: str = "schema") -> tuple[list[dict[str, Any]] | None, list[Problem]]:
    """Normalize a schema and list every problem in it (not only the first).

    Answers the normalized columns (canonical types, ``nullable`` defaulting to true; None
    when ``raw`` is not a list at all) and the problems as ``(code, path, message)``; type
    errors are ``invalid_type_name`` at ``<path>[i].type``.
    """
    problems: list[Problem] = []
    if not isinstance(raw, Sequence) or isinstance(raw, (str, bytes)):
        return None, [("invalid_type", path, "a schema is a list of {name, type, nullable} columns")]
    if not raw:
        problems.append(("invalid_value", path, "a schema needs at least one column"))
    if len(raw) > MAX_COLUMNS:
        return None, [("invalid_value", path, f"a schema has at most {MAX_COLUMNS} columns")]
    columns: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    for index, item in enumerate(raw):
        at = f"{path}[{index}]"
        if not isinstance(item, Mapping):
            problems.append(("invalid_type", at, "a column is a mapping {name, type, nullable}"))
            continue
        problems.extend(("unknown_key", f"{at}.{key}", f"unknown key {key!r} (known: {', '.join(_COLUMN_KEYS)})")
                        for key in item if key not in _COLUMN_KEYS)
        name, type_text, nullable = item.get("name"), item.get("type"), item.get("nullable", True)
        column_ok = True
        if name is None:
            problems.append(("missing_key", f"{at}.name", "a column needs 'name'"))
            column_ok = False
        elif not isinstance(name, str) or not COLUMN_NAME_RE.fullmatch(name):
            problems.append(("invalid_value", f"{at}.name",
                             f"column name {name!r} must match ^[a-z][a-z0-9_]{{0,62}}$"))
            column_ok = False
        elif name in RESERVED_COLUMNS:
            problems.append(("reserved_column", f"{at}.name", f"{name!r} is added by the platform; rename the column"))
            column_ok = False
        elif name in seen:
            problems.append(("duplicate_column", f"{at}.name", f"column {name!r} is already {path}[{seen[name]}]"))
            column_ok = False
        else:
            seen[name] = index
        canonical = None
        if type_text is None:
            problems.append(("missing_key", f"{at}.type", "a column needs 'type'"))
        else:
            try:
                canonical = canonical_type(type_text)
            except ValueError as exc:
                problems.append(("invalid_type_name", f"{at}.type", str(exc)))
        if nullable is None:
            nullable = True
        if not isinstance(nullable, bool):
            problems.append(("invalid_type", f"{at}.nullable", "nullable is true or false"))
        elif column_ok and canonical is not None:
            columns.append({"name": name, "type": canonical, "nullable": nullable})
    return columns, problems


def normalize_schema(raw: Any, path: str = "schema") -> list[dict[str, Any]]:
    """The normalized columns, or one ValidationError listing every problem in ``details.errors``."""
    columns, problems = check_columns(raw, path)
    if problems:
        code, at, message = problems[0]
        raise ValidationError(message, path=at, code=code,
                              details={"errors": [{"code": c, "path": p, "message": m} for c, p, m in problems]})
    assert columns is not None
    return columns


def output_declaration(dataset: str, kind: str = "derived", schema: list[dict[str, Any]] | None = None,
                       pii: bool = False, description: str = "") -> dict[str, Any]:
    """One normalized output declaration of a job (``JobSpec.output_datasets`` items).

    ``schema`` None means "not declared yet": a schema is optional until the first publish.
    """
    return {"dataset": dataset, "kind": kind, "schema": schema, "pii": pii, "description": description}


def check_output_declaration(raw: Any, path: str) -> tuple[dict[str, Any] | None, list[Problem]]:
    """Normalize one item of a job's ``outputs`` list: ``{dataset, kind, schema, pii, description}``.

    Answers the declaration (None when it names no usable dataset) and every problem found,
    with the DAG's paths (``jobs[0].outputs[1].schema[2].type``). An explicit null takes the
    default, as everywhere in a DAG file.
    """
    if not isinstance(raw, Mapping):
        return None, [("invalid_type", path, "an output declaration is a mapping {dataset, kind, schema, pii}")]
    known = ", ".join(_OUTPUT_KEYS)
    problems: list[Problem] = [("unknown_key", f"{path}.{key}", f"unknown key {key!r} (known: {known})")
                               for key in raw if key not in _OUTPUT_KEYS]
    spec = {key: value for key, value in raw.items() if key in _OUTPUT_KEYS and value is not None}
    name = spec.get("dataset")
    if name is None:
        problems.append(("missing_key", f"{path}.dataset", "an output declaration needs 'dataset'"))
    elif not isinstance(name, str):
        problems.append(("invalid_type", f"{path}.dataset", "expected string"))
    elif not DATASET_NAME_RE.fullmatch(name):
        problems.append(("invalid_value", f"{path}.dataset",
                         f"dataset name {name!r} must match ^[a-z][a-z0-9_-]{{0,127}}$"))
    kind = spec.get("kind", "derived")
    if not isinstance(kind, str):
        problems.append(("invalid_type", f"{path}.kind", "expected string"))
    elif kind not in KINDS:
        problems.append(("unknown_kind", f"{path}.kind", f"{kind!r} is not one of {', '.join(KINDS)}"))
    schema = None
    if "schema" in spec:
        schema, schema_problems = check_columns(spec["schema"], f"{path}.schema")
        problems.extend(schema_problems)
    pii, description = spec.get("pii", False), spec.get("description", "")
    if not isinstance(pii, bool):
        problems.append(("invalid_type", f"{path}.pii", "expected boolean"))
    if not isinstance(description, str):
        problems.append(("invalid_type", f"{path}.description", "expected string"))
    if not isinstance(name, str) or not DATASET_NAME_RE.fullmatch(name):
        return None, problems
    return output_declaration(name, kind if kind in KINDS else "derived", schema, pii is True,
                              description if isinstance(description, str) else ""), problems


def schema_fingerprint(columns: Sequence[Mapping[str, Any]]) -> str:
    """SHA-256 (hex) of the canonical JSON of normalized columns: equal schemas, equal fingerprints."""
    canonical = [{"name": c["name"], "type": c["type"], "nullable": bool(c["nullable"])} for c in columns]
    return hashlib.sha256(json.dumps(canonical, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def arrow_schema(columns: Sequence[Mapping[str, Any]]) -> pa.Schema:
    """The pyarrow schema of normalized columns (what a batch file is checked against)."""
    return pa.schema([pa.field(c["name"], parse_arrow_type(c["type"]), nullable=c["nullable"]) for c in columns])


def schema_change_problem(old: Sequence[Mapping[str, Any]], new: Sequence[Mapping[str, Any]]) -> str | None:
    """Why ``new`` cannot replace ``old`` once versions exist, or None when it can.

    Compatible means every existing file still reads under the new schema: no column is
    dropped or retyped, no nullable column becomes NOT NULL, and added columns are nullable
    (older files simply lack them). Order does not matter: columns match by name.
    """
    new_by_name = {c["name"]: c for c in new}
    old_names = {c["name"] for c in old}
    for column in old:
        replacement = new_by_name.get(column["name"])
        if replacement is None:
            return f"column {column['name']!r} would be dropped"
        if replacement["type"] != column["type"]:
            return f"column {column['name']!r} would change type from {column['type']} to {replacement['type']}"
        if column["nullable"] and not replacement["nullable"]:
            return f"column {column['name']!r} would become NOT NULL"
    for column in new:
        if column["name"] not in old_names and not column["nullable"]:
            return f"added column {column['name']!r} must be nullable (existing versions lack it)"
    return None


def pg_type(arrow_type: pa.DataType) -> str:
    """The PostgreSQL column type that holds an Arrow type's values without loss (hot tables).

    Nanosecond timestamps and times are the exception: PostgreSQL keeps microseconds.
    """
    t = pa.types
    if t.is_list(arrow_type):
        return pg_type(arrow_type.value_type) + "[]"
    if t.is_decimal(arrow_type):
        return f"numeric({arrow_type.precision}, {arrow_type.scale})"
    if t.is_timestamp(arrow_type):
        return "timestamptz" if arrow_type.tz is not None else "timestamp"
    checks = (
        (t.is_int8, "smallint"), (t.is_int16, "smallint"), (t.is_int32, "integer"), (t.is_int64, "bigint"),
        (t.is_uint8, "smallint"), (t.is_uint16, "integer"), (t.is_uint32, "bigint"), (t.is_uint64, "numeric(20, 0)"),
        (t.is_float32, "real"), (t.is_float64, "double precision"), (t.is_boolean, "boolean"),
        (t.is_string, "text"), (t.is_large_string, "text"), (t.is_binary, "bytea"), (t.is_large_binary, "bytea"),
        (t.is_fixed_size_binary, "bytea"), (t.is_date, "date"), (t.is_time, "time"),
    )
    for check, name in checks:
        if check(arrow_type):
            return name
    raise ValueError(f"no PostgreSQL type for {arrow_type}")


def pg_column_type(type_text: str) -> str:
    """``pg_type`` of a type string."""
    return pg_type(parse_arrow_type(type_text))


def parse_partition_key(key: str) -> tuple[str, str, str]:
    """``blocks:100-199`` -> (block_range, 100, 199); ``date:2026-11-23`` or
    ``date:2026-11-01..2026-11-30`` -> (date, start, end). Bounds are inclusive."""
    if match := _BLOCKS.fullmatch(key):
        start, end = int(match.group(1)), int(match.group(2))
        if start <= end:
            return "block_range", str(start), str(end)
    elif match := _DATES.fullmatch(key):
        try:
            start_day = date.fromisoformat(match.group(1))
            end_day = date.fromisoformat(match.group(2) or match.group(1))
        except ValueError:
            pass
        else:
            if start_day <= end_day:
                return "date", start_day.isoformat(), end_day.isoformat()
    raise ValidationError(f"partition key {key!r} must look like blocks:100-199 or date:2026-11-23 "
                          "(or date:2026-11-01..2026-11-30), start <= end", path="partition_key",
                          code="invalid_partition_key")


def check_manifest(manifest: Mapping[str, Any], partition_key: str | None) -> list[dict[str, Any]]:
    """The manifest's files, checked (keys stay inside the store, SHA-256 is hex, counts are
    integers >= 0) and tagged with ``partition_key``; its totals, if given, must be their sums.
    ValidationError ``invalid_manifest`` names the field."""
    files = manifest.get("files") if isinstance(manifest, Mapping) else None
    if not isinstance(files, list):
        raise ValidationError("a manifest is {files: [{key, sha256, rows, bytes}], rows, bytes}", path="manifest",
                              code="invalid_manifest")
    checked = []
    for index, item in enumerate(files):
        at = f"manifest.files[{index}]"
        if not isinstance(item, Mapping):
            raise ValidationError("a manifest file is {key, sha256, rows, bytes}", path=at, code="invalid_manifest")
        try:
            key = check_key(item.get("key"))  # type: ignore[arg-type]
        except ValueError as exc:
            raise ValidationError(str(exc), path=f"{at}.key", code="invalid_manifest") from None
        if not isinstance(item.get("sha256"), str) or not _SHA256.fullmatch(item["sha256"]):
            raise ValidationError("sha256 is 64 lower-case hex digits", path=f"{at}.sha256", code="invalid_manifest")
        for field in ("rows", "bytes"):
            value = item.get(field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValidationError(f"{field} is an integer >= 0", path=f"{at}.{field}", code="invalid_manifest")
        entry = {"key": key, "sha256": item["sha256"], "rows": item["rows"], "bytes": item["bytes"]}
        if partition_key or item.get("partition"):
            entry["partition"] = partition_key or item["partition"]
        checked.append(entry)
    for field in ("rows", "bytes"):
        if field in manifest and manifest[field] != sum(entry[field] for entry in checked):
            raise ValidationError(f"manifest {field} is not the sum of its files'", path=f"manifest.{field}",
                                  code="invalid_manifest")
    return checked
