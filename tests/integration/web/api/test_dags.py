"""PUT/GET /v1/dags and GET /v1/jobs over real PostgreSQL: validation, versions, cross-DAG names, audit."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
import yaml
from flask.testing import FlaskClient
from sqlalchemy import select
from werkzeug.test import TestResponse

from tests.conftest import Tenant
from tests.integration.web.api.test_bundles import upload
from tests.unit.dags.test_spec import SEED_YAML
from tracecore.dags import catalog as dags
from tracecore.db.engine import db
from tracecore.tenancy.audit import AuditLog

YAML = "application/yaml"


def seed_with_bundle(client: FlaskClient, tenant: Tenant) -> tuple[str, str]:
    """SEED_YAML with "<bundle-id>" replaced by a bundle uploaded to ``tenant`` (PUT /v1/dags checks
    that udf.bundle_id names a bundle of the org); answers the text and the bundle id."""
    bundle_id = upload(client, tenant).json["id"]
    return SEED_YAML.replace("<bundle-id>", bundle_id), bundle_id


def job(name: str, *extra: str) -> str:
    """One YAML list item: a valid noop job plus ``extra`` lines (already ``key: value``)."""
    lines = [f"- name: {name}", "  runtime: platform", "  operator: noop", *(f"  {line}" for line in extra)]
    return "\n".join(lines) + "\n"


def feeds(source: str, output: int = 0) -> str:
    return f"inputs: [{{from: {{job: {source}, output: {output}}}}}]"


def put(client: FlaskClient, tenant: Tenant, name: str, body: str | bytes, *, content_type: str = YAML,
        role: str = "writer") -> TestResponse:
    return client.put(f"/v1/dags/{name}", data=body, headers={**tenant.headers(role), "Content-Type": content_type})


def assert_validation_error(response: TestResponse, code: str, path: str) -> dict:
    """The one error shape of a rejected DAG, with the first problem's code and path."""
    assert response.status_code == 400, response.json
    body = response.json
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"code", "message", "details"}
    assert (error["code"], error["details"]["path"]) == (code, path), error
    assert isinstance(error["message"], str) and error["message"]
    errors = error["details"]["errors"]
    assert isinstance(errors, list) and errors
    for item in errors:
        assert set(item) == {"code", "path", "message"}
    assert errors[0] == {"code": code, "path": path, "message": error["message"]}
    return error


