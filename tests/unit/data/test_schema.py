"""Unit tests of dataset schemas: Arrow type names, validation paths, fingerprints, PostgreSQL
types, compatibility, output declarations in a DAG, partition keys and manifests."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pytest

from tracecore.dags.spec import DagSpec, JobSpec, parse_dag
from tracecore.data import schema as ds
from tracecore.exceptions import ValidationError


@pytest.mark.parametrize(("spelled", "canonical", "arrow"), [
    ("int64", "int64", pa.int64()),
    ("int32", "int32", pa.int32()),
    ("uint64", "uint64", pa.uint64()),
    ("float64", "float64", pa.float64()),
    ("double", "float64", pa.float64()),
    ("float32", "float32", pa.float32()),
    ("string", "string", pa.string()),
    ("utf8", "string", pa.string()),
    ("large_string", "large_string", pa.large_string()),
    ("bool", "bool", pa.bool_()),
    ("boolean", "bool", pa.bool_()),
    ("binary", "binary", pa.binary()),
    ("fixed_size_binary[20]", "fixed_size_binary[20]", pa.binary(20)),
    ("date32", "date32", pa.date32()),
    ("date32[day]", "date32", pa.date32()),
    ("timestamp[us]", "timestamp[us]", pa.timestamp("us")),
    ("timestamp[us, tz=UTC]", "timestamp[us, tz=UTC]", pa.timestamp("us", tz="UTC")),
    ("timestamp[ms,tz=Europe/Paris]", "timestamp[ms, tz=Europe/Paris]", pa.timestamp("ms", tz="Europe/Paris")),
    ("timestamp[s, tz=+05:30]", "timestamp[s, tz=+05:30]", pa.timestamp("s", tz="+05:30")),
    ("time64[us]", "time64[us]", pa.time64("us")),
    ("decimal128(38,0)", "decimal128(38, 0)", pa.decimal128(38, 0)),
    ("decimal128(38, 18)", "decimal128(38, 18)", pa.decimal128(38, 18)),
    ("decimal(76, 0)", "decimal256(76, 0)", pa.decimal256(76, 0)),
    ("list<string>", "list<string>", pa.list_(pa.string())),
    ("list<item: int64>", "list<int64>", pa.list_(pa.int64())),
])
def test_type_names_parse_to_arrow_and_have_one_canonical_spelling(spelled: str, canonical: str,
                                                                   arrow: pa.DataType) -> None:
    assert ds.parse_arrow_type(spelled) == arrow
    assert ds.canonical_type(spelled) == canonical
    # The canonical spelling reads back as the same type (what the database stores is stable).
    assert ds.parse_arrow_type(canonical) == arrow and ds.canonical_type(canonical) == canonical


@pytest.mark.parametrize("spelled", ["int", "varchar", "INT64", "", "float16", "halffloat", "struct<a: int64>",
                                     "list<list<int64>>", "timestamp[us, tz=Mars/Olympus]", "timestamp[h]",
                                     "decimal128(39, 0)", "decimal128(2, 3)", "time32[us]", "map<string, int64>",
                                     "fixed_size_binary[0]", "duration[s]"])
def test_unsupported_or_unknown_types_are_refused(spelled: str) -> None:
    with pytest.raises(ValueError):
        ds.parse_arrow_type(spelled)


def test_a_type_must_be_a_string() -> None:
    with pytest.raises(ValueError, match="string"):
        ds.parse_arrow_type(5)  # type: ignore[arg-type]


def test_columns_are_normalized_with_nullable_defaulting_to_true() -> None:
    columns = ds.normalize_schema([{"name": "block", "type": "int64", "nullable": False},
                                   {"name": "value", "type": "double"}, {"name": "note", "type": "utf8",
                                                                          "nullable": None}])
    assert columns == [{"name": "block", "type": "int64", "nullable": False},
                       {"name": "value", "type": "float64", "nullable": True},
                       {"name": "note", "type": "string", "nullable": True}]


@pytest.mark.parametrize(("schema", "code", "path"), [
    ([{"name": "a", "type": "int64"}, {"name": "b", "type": "int64"}, {"name": "c", "type": "int"}],
     "invalid_type_name", "schema[2].type"),
    ([{"name": "a", "type": "int64"}, {"name": "a", "type": "string"}], "duplicate_column", "schema[1].name"),
    ([{"name": "org_id", "type": "string"}], "reserved_column", "schema[0].name"),
    ([{"name": "Value", "type": "string"}], "invalid_value", "schema[0].name"),
    ([{"name": "_version", "type": "int32"}], "invalid_value", "schema[0].name"),
    ([{"type": "string"}], "missing_key", "schema[0].name"),
    ([{"name": "a"}], "missing_key", "schema[0].type"),
    ([{"name": "a", "type": "int64", "default": 1}], "unknown_key", "schema[0].default"),
    ([{"name": "a", "type": "int64", "nullable": "yes"}], "invalid_type", "schema[0].nullable"),
    (["a"], "invalid_type", "schema[0]"),
    ([], "invalid_value", "schema"),
    ({"a": "int64"}, "invalid_type", "schema"),
])
def test_schema_errors_name_the_field(schema: Any, code: str, path: str) -> None:
    with pytest.raises(ValidationError) as info:
        ds.normalize_schema(schema)
    assert (info.value.code, info.value.path) == (code, path)
    assert info.value.details["errors"][0] == {"code": code, "path": path, "message": info.value.message}


def test_every_problem_of_a_schema_is_listed() -> None:
    columns, problems = ds.check_columns([{"name": "a", "type": "nope"}, {"name": "B", "type": "int64"},
                                          {"name": "c", "type": "int64"}], "x")
    assert [(code, path) for code, path, _ in problems] == [("invalid_type_name", "x[0].type"),
                                                            ("invalid_value", "x[1].name")]
    assert columns == [{"name": "c", "type": "int64", "nullable": True}]


def test_fingerprint_is_the_sha256_of_the_canonical_json() -> None:
    columns = ds.normalize_schema([{"name": "a", "type": "double"}, {"name": "b", "type": "string",
                                                                      "nullable": False}])
    expected = hashlib.sha256(json.dumps([{"name": "a", "nullable": True, "type": "float64"},
                                          {"name": "b", "nullable": False, "type": "string"}],
                                         separators=(",", ":"), sort_keys=True).encode()).hexdigest()
    assert ds.schema_fingerprint(columns) == expected
    # Two spellings of the same schema, one fingerprint; any real change, another.
    same = ds.normalize_schema([{"name": "a", "type": "float64", "nullable": True}, {"name": "b", "type": "utf8",
                                                                                      "nullable": False}])
    assert ds.schema_fingerprint(same) == expected
    relaxed = ds.normalize_schema([{"name": "a", "type": "double"}, {"name": "b", "type": "string"}])
    assert ds.schema_fingerprint(relaxed) != expected


def test_arrow_schema_of_columns() -> None:
    columns = ds.normalize_schema([{"name": "a", "type": "timestamp[us, tz=UTC]", "nullable": False}])
    assert ds.arrow_schema(columns) == pa.schema([pa.field("a", pa.timestamp("us", tz="UTC"), nullable=False)])


@pytest.mark.parametrize(("spelled", "pg"), [
    ("int8", "smallint"), ("int16", "smallint"), ("int32", "integer"), ("int64", "bigint"), ("uint8", "smallint"),
    ("uint16", "integer"), ("uint32", "bigint"), ("uint64", "numeric(20, 0)"), ("float32", "real"),
    ("float64", "double precision"), ("bool", "boolean"), ("string", "text"), ("large_string", "text"),
    ("binary", "bytea"), ("fixed_size_binary[32]", "bytea"), ("date32", "date"), ("date64", "date"),
    ("timestamp[us]", "timestamp"), ("timestamp[us, tz=UTC]", "timestamptz"), ("time64[us]", "time"),
    ("decimal128(38, 0)", "numeric(38, 0)"), ("decimal256(76, 10)", "numeric(76, 10)"),
    ("list<string>", "text[]"), ("list<int64>", "bigint[]"),
])
def test_arrow_types_map_to_postgresql_types(spelled: str, pg: str) -> None:
    assert ds.pg_column_type(spelled) == pg


def _cols(*specs: tuple[str, str, bool]) -> list[dict[str, Any]]:
    return [{"name": name, "type": type_, "nullable": nullable} for name, type_, nullable in specs]


@pytest.mark.parametrize(("new", "problem"), [
    (_cols(("a", "int64", False), ("b", "string", True)), None),
    (_cols(("b", "string", True), ("a", "int64", False)), None),  # order does not matter
    (_cols(("a", "int64", True), ("b", "string", True)), None),  # relaxing NOT NULL is fine
    (_cols(("a", "int64", False), ("b", "string", True), ("c", "float64", True)), None),
    (_cols(("a", "int64", False)), "dropped"),
    (_cols(("a", "int32", False), ("b", "string", True)), "change type"),
    (_cols(("a", "int64", False), ("b", "string", False)), "NOT NULL"),
    (_cols(("a", "int64", False), ("b", "string", True), ("c", "float64", False)), "must be nullable"),
])
def test_schema_compatibility(new: list[dict[str, Any]], problem: str | None) -> None:
    old = _cols(("a", "int64", False), ("b", "string", True))
    found = ds.schema_change_problem(old, new)
    assert (found is None) if problem is None else (found is not None and problem in found)


# -- outputs declared in a DAG ---------------------------------------------------------


@dataclass(frozen=True)
class Op:
    needs_udf: bool


OPERATORS = {"transform": Op(False)}


def parse(jobs: list[dict[str, Any]]) -> DagSpec:
    return parse_dag(jobs, operators=OPERATORS, external_outputs={"block_follower": 1}.get)


def fail(jobs: list[dict[str, Any]]) -> ValidationError:
    with pytest.raises(ValidationError) as info:
        parse(jobs)
    return info.value


def job(name: str = "a", **fields: Any) -> dict[str, Any]:
    return {"name": name, "runtime": "lambda", "operator": "transform", **fields}


LABELS = [{"name": "address", "type": "string", "nullable": False}, {"name": "label", "type": "utf8"}]


def test_int_outputs_declare_derived_datasets_named_after_the_job() -> None:
    spec = parse([job("decode", outputs=3)]).jobs[0]
    assert spec.outputs == 3
    assert [d["dataset"] for d in spec.output_datasets] == ["decode", "decode_1", "decode_2"]
    assert spec.output_datasets[0] == {"dataset": "decode", "kind": "derived", "schema": None, "pii": False,
                                       "description": ""}
    assert parse([job("quiet")]).jobs[0].output_datasets == ()


def test_listed_outputs_are_normalized_and_counted() -> None:
    dag = parse([job("label", outputs=[{"dataset": "labels", "kind": "buffered", "schema": LABELS, "pii": True},
                                       {"dataset": "label_stats"}], unique_key=["address"]),
                 job("use", inputs=[{"from": {"job": "label", "output": 1}}])])
    spec = dag.job("label")
    assert spec.outputs == 2
    assert spec.output_datasets == (
        {"dataset": "labels", "kind": "buffered", "pii": True, "description": "",
         "schema": [{"name": "address", "type": "string", "nullable": False},
                    {"name": "label", "type": "string", "nullable": True}]},
        {"dataset": "label_stats", "kind": "derived", "schema": None, "pii": False, "description": ""})
    data = json.loads(json.dumps(dag.to_dict()))
    assert DagSpec.from_dict(data) == dag
    assert JobSpec.from_dict(spec.to_dict()) == spec


def test_a_spec_stored_before_declarations_existed_still_has_them() -> None:
    stored = parse([job("decode", outputs=2)]).jobs[0].to_dict()
    del stored["output_datasets"]
    assert [d["dataset"] for d in JobSpec.from_dict(stored).output_datasets] == ["decode", "decode_1"]


def test_an_input_may_not_point_past_the_listed_outputs() -> None:
    err = fail([job("a", outputs=[{"dataset": "x"}]), job("b", inputs=[{"from": {"job": "a", "output": 1}}])])
    assert (err.code, err.path) == ("unknown_output", "jobs[1].inputs[0].from.output")


@pytest.mark.parametrize(("outputs", "extra", "code", "path"), [
    ([{"dataset": "x"}, {"dataset": "y", "schema": [{"name": "a", "type": "int64"}, {"name": "b", "type": "int64"},
                                                    {"name": "c", "type": "varchar"}]}], {},
     "invalid_type_name", "jobs[0].outputs[1].schema[2].type"),
    ([{"dataset": "x", "kind": "lake"}], {}, "unknown_kind", "jobs[0].outputs[0].kind"),
    ([{"kind": "derived"}], {}, "missing_key", "jobs[0].outputs[0].dataset"),
    ([{"dataset": "Bad Name"}], {}, "invalid_value", "jobs[0].outputs[0].dataset"),
    ([{"dataset": "x", "pii": "yes"}], {}, "invalid_type", "jobs[0].outputs[0].pii"),
    ([{"dataset": "x", "format": "csv"}], {}, "unknown_key", "jobs[0].outputs[0].format"),
    (["x"], {}, "invalid_type", "jobs[0].outputs[0]"),
    ([{"dataset": "x"}, {"dataset": "x"}], {}, "duplicate_dataset", "jobs[0].outputs[1].dataset"),
    ([{"dataset": "x", "schema": LABELS}], {"unique_key": ["address", "nope"]}, "unknown_column",
     "jobs[0].unique_key[1]"),
])
def test_output_declaration_errors_have_dag_paths(outputs: list[Any], extra: dict[str, Any], code: str,
                                                  path: str) -> None:
    err = fail([job("a", outputs=outputs, **extra)])
    assert (err.code, err.path) == (code, path), err.details


def test_a_dataset_is_declared_once_per_dag() -> None:
    err = fail([job("a", outputs=2), job("b", outputs=[{"dataset": "a_1"}])])
    assert (err.code, err.path) == ("duplicate_dataset", "jobs[1].outputs[0].dataset")


# -- partition keys and manifests ----------------------------------------------------


@pytest.mark.parametrize(("key", "parsed"), [
    ("blocks:100-199", ("block_range", "100", "199")),
    ("blocks:7-7", ("block_range", "7", "7")),
    ("date:2026-11-23", ("date", "2026-11-23", "2026-11-23")),
    ("date:2026-11-01..2026-11-30", ("date", "2026-11-01", "2026-11-30")),
])
def test_partition_keys(key: str, parsed: tuple[str, str, str]) -> None:
    assert ds.parse_partition_key(key) == parsed


@pytest.mark.parametrize("key", ["blocks:200-100", "blocks:a-b", "date:2026-02-30", "date:2026-11-30..2026-11-01",
                                 "hour:3", "blocks:1-2-3"])
def test_bad_partition_keys(key: str) -> None:
    with pytest.raises(ValidationError) as info:
        ds.parse_partition_key(key)
    assert info.value.code == "invalid_partition_key"


SHA = "a" * 64


def test_manifest_files_are_checked_and_tagged() -> None:
    files = ds.check_manifest({"files": [{"key": "d/1.parquet", "sha256": SHA, "rows": 3, "bytes": 10}],
                               "rows": 3, "bytes": 10}, "blocks:0-9")
    assert files == [{"key": "d/1.parquet", "sha256": SHA, "rows": 3, "bytes": 10, "partition": "blocks:0-9"}]


@pytest.mark.parametrize(("manifest", "path"), [
    ({"files": "x"}, "manifest"),
    ({"files": [{"key": "../etc/passwd", "sha256": SHA, "rows": 1, "bytes": 1}]}, "manifest.files[0].key"),
    ({"files": [{"key": "a", "sha256": "XYZ", "rows": 1, "bytes": 1}]}, "manifest.files[0].sha256"),
    ({"files": [{"key": "a", "sha256": SHA, "rows": -1, "bytes": 1}]}, "manifest.files[0].rows"),
    ({"files": [{"key": "a", "sha256": SHA, "rows": 1, "bytes": 1}], "rows": 2}, "manifest.rows"),
])
def test_bad_manifests(manifest: dict[str, Any], path: str) -> None:
    with pytest.raises(ValidationError) as info:
        ds.check_manifest(manifest, None)
    assert (info.value.code, info.value.path) == ("invalid_manifest", path)
