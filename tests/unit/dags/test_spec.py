"""Unit tests of tracecore.dags.spec: parsing, normalization and every class of error."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Any

import pytest

from tracecore.dags.spec import (
    DagSpec,
    InputRef,
    JobSpec,
    Limits,
    Schedule,
    UdfRef,
    parse_dag,
    parse_duration,
    parse_memory_mb,
)
from tracecore.dags.trigger_spec import Batch
from tracecore.exceptions import ValidationError

# Seed 002's "Example DAG config", verbatim.
SEED_YAML = """\
- name: alert_evaluate
  activation: reactive
  runtime: lambda
  operator: alert_evaluate
  execution_strategy: PerUpdate
  idle_timeout: 5m
  inputs:
    - from: { job: block_follower, output: 0 }
  outputs: 1
  update_strategy: append
  unique_key: [dedupe_key]
  config:
    max_lookback_seconds: 3600

  # UDF bundle reference
  udf:
    bundle_id: "<bundle-id>"
    entrypoint: "trace.handler"
"""


@dataclass(frozen=True)
class Op:
    needs_udf: bool


OPERATORS = {"alert_evaluate": Op(True), "transform": Op(False), "ingest": Op(False)}
EXTERNAL = {"block_follower": 1, "other_dag_job": 2}


def parse(body: Any, **kwargs: Any) -> DagSpec:
    kwargs.setdefault("operators", OPERATORS)
    kwargs.setdefault("external_outputs", EXTERNAL.get)
    return parse_dag(body, **kwargs)


def fail(body: Any, **kwargs: Any) -> ValidationError:
    with pytest.raises(ValidationError) as info:
        parse(body, **kwargs)
    return info.value


def job(name: str = "a", **fields: Any) -> dict[str, Any]:
    return {"name": name, "runtime": "lambda", "operator": "transform", **fields}


def src(name: str, output: int = 0) -> dict[str, Any]:
    return {"from": {"job": name, "output": output}}


# -- the seed's example --------------------------------------------------------


def test_seed_example_is_accepted_and_normalized() -> None:
    dag = parse(SEED_YAML, content_type="application/yaml")
    assert [j.name for j in dag.jobs] == ["alert_evaluate"]
    spec = dag.job("alert_evaluate")
    assert spec == JobSpec(
        name="alert_evaluate", activation="reactive", runtime="lambda", operator="alert_evaluate",
        execution_strategy="PerUpdate", idle_timeout_s=300.0, inputs=(InputRef("block_follower", 0),),
        outputs=1, update_strategy="append", unique_key=("dedupe_key",),
        config={"max_lookback_seconds": 3600}, udf=UdfRef("<bundle-id>", "trace.handler"),
        schedule=None, trigger=None, max_retries=3, limits=Limits(0.25, 512, 60.0, 128), description="",
    )
    assert dag.upstream("alert_evaluate") == []  # block_follower is outside the DAG
    assert spec.dependencies() == ["block_follower"]


def test_seed_example_needs_the_external_resolver() -> None:
    err = fail(SEED_YAML, external_outputs=lambda name: None)
    assert (err.code, err.path) == ("unknown_input_job", "jobs[0].inputs[0].from.job")


@pytest.mark.parametrize("content_type", [None, "application/yaml", "application/x-yaml",
                                          "text/yaml; charset=utf-8"])
def test_seed_example_as_bytes(content_type: str | None) -> None:
    assert parse(SEED_YAML.encode(), content_type=content_type).jobs[0].outputs == 1


def test_json_body_and_mapping_form() -> None:
    body = json.dumps({"description": "demo", "jobs": [job("a", outputs=1), job("b", inputs=[src("a")])]})
    for content_type in ("application/json", None):
        dag = parse(body, content_type=content_type)
        assert dag.description == "demo"
        assert dag.topological_order() == ["a", "b"]


def test_null_means_not_given() -> None:
    spec = parse([job(activation=None, config=None, max_retries=None, description=None)]).jobs[0]
    assert (spec.activation, spec.config, spec.max_retries, spec.description) == ("manual", {}, 3, "")


def test_to_dict_is_json_and_round_trips() -> None:
    dag = parse([
        job("a", outputs=2, schedule={"every": "1h30m", "catch_up": 2}, activation="scheduled",
            limits={"memory": "1GB", "cpu": 1, "timeout": "2m", "pids": 64}),
        job("b", inputs=[src("a", 1)], trigger={"any_of": ["a", {"when": "SELECT true"}], "timeout": "10m"},
            unique_key="id", update_strategy="upsert", udf={"bundle_id": "abc", "entrypoint": "m.f"}),
    ])
    data = json.loads(json.dumps(dag.to_dict()))
    assert data["jobs"][0]["limits"] == {"cpu": 1.0, "memory_mb": 1024, "timeout_s": 120.0, "pids": 64}
    assert data["jobs"][1]["inputs"] == [{"job": "a", "output": 1}]
    assert DagSpec.from_dict(data) == dag
    assert JobSpec.from_dict(dag.jobs[1].to_dict()) == dag.jobs[1]


# -- one test per class of error: code AND path ---------------------------------

ERROR_CASES: list[tuple[str, Any, str, str]] = [
    # (id, body, code, path)
    ("unknown_key", [job(colour="red")], "unknown_key", "jobs[0].colour"),
    ("unknown_top_key", {"jobs": [job()], "owner": "x"}, "unknown_key", "owner"),
    ("unknown_udf_key", [job(udf={"bundle_id": "b", "entrypoint": "e", "x": 1})], "unknown_key", "jobs[0].udf.x"),
    ("unknown_limits_key", [job(limits={"gpu": 1})], "unknown_key", "jobs[0].limits.gpu"),
    ("missing_name", [{"runtime": "lambda", "operator": "transform"}], "missing_key", "jobs[0].name"),
    ("missing_runtime", [{"name": "a", "operator": "transform"}], "missing_key", "jobs[0].runtime"),
    ("missing_operator", [{"name": "a", "runtime": "lambda"}], "missing_key", "jobs[0].operator"),
    ("missing_jobs", {"description": "x"}, "missing_key", "jobs"),
    ("scheduled_without_schedule", [job(activation="scheduled")], "missing_key", "jobs[0].schedule"),
    ("upsert_without_unique_key", [job(update_strategy="upsert")], "missing_key", "jobs[0].unique_key"),
    ("udf_required", [job(operator="alert_evaluate")], "missing_key", "jobs[0].udf"),
    ("udf_entrypoint", [job(udf={"bundle_id": "b"})], "missing_key", "jobs[0].udf.entrypoint"),
    ("input_output_missing", [job(inputs=[{"from": {"job": "block_follower"}}])],
     "missing_key", "jobs[0].inputs[0].from.output"),
    ("input_from_missing", [job(inputs=[{}])], "missing_key", "jobs[0].inputs[0].from"),
    ("schedule_neither", [job(schedule={"timezone": "UTC"})], "missing_key", "jobs[0].schedule"),
    ("trigger_empty_node", [job(trigger={})], "missing_key", "jobs[0].trigger"),
    ("name_type", [job(name=5)], "invalid_type", "jobs[0].name"),
    ("job_type", ["a"], "invalid_type", "jobs[0]"),
    ("jobs_type", {"jobs": "a"}, "invalid_type", "jobs"),
    ("outputs_type", [job(outputs="1")], "invalid_type", "jobs[0].outputs"),
    ("outputs_bool", [job(outputs=True)], "invalid_type", "jobs[0].outputs"),
    ("config_type", [job(config=[1])], "invalid_type", "jobs[0].config"),
    ("config_not_json", [job(config={"a": {"b": {1, 2}}})], "invalid_type", "jobs[0].config.a.b"),
    ("inputs_type", [job(inputs={"from": "x"})], "invalid_type", "jobs[0].inputs"),
    ("input_job_type", [job(inputs=[{"from": {"job": 1, "output": 0}}])],
     "invalid_type", "jobs[0].inputs[0].from.job"),
    ("max_retries_type", [job(max_retries=1.5)], "invalid_type", "jobs[0].max_retries"),
    ("cpu_type", [job(limits={"cpu": "x"})], "invalid_type", "jobs[0].limits.cpu"),
    ("unique_key_item_type", [job(unique_key=["a", 1])], "invalid_type", "jobs[0].unique_key[1]"),
    ("schedule_type", [job(schedule=5)], "invalid_type", "jobs[0].schedule"),
    ("idle_timeout_type", [job(idle_timeout=[1])], "invalid_type", "jobs[0].idle_timeout"),
    ("trigger_type", [job(trigger=5)], "invalid_type", "jobs[0].trigger"),
    ("when_type", [job(trigger={"when": 1})], "invalid_type", "jobs[0].trigger.when"),
    ("name_pattern", [job(name="Alert")], "invalid_value", "jobs[0].name"),
    ("name_too_long", [job(name="a" * 64)], "invalid_value", "jobs[0].name"),
    ("name_trailing_newline", [job(name="a\n")], "invalid_value", "jobs[0].name"),
    ("outputs_negative", [job(outputs=-1)], "out_of_range", "jobs[0].outputs"),
    ("max_retries_range", [job(max_retries=101)], "out_of_range", "jobs[0].max_retries"),
    ("unique_key_empty", [job(unique_key=[])], "invalid_value", "jobs[0].unique_key"),
    ("timezone", [job(schedule={"cron": "0 * * * *", "timezone": "Mars/Olympus"})],
     "invalid_value", "jobs[0].schedule.timezone"),
    ("catch_up_negative", [job(schedule={"cron": "0 * * * *", "catch_up": -1})],
     "out_of_range", "jobs[0].schedule.catch_up"),
    ("schedule_both", [job(schedule={"cron": "0 * * * *", "every": "5m"})], "invalid_value", "jobs[0].schedule"),
    ("memory_size", [job(limits={"memory": "lots"})], "invalid_value", "jobs[0].limits.memory"),
    ("memory_fraction", [job(limits={"memory": "0.1MB"})], "invalid_value", "jobs[0].limits.memory"),
    ("cpu_zero", [job(limits={"cpu": 0})], "out_of_range", "jobs[0].limits.cpu"),
    ("no_jobs", [], "invalid_value", "jobs"),
    ("any_of_empty", [job(trigger={"any_of": []})], "invalid_value", "jobs[0].trigger.any_of"),
    ("when_empty", [job(trigger={"when": "  "})], "invalid_value", "jobs[0].trigger.when"),
    ("two_kinds", [job(trigger={"all_of": ["block_follower"], "any_of": ["block_follower"]})],
     "invalid_value", "jobs[0].trigger"),
    ("timeout_on_all_of", [job(trigger={"all_of": ["block_follower"], "timeout": "5m"})],
     "unknown_key", "jobs[0].trigger.timeout"),
    ("activation", [job(activation="sometimes")], "unknown_activation", "jobs[0].activation"),
    ("runtime", [job(runtime="jvm")], "unknown_runtime", "jobs[0].runtime"),
    ("operator", [job(operator="magic")], "unknown_operator", "jobs[0].operator"),
    ("execution_strategy", [job(execution_strategy="perupdate")],
     "unknown_execution_strategy", "jobs[0].execution_strategy"),
    ("update_strategy", [job(update_strategy="merge")], "unknown_update_strategy", "jobs[0].update_strategy"),
    ("idle_timeout", [job(idle_timeout="5 minutes")], "invalid_duration", "jobs[0].idle_timeout"),
    ("limits_timeout", [job(limits={"timeout": "0s"})], "invalid_duration", "jobs[0].limits.timeout"),
    ("every", [job(schedule={"every": "-5m"})], "invalid_duration", "jobs[0].schedule.every"),
    ("any_of_timeout", [job(trigger={"any_of": ["block_follower"], "timeout": "soon"})],
     "invalid_duration", "jobs[0].trigger.timeout"),
    ("input_job", [job("a", outputs=1), job("b", inputs=[src("a"), src("nope")])],
     "unknown_input_job", "jobs[1].inputs[1].from.job"),
    ("input_output", [job("a", outputs=1), job("b", inputs=[src("a", 1)])],
     "unknown_output", "jobs[1].inputs[0].from.output"),
    ("external_output", [job(inputs=[src("other_dag_job", 2)])], "unknown_output", "jobs[0].inputs[0].from.output"),
    ("default_zero_outputs", [job("a"), job("b", inputs=[src("a", 0)])],
     "unknown_output", "jobs[1].inputs[0].from.output"),
    ("cron_fields", [job(schedule="* * * *")], "invalid_cron", "jobs[0].schedule"),
    ("cron_value", [job(schedule={"cron": "61 * * * *"})], "invalid_cron", "jobs[0].schedule.cron"),
    ("cron_never_fires", [job(schedule="0 0 30 2 *")], "invalid_cron", "jobs[0].schedule"),
    ("trigger_job", [job(trigger={"all_of": ["block_follower", {"any_of": ["x", "ghost"]}]})],
     "unknown_trigger_job", "jobs[0].trigger.all_of[1].any_of[0]"),
    ("trigger_root_job", [job(trigger="ghost")], "unknown_trigger_job", "jobs[0].trigger"),
    ("duplicate", [job("a"), job("b"), job("a")], "duplicate_job", "jobs[2].name"),
    ("cycle", [job("a", outputs=1, inputs=[src("b")]), job("b", outputs=1, inputs=[src("a")])],
     "cycle", "jobs[0].inputs[0].from.job"),
]


@pytest.mark.parametrize(("body", "code", "path"), [c[1:] for c in ERROR_CASES], ids=[c[0] for c in ERROR_CASES])
def test_error_code_and_path(body: Any, code: str, path: str) -> None:
    err = fail(copy.deepcopy(body))
    assert (err.code, err.path) == (code, path), err.details["errors"]
    assert err.details["path"] == path
    assert err.details["errors"][0] == {"code": code, "path": path, "message": err.message}


def test_invalid_type_message_names_the_expected_type() -> None:
    err = fail([job(outputs="1")])
    assert err.message == "expected integer, got string"


def test_unknown_operator_lists_the_known_ones() -> None:
    err = fail([job(operator="magic")])
    assert err.details["known"] == ["alert_evaluate", "ingest", "transform"]


@pytest.mark.parametrize(("body", "content_type"), [
    ("a: [", None),
    ("- name: a\n  name: b\n  runtime: lambda\n  operator: transform\n", None),  # duplicate key
    ('[{"name": "a", "name": "b"}]', "application/json"),
    ("- name: a", "application/json"),
    ("42", None),
    ("", None),
    ("just a string", None),
    (b"\xff\xfe", None),
    ("[]", "text/html"),
])
def test_invalid_body(body: str | bytes, content_type: str | None) -> None:
    err = fail(body, content_type=content_type)
    assert (err.code, err.path) == ("invalid_body", "")


def test_invalid_body_for_parsed_objects() -> None:
    for body in (None, 42, object(), {1, 2}):
        assert fail(body).code == "invalid_body"


def test_yaml_dates_stay_strings_and_merge_keys_work() -> None:
    text = (
        "- &base {name: a, runtime: lambda, operator: transform, config: {start: 2024-01-01}}\n"
        "- <<: *base\n  name: b\n"
    )
    dag = parse(text)
    assert dag.job("a").config == {"start": "2024-01-01"}
    assert dag.job("b").runtime == "lambda"


def test_alias_bomb_in_trigger_is_bounded() -> None:
    """40 anchors, each listing the previous one twice, would expand to 2**40 nodes."""
    items = ["      - &x0 block_follower"]
    items += [f"      - &x{n} {{all_of: [*x{n - 1}, *x{n - 1}]}}" for n in range(1, 40)]
    text = "- name: a\n  runtime: lambda\n  operator: transform\n  trigger:\n    all_of:\n" + "\n".join(items)
    err = fail(text)
    # Refused while decoding (strict_json.check_value walks shared nodes each time, with a bound).
    assert (err.code, err.path) == ("too_deep", "")


def test_recursive_config_is_rejected() -> None:
    config: dict[str, Any] = {}
    config["self"] = config
    assert fail([job(config=config)]).code == "invalid_value"


# -- cycles -------------------------------------------------------------------


@pytest.mark.parametrize(("jobs", "path", "cycle"), [
    pytest.param([job("a", outputs=1, inputs=[src("a")])], "jobs[0].inputs[0].from.job", ["a", "a"],
                 id="self-loop"),
    pytest.param([job("a", outputs=1, inputs=[src("b")]), job("b", outputs=1, inputs=[src("a")])],
                 "jobs[0].inputs[0].from.job", ["a", "b", "a"], id="two-nodes"),
    pytest.param([job("a", outputs=1, inputs=[src("c")]), job("b", outputs=1, inputs=[src("a")]),
                  job("c", outputs=1, inputs=[src("b")])],
                 "jobs[0].inputs[0].from.job", ["a", "b", "c", "a"], id="three-nodes"),
    pytest.param([job("a", outputs=1, trigger={"any_of": ["block_follower", "b"]}),
                  job("b", outputs=1, inputs=[src("a")])],
                 "jobs[0].trigger.any_of[1]", ["a", "b", "a"], id="through-trigger"),
    pytest.param([job("root", outputs=1), job("a", outputs=1, inputs=[src("root"), src("b")]),
                  job("b", outputs=1, inputs=[src("a")])],
                 "jobs[1].inputs[1].from.job", ["a", "b", "a"], id="behind-a-root"),
])
def test_cycles(jobs: list[dict[str, Any]], path: str, cycle: list[str]) -> None:
    err = fail(jobs)
    assert (err.code, err.path, err.details["cycle"]) == ("cycle", path, cycle)


def test_a_diamond_is_not_a_cycle() -> None:
    dag = parse([job("d", inputs=[src("b"), src("c")]), job("b", outputs=1, inputs=[src("a")]),
                 job("c", outputs=1, inputs=[src("a")]), job("a", outputs=1)])
    assert dag.topological_order() == ["a", "b", "c", "d"]


# -- durations and sizes --------------------------------------------------------


@pytest.mark.parametrize(("text", "seconds"), [
    ("500ms", 0.5), ("30s", 30.0), ("5m", 300.0), ("1h", 3600.0), ("1d", 86400.0), ("1h30m", 5400.0),
    ("1d2h3m4s5ms", 93784.005), ("1.5h", 5400.0), (" 5m ", 300.0), ("90", 90.0), ("2.5", 2.5),
    (45, 45.0), (0.25, 0.25),
])
def test_parse_duration(text: str | float, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "0", "0s", "-5s", "5 m", "5min", "m", "1m1m", "30s1h",
                                  "1h 30m", "abc", "1e3s", 0, -1, float("inf"), float("nan"), True, None, [1]])
def test_parse_duration_rejects(text: Any) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


@pytest.mark.parametrize(("value", "mb"), [
    (512, 512), ("512", 512), ("512MB", 512), ("512mb", 512), ("1GB", 1024), ("1g", 1024), ("1GiB", 1024),
    ("256m", 256), ("1.5G", 1536), ("524288KB", 512),
])
def test_parse_memory(value: str | int, mb: int) -> None:
    assert parse_memory_mb(value) == mb


@pytest.mark.parametrize("value", [0, -1, "0MB", "512b", "1.5MB", "big", True, 1.5])
def test_parse_memory_rejects(value: Any) -> None:
    with pytest.raises(ValueError):
        parse_memory_mb(value)


# -- schedules ----------------------------------------------------------------


@pytest.mark.parametrize(("schedule", "expected"), [
    ("*/5 * * * *", Schedule(cron="*/5 * * * *")),
    ("0  9 * * mon-fri", Schedule(cron="0 9 * * mon-fri")),
    ("0 0 * * * 30", Schedule(cron="0 0 * * * 30")),
    ({"cron": "0 3 * * *", "timezone": "Europe/Berlin", "catch_up": 2},
     Schedule(cron="0 3 * * *", timezone="Europe/Berlin", catch_up=2)),
    ({"every": "15m"}, Schedule(every_s=900.0)),
    ({"every": 30, "catch_up": 1}, Schedule(every_s=30.0, catch_up=1)),
])
def test_schedule_forms(schedule: Any, expected: Schedule) -> None:
    assert parse([job(activation="scheduled", schedule=schedule)]).jobs[0].schedule == expected


# -- triggers -----------------------------------------------------------------


def test_trigger_tree_is_normalized() -> None:
    trigger = {"all_of": ["a", {"any_of": ["b", {"when": "SELECT count(*) > 0 FROM t"}, "other_dag_job"],
                                "timeout": "10m"}, {"any_of": ["block_follower"]}]}
    dag = parse([job("a", outputs=1), job("b"), job("c", inputs=[src("a")], trigger=trigger)])
    assert dag.job("c").trigger == {"all_of": [
        {"job": "a"},
        {"any_of": [{"job": "b"}, {"when": "SELECT count(*) > 0 FROM t"}, {"job": "other_dag_job"}],
         "timeout_s": 600.0},
        {"any_of": [{"job": "block_follower"}], "timeout_s": None},
    ]}
    assert dag.upstream("c") == ["a", "b"]
    assert dag.downstream("a") == ["c"]
    assert parse([job(trigger="block_follower")]).jobs[0].trigger == {"job": "block_follower"}


# -- several errors at once -------------------------------------------------------


def test_all_errors_are_collected_first_one_is_raised() -> None:
    body = [
        job("a", runtime="jvm", idle_timeout="soon"),
        {"name": "b", "operator": "magic", "inputs": [src("ghost")]},
        job("a"),
    ]
    err = fail(body)
    assert [(e["code"], e["path"]) for e in err.details["errors"]] == [
        ("unknown_runtime", "jobs[0].runtime"),
        ("invalid_duration", "jobs[0].idle_timeout"),
        ("unknown_operator", "jobs[1].operator"),
        ("unknown_input_job", "jobs[1].inputs[0].from.job"),
        ("missing_key", "jobs[1].runtime"),
        ("duplicate_job", "jobs[2].name"),
    ]
    assert (err.code, err.path) == ("unknown_runtime", "jobs[0].runtime")
    assert err.to_dict()["code"] == "unknown_runtime"


# -- graph queries ------------------------------------------------------------


def test_topological_order_upstream_downstream() -> None:
    dag = parse([
        job("report", inputs=[src("enrich"), src("decode")]),
        job("enrich", outputs=1, inputs=[src("decode")]),
        job("decode", outputs=1, inputs=[src("block_follower")]),
        job("alert", trigger={"all_of": ["decode"]}),
        job("lonely"),
    ])
    assert dag.topological_order() == ["decode", "enrich", "report", "alert", "lonely"]
    assert dag.upstream("report") == ["enrich", "decode"]
    assert dag.upstream("decode") == []
    assert dag.downstream("decode") == ["report", "enrich", "alert"]
    assert dag.downstream("report") == []
    with pytest.raises(KeyError):
        dag.job("ghost")


def test_a_job_of_the_dag_shadows_an_external_one() -> None:
    seen: list[str] = []

    def resolver(name: str) -> int | None:
        seen.append(name)
        return EXTERNAL.get(name)

    dag = parse([job("block_follower", outputs=3), job("b", inputs=[src("block_follower", 2)])],
                external_outputs=resolver)
    assert dag.upstream("b") == ["block_follower"]
    assert seen == []


@pytest.mark.parametrize(("name", "jobs", "code", "path"), [
    ("batch_without_batched", [job("a", outputs=1), job("b", inputs=[src("a")], activation="reactive",
                                                        batch={"window": "1m"})], "invalid_value", "jobs[1].batch"),
    ("batch_window_zero", [job("a", outputs=1), job("b", inputs=[src("a")], activation="reactive",
                                                    execution_strategy="Batched", batch={"window": "0s"})],
     "invalid_duration", "jobs[1].batch.window"),
    ("batch_unknown_key", [job("a", outputs=1), job("b", inputs=[src("a")], activation="reactive",
                                                    execution_strategy="Batched", batch={"size": 3})],
     "unknown_key", "jobs[1].batch.size"),
    ("refresh_unknown", [job("a", outputs=1), job("b", inputs=[src("a")], refresh="always")],
     "invalid_value", "jobs[1].refresh"),
    ("refresh_on_reactive", [job("a", outputs=1), job("b", inputs=[src("a")], activation="reactive",
                                                      refresh="auto")], "invalid_value", "jobs[1].refresh"),
    ("refresh_without_inputs", [job("a", refresh="auto")], "missing_key", "jobs[0].inputs"),
    ("reactive_without_inputs", [job("a", activation="reactive")], "missing_key", "jobs[0].inputs"),
    ("when_without_inputs", [job("a", trigger={"when": "SELECT true"})], "missing_key", "jobs[0].inputs"),
    ("when_not_a_select", [job("a", outputs=1), job("b", inputs=[src("a")], trigger={"when": "DROP TABLE a"})],
     "invalid_when", "jobs[1].trigger.when"),
    ("when_two_statements", [job("a", outputs=1), job("b", inputs=[src("a")],
                                                      trigger={"when": "SELECT true; SELECT false"})],
     "invalid_when", "jobs[1].trigger.when"),
    ("when_reads_files", [job("a", outputs=1), job("b", inputs=[src("a")],
                                                   trigger={"when": "SELECT count(*) > 0 FROM read_csv('/etc/x')"})],
     "invalid_when", "jobs[1].trigger.when"),
    ("reactive_trigger_names_a_job", [job("a", outputs=1), job("b", inputs=[src("a")], activation="reactive",
                                                               trigger={"any_of": ["a"]})],
     "invalid_value", "jobs[1].trigger"),
])
def test_data_trigger_rules(name: str, jobs: list[dict[str, Any]], code: str, path: str) -> None:
    with pytest.raises(ValidationError) as caught:
        parse(jobs)
    assert (caught.value.code, caught.value.details["path"]) == (code, path), caught.value.details


def test_batch_refresh_and_reactive_conditions_parse() -> None:
    dag = parse([job("a", outputs=1),
                 job("b", inputs=[src("a")], activation="reactive", execution_strategy="Batched",
                     batch={"window": "30s", "max_updates": 50},
                     trigger={"any_of": [{"when": "SELECT count(*) > 9 FROM a"}, {"when": "SELECT false"}]}),
                 job("c", inputs=[src("a")], refresh="auto"),
                 job("d", inputs=[src("a")], activation="reactive", execution_strategy="Batched")])
    assert dag.job("b").batch == Batch(window_s=30.0, max_updates=50)
    assert dag.job("c").refresh == "auto" and dag.job("a").refresh == "manual"
    assert dag.job("d").batch is None  # Batched without 'batch': the defaults at run time
    again = JobSpec.from_dict(json.loads(json.dumps(dag.job("b").to_dict())))
    assert again == dag.job("b")