BAD_DAGS = [
    pytest.param(job("a", "colour: red"), "unknown_key", "jobs[0].colour", id="unknown-job-key"),
    pytest.param(job("a") + job("b", feeds("a"), "inputs2: []"), "unknown_key", "jobs[1].inputs2",
                 id="unknown-key-second-job"),
    pytest.param("jobs:\n" + job("a").replace("- ", "  - ", 1).replace("\n  ", "\n    ") + "owner: me\n",
                 "unknown_key", "owner", id="unknown-top-level-key"),
    pytest.param(job("a", "inputs: [{from: {job: block_follower, output: 0, lag: 3}}]"), "unknown_key",
                 "jobs[0].inputs[0].from.lag", id="unknown-input-key"),
    pytest.param("- name: a\n  runtime: platform\n", "missing_key", "jobs[0].operator", id="missing-operator"),
    pytest.param("- runtime: platform\n  operator: noop\n", "missing_key", "jobs[0].name", id="missing-name"),
    pytest.param("- name: a\n  operator: noop\n", "missing_key", "jobs[0].runtime", id="missing-runtime"),
    pytest.param("- name: a\n  runtime: lambda\n  operator: udf\n", "missing_key", "jobs[0].udf",
                 id="missing-udf"),
    pytest.param(job("a", "inputs: [{from: {job: block_follower}}]"), "missing_key",
                 "jobs[0].inputs[0].from.output", id="missing-input-output"),
    pytest.param(job("a", "activation: scheduled"), "missing_key", "jobs[0].schedule", id="missing-schedule"),
    pytest.param("jobs: []\n", "invalid_value", "jobs", id="no-jobs"),
    pytest.param(job("a") + job("b") + job("a"), "duplicate_job", "jobs[2].name", id="duplicate-job"),
    pytest.param(job("a", "outputs: 1", feeds("b")) + job("b", "outputs: 1", feeds("a")), "cycle",
                 "jobs[0].inputs[0].from.job", id="cycle-2"),
    pytest.param(job("a", "outputs: 1", feeds("c")) + job("b", "outputs: 1", feeds("a"))
                 + job("c", "outputs: 1", feeds("b")), "cycle", "jobs[0].inputs[0].from.job", id="cycle-3"),
    pytest.param(job("a", "outputs: 1", feeds("a")), "cycle", "jobs[0].inputs[0].from.job", id="self-loop"),
    pytest.param(job("a", "outputs: 1", "trigger: b") + job("b", "outputs: 1", feeds("a")), "cycle",
                 "jobs[0].trigger", id="cycle-through-trigger"),
    pytest.param(job("src", "outputs: 1") + job("sink", feeds("ghost")), "unknown_input_job",
                 "jobs[1].inputs[0].from.job", id="missing-input-job"),
    pytest.param(job("src", "outputs: 1") + job("sink", feeds("src", 1)), "unknown_output",
                 "jobs[1].inputs[0].from.output", id="missing-output-index"),
    pytest.param(job("src") + job("sink", feeds("src", 0)), "unknown_output",
                 "jobs[1].inputs[0].from.output", id="job-without-outputs"),
    pytest.param(job("a", feeds("block_follower", 3)), "unknown_output", "jobs[0].inputs[0].from.output",
                 id="platform-source-output"),
    pytest.param(job("a", "trigger: {all_of: [ghost]}"), "unknown_trigger_job", "jobs[0].trigger.all_of[0]",
                 id="missing-trigger-job"),
    pytest.param("- name: a\n  runtime: kubernetes\n  operator: noop\n", "unknown_runtime", "jobs[0].runtime",
                 id="unknown-runtime"),
    pytest.param("- name: a\n  runtime: platform\n  operator: teleport\n", "unknown_operator",
                 "jobs[0].operator", id="unknown-operator"),
    pytest.param(job("a", "execution_strategy: Sometimes"), "unknown_execution_strategy",
                 "jobs[0].execution_strategy", id="unknown-execution-strategy"),
    pytest.param(job("a", "update_strategy: merge"), "unknown_update_strategy", "jobs[0].update_strategy",
                 id="unknown-update-strategy"),
    pytest.param(job("a", "activation: sometimes"), "unknown_activation", "jobs[0].activation",
                 id="unknown-activation"),
    pytest.param(job("a", "idle_timeout: 5 minutes"), "invalid_duration", "jobs[0].idle_timeout",
                 id="bad-duration"),
    pytest.param(job("a", "idle_timeout: 30s1h"), "invalid_duration", "jobs[0].idle_timeout",
                 id="duration-units-out-of-order"),
    pytest.param(job("a", "idle_timeout: 0"), "invalid_duration", "jobs[0].idle_timeout", id="zero-duration"),
    pytest.param(job("a", "activation: scheduled", "schedule: every minute"), "invalid_cron", "jobs[0].schedule",
                 id="cron-word-count"),
    pytest.param(job("a", "activation: scheduled", "schedule: '61 * * * *'"), "invalid_cron",
                 "jobs[0].schedule", id="cron-out-of-range"),
    pytest.param(job("a", "activation: scheduled", "schedule: {cron: '* * * * * * *'}"), "invalid_cron",
                 "jobs[0].schedule.cron", id="cron-in-mapping"),
    pytest.param(job("a", "activation: scheduled", "schedule: {every: soon}"), "invalid_duration",
                 "jobs[0].schedule.every", id="bad-every"),
    pytest.param(job("a", "outputs: two"), "invalid_type", "jobs[0].outputs", id="outputs-not-int"),
    pytest.param(job("a", "inputs: block_follower"), "invalid_type", "jobs[0].inputs", id="inputs-not-list"),
    pytest.param(job("a", "config: [1, 2]"), "invalid_type", "jobs[0].config", id="config-not-mapping"),
    pytest.param("- name: 7\n  runtime: platform\n  operator: noop\n", "invalid_type", "jobs[0].name",
                 id="name-not-string"),
    pytest.param("- just a string\n", "invalid_type", "jobs[0]", id="job-not-mapping"),
    pytest.param(job("a", "max_retries: -1"), "out_of_range", "jobs[0].max_retries", id="negative-retries"),
    pytest.param(job("Bad Name"), "invalid_value", "jobs[0].name", id="bad-job-name"),
    pytest.param("- name: a\n  runtime: [platform\n", "invalid_body", "", id="malformed-yaml"),
    pytest.param("- name: a\n  name: b\n  runtime: platform\n  operator: noop\n", "invalid_body", "",
                 id="duplicate-yaml-key"),
    pytest.param("42\n", "invalid_body", "", id="not-a-list-number"),
    pytest.param("just a string\n", "invalid_body", "", id="not-a-list-string"),
    pytest.param("", "invalid_body", "", id="empty-body"),
]


@pytest.mark.parametrize(("body", "code", "path"), BAD_DAGS)
def test_a_bad_dag_answers_400_with_code_and_path(client: FlaskClient, tenant: Tenant, body: str, code: str,
                                                  path: str) -> None:
    assert_validation_error(put(client, tenant, "broken", body), code, path)
    # Nothing was stored for the rejected DAG.
    assert client.get("/v1/dags/broken", headers=tenant.headers()).status_code == 404
    assert client.get("/v1/dags", headers=tenant.headers()).json == []


@pytest.mark.parametrize(("body", "content_type"), [
    ('[{"name": "a", "runtime": "platform",', "application/json"),
    ('[{"name": "a", "name": "b", "runtime": "platform", "operator": "noop"}]', "application/json"),
    ('"a string"', "application/json"),
    ("- name: a\n  runtime: platform\n  operator: noop\n", "text/plain"),
    (b"\xff\xfe\x00", YAML),
])
def test_unparsable_bodies_answer_invalid_body(client: FlaskClient, tenant: Tenant, body: str | bytes,
                                               content_type: str) -> None:
    assert_validation_error(put(client, tenant, "broken", body, content_type=content_type), "invalid_body", "")


def test_every_problem_is_listed_not_only_the_first(client: FlaskClient, tenant: Tenant) -> None:
    body = (job("a", "runtime2: x", "idle_timeout: forever")
            + "- name: b\n  runtime: kubernetes\n  operator: noop\n  " + feeds("ghost") + "\n")
    error = assert_validation_error(put(client, tenant, "broken", body), "unknown_key", "jobs[0].runtime2")
    listed = {(item["code"], item["path"]) for item in error["details"]["errors"]}
    assert listed == {("unknown_key", "jobs[0].runtime2"), ("invalid_duration", "jobs[0].idle_timeout"),
                      ("unknown_runtime", "jobs[1].runtime"), ("unknown_input_job", "jobs[1].inputs[0].from.job")}


def test_a_cycle_names_its_jobs(client: FlaskClient, tenant: Tenant) -> None:
    body = (job("a", "outputs: 1", feeds("c")) + job("b", "outputs: 1", feeds("a"))
            + job("c", "outputs: 1", feeds("b")))
    error = assert_validation_error(put(client, tenant, "loop", body), "cycle", "jobs[0].inputs[0].from.job")
    assert error["details"]["cycle"] == ["a", "b", "c", "a"]
    assert [item["code"] for item in error["details"]["errors"]] == ["cycle"]


def test_the_seed_example_is_accepted_as_written(client: FlaskClient, tenant: Tenant) -> None:
    seed_yaml, bundle_id = seed_with_bundle(client, tenant)
    response = put(client, tenant, "alerts", seed_yaml)
    assert response.status_code == 200, response.json
    assert response.json["name"] == "alerts" and response.json["current_version"] == 1
    assert [entry["name"] for entry in response.json["jobs"]] == ["alert_evaluate"]
    spec = client.get("/v1/jobs/alert_evaluate", headers=tenant.headers("reader")).json["spec"]
    assert spec["activation"] == "reactive" and spec["runtime"] == "lambda"
    assert spec["operator"] == "alert_evaluate" and spec["execution_strategy"] == "PerUpdate"
    assert spec["idle_timeout_s"] == 300.0
    assert spec["inputs"] == [{"job": "block_follower", "output": 0}]
    assert spec["outputs"] == 1 and spec["update_strategy"] == "append"
    assert spec["unique_key"] == ["dedupe_key"]
    assert spec["config"] == {"max_lookback_seconds": 3600}
    assert spec["udf"] == {"bundle_id": bundle_id, "entrypoint": "trace.handler"}
    # block_follower is a platform source: no job of the org, yet a valid input with three outputs
    # (the default chain's blocks, transactions, logs).
    assert client.get("/v1/jobs/block_follower", headers=tenant.headers()).status_code == 404
    source = client.get("/v1/dags/alerts", headers=tenant.headers()).json["versions"][0]["spec"]
    assert source["jobs"][0]["inputs"] == [{"job": "block_follower", "output": 0}]
    fourth_output = seed_yaml.replace("output: 0", "output: 3")
    assert_validation_error(put(client, tenant, "alerts", fourth_output), "unknown_output",
                            "jobs[0].inputs[0].from.output")


def test_the_seed_example_as_json_is_accepted_and_normalized_the_same(
        client: FlaskClient, tenant: Tenant, make_tenant: Callable[[str], Tenant]) -> None:
    seed_yaml, bundle_id = seed_with_bundle(client, tenant)
    as_yaml = put(client, tenant, "alerts", seed_yaml)
    assert as_yaml.status_code == 200, as_yaml.json
    yaml_spec = client.get("/v1/dags/alerts", headers=tenant.headers()).json["versions"][0]["spec"]
    # A job name is unique per org, so the JSON copy goes to a second org (with its own bundle).
    other = make_tenant("initech")
    other_yaml, other_bundle_id = seed_with_bundle(client, other)
    as_json = put(client, other, "alerts", json.dumps(yaml.safe_load(other_yaml)), content_type="application/json")
    assert as_json.status_code == 200, as_json.json
    json_spec = client.get("/v1/dags/alerts", headers=other.headers()).json["versions"][0]["spec"]
    assert json.loads(json.dumps(json_spec).replace(other_bundle_id, bundle_id)) == yaml_spec
    assert json_spec["jobs"][0]["inputs"] == [{"job": "block_follower", "output": 0}]


def test_json_via_the_client_json_argument_and_a_jobs_mapping(client: FlaskClient, tenant: Tenant) -> None:
    body = {"description": "mapping form", "jobs": [{"name": "hello", "runtime": "platform", "operator": "noop",
                                                     "idle_timeout": 90, "max_retries": None}]}
    response = client.put("/v1/dags/greetings", json=body, headers=tenant.headers("writer"))
    assert response.status_code == 200, response.json
    spec = client.get("/v1/jobs/hello", headers=tenant.headers()).json["spec"]
    assert spec["idle_timeout_s"] == 90.0 and spec["max_retries"] == 3  # null takes the default


def test_each_save_adds_a_version_and_jobs_follow_the_newest(client: FlaskClient, tenant: Tenant) -> None:
    v1 = job("extract", "outputs: 1", "idle_timeout: 1m") + job("load", feeds("extract"), "config: {rows: 10}")
    v2 = job("extract", "outputs: 1", "idle_timeout: 2m30s")
    assert put(client, tenant, "etl", v1).status_code == 200
    first_load = client.get("/v1/jobs/load", headers=tenant.headers()).json
    assert first_load["dag"] == "etl" and first_load["dag_version"] == 1 and first_load["operator"] == "noop"
    assert first_load["spec"]["inputs"] == [{"job": "extract", "output": 0}]
    assert first_load["spec"]["config"] == {"rows": 10}
    assert first_load["spec"]["limits"] == {"cpu": 0.25, "memory_mb": 512, "timeout_s": 60.0, "pids": 128}

    saved = put(client, tenant, "etl", v2)
    assert saved.status_code == 200, saved.json
    assert saved.json["current_version"] == 2
    assert [entry["name"] for entry in saved.json["jobs"]] == ["extract"]

    dag = client.get("/v1/dags/etl", headers=tenant.headers("reader")).json
    assert dag["name"] == "etl" and dag["current_version"] == 2
    assert [version["version"] for version in dag["versions"]] == [2, 1]
    newest, oldest = dag["versions"]
    assert [entry["name"] for entry in newest["spec"]["jobs"]] == ["extract"]
    assert [entry["name"] for entry in oldest["spec"]["jobs"]] == ["extract", "load"]
    assert oldest["spec"]["jobs"][1] == first_load["spec"]
    assert newest["spec"]["jobs"][0]["idle_timeout_s"] == 150.0
    assert oldest["spec"]["jobs"][0]["idle_timeout_s"] == 60.0
    assert all(version["created_by"] for version in dag["versions"])

    extract = client.get("/v1/jobs/extract", headers=tenant.headers()).json
    assert extract["dag_version"] == 2 and extract["spec"]["idle_timeout_s"] == 150.0
    gone = client.get("/v1/jobs/load", headers=tenant.headers())
    assert gone.status_code == 404 and gone.json["error"]["code"] == "not_found"

    # The removed job can come back in a later version.
    assert put(client, tenant, "etl", v1).status_code == 200
    assert client.get("/v1/jobs/load", headers=tenant.headers()).json["dag_version"] == 3


def test_list_dags(client: FlaskClient, tenant: Tenant) -> None:
    assert client.get("/v1/dags", headers=tenant.headers("reader")).json == []
    assert put(client, tenant, "zeta", job("z1") + job("z2")).status_code == 200
    assert put(client, tenant, "alpha", job("a1")).status_code == 200
    assert put(client, tenant, "alpha", job("a1", "max_retries: 5")).status_code == 200
    listed = client.get("/v1/dags", headers=tenant.headers("reader")).json
    assert [(entry["name"], entry["current_version"]) for entry in listed] == [("alpha", 2), ("zeta", 1)]
    assert [entry["name"] for entry in listed[1]["jobs"]] == ["z1", "z2"]
    assert listed[0]["jobs"][0]["spec"]["max_retries"] == 5
    assert "versions" not in listed[0]


def test_unknown_dag_and_job_answer_404(client: FlaskClient, tenant: Tenant) -> None:
    for path in ("/v1/dags/nothing", "/v1/jobs/nothing"):
        response = client.get(path, headers=tenant.headers())
        assert response.status_code == 404
        assert response.json["error"]["code"] == "not_found"


def test_a_job_name_of_another_dag_is_taken_but_can_be_an_input(client: FlaskClient, tenant: Tenant) -> None:
    assert put(client, tenant, "ingest", job("blocks", "outputs: 2")).status_code == 200

    taken = put(client, tenant, "other", job("mine") + job("blocks"))
    assert taken.status_code == 409
    assert taken.json == {"error": {"code": "job_name_taken", "message": taken.json["error"]["message"],
                                    "details": {"path": "jobs[1].name"}}}
    assert "blocks" in taken.json["error"]["message"]
    assert client.get("/v1/dags/other", headers=tenant.headers()).status_code == 404

    assert_validation_error(put(client, tenant, "consumer", job("decode", feeds("blocks", 2))), "unknown_output",
                            "jobs[0].inputs[0].from.output")
    accepted = put(client, tenant, "consumer", job("decode", feeds("blocks", 1)))
    assert accepted.status_code == 200, accepted.json
    assert client.get("/v1/jobs/decode", headers=tenant.headers()).json["spec"]["inputs"] == \
        [{"job": "blocks", "output": 1}]
    # The DAG that owns a job may save it again: the name is only taken for other DAGs.
    assert put(client, tenant, "ingest", job("blocks", "outputs: 3")).status_code == 200
    assert put(client, tenant, "consumer", job("decode", feeds("blocks", 2))).status_code == 200


def test_a_job_freed_by_its_dag_can_move_to_another(client: FlaskClient, tenant: Tenant) -> None:
    assert put(client, tenant, "first", job("keep") + job("moving")).status_code == 200
    assert put(client, tenant, "second", job("moving")).status_code == 409
    assert put(client, tenant, "first", job("keep")).status_code == 200
    moved = put(client, tenant, "second", job("moving"))
    assert moved.status_code == 200, moved.json
    assert client.get("/v1/jobs/moving", headers=tenant.headers()).json["dag"] == "second"


@pytest.mark.parametrize("name", ["Upper", "9lives", "has.dot", "_under", "x" * 65, "sp%20ace"])
def test_a_bad_dag_name_in_the_url_answers_400(client: FlaskClient, tenant: Tenant, name: str) -> None:
    response = put(client, tenant, name, job("a"))
    assert response.status_code == 400, response.json
    assert response.json["error"]["code"] == "invalid_value"
    assert response.json["error"]["details"]["path"] == "name"
    assert client.get("/v1/dags", headers=tenant.headers()).json == []


def test_a_failed_put_loses_nothing(client: FlaskClient, tenant: Tenant) -> None:
    assert put(client, tenant, "etl", job("extract", "outputs: 1") + job("load", feeds("extract"))).status_code \
        == 200
    before = client.get("/v1/dags/etl", headers=tenant.headers()).json
    failures = [
        put(client, tenant, "etl", job("extract") + job("load", feeds("nowhere"))),
        put(client, tenant, "etl", "- [unclosed\n"),
        put(client, tenant, "etl", job("extract", "runtime: mars")),
    ]
    assert [response.status_code for response in failures] == [400, 400, 400]
    assert put(client, tenant, "other", job("extract")).status_code == 409
    after = client.get("/v1/dags/etl", headers=tenant.headers()).json
    assert after == before
    assert after["current_version"] == 1 and len(after["versions"]) == 1
    assert client.get("/v1/jobs/load", headers=tenant.headers()).json["dag_version"] == 1
    assert client.get("/v1/dags/other", headers=tenant.headers()).status_code == 404
    # The next good save is version 2: no version number was burnt by the failures.
    assert put(client, tenant, "etl", job("extract")).json["current_version"] == 2


def test_every_save_is_audited(client: FlaskClient, tenant: Tenant, app: object) -> None:
    assert put(client, tenant, "etl", job("a")).status_code == 200
    assert put(client, tenant, "etl", "not: [valid").status_code == 400
    assert put(client, tenant, "etl", job("a", "max_retries: 1"), role="admin").status_code == 200
    dag_id = db.session.scalar(select(dags.Dag.id).where(dags.Dag.org_id == tenant.org_id, dags.Dag.name == "etl"))
    rows = db.session.execute(select(AuditLog).where(AuditLog.action == "dag.save")
                              .order_by(AuditLog.created_at)).scalars().all()
    assert len(rows) == 2
    assert [row.details for row in rows] == [{"name": "etl", "version": 1}, {"name": "etl", "version": 2}]
    assert {(row.org_id, row.object_type, row.object_id) for row in rows} == {(tenant.org_id, "dag", str(dag_id))}
    writer, admin = (client.get("/v1/me", headers=tenant.headers(role)).json["user"]["id"]
                     for role in ("writer", "admin"))
    assert [str(row.actor_id) for row in rows] == [writer, admin]


def test_the_source_text_is_kept_verbatim(client: FlaskClient, tenant: Tenant) -> None:
    seed_yaml, _ = seed_with_bundle(client, tenant)
    assert put(client, tenant, "alerts", seed_yaml).status_code == 200
    source = db.session.scalar(select(dags.DagVersion.source).where(dags.DagVersion.org_id == tenant.org_id))
    assert source == seed_yaml
