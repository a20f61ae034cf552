"""The data plane end to end: two UDF jobs in Docker sandboxes through a real worker.

Job ``produce`` returns rows (``{"rows": [...]}``) that the dispatcher publishes into a buffered
dataset with a unique key; job ``derive`` reads that dataset through the gateway's
``/v1/task/query`` (at the version pinned in its token) and returns derived rows into its own
dataset. Then the rows are read back through ``POST /v1/query`` and the lineage graph shows
produced@v1 -> derive -> derived_values@v1.
"""

from __future__ import annotations

import io
import json
import zipfile
from typing import Any

import pytest
from flask.testing import FlaskClient

from tests.conftest import Processes, Tenant, wait_for

pytestmark = pytest.mark.slow

PRODUCE = '''
def handler(event, context):
    rows = [{"id": i, "name": "n%d" % i, "value": i * 10} for i in range(1, 6)]
    return {"rows": rows + [{"id": 1, "name": "again", "value": -1}]}
'''

DERIVE = '''
import trace_sdk

def handler(event, context):
    source = event["inputs"][0]["dataset"]
    read = trace_sdk.query("SELECT id, value FROM %s WHERE value >= 20 ORDER BY id" % source)
    return {"rows": [{"id": row["id"], "doubled": row["value"] * 2} for row in read],
            "read": len(read), "inputs": event["inputs"]}
'''


def _zip(source: str) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("trace.py", source)
    return buffer.getvalue()


def _upload(client: FlaskClient, tenant: Tenant, source: str) -> str:
    response = client.post("/v1/bundles", headers=tenant.headers("writer"), content_type="multipart/form-data",
                           data={"file": (io.BytesIO(_zip(source)), "bundle.zip"), "runtime": "python3.11",
                                 "handler": "trace.handler"})
    assert response.status_code in (200, 201), response.json
    return response.json["id"]


def _dag(produce: str, derive: str) -> list[dict[str, Any]]:
    common = {"runtime": "lambda", "operator": "udf", "max_retries": 0, "limits": {"timeout": "30s"}}
    return [
        {"name": "produce", **common, "unique_key": ["id"], "update_strategy": "append",
         "outputs": [{"dataset": "produced", "kind": "buffered",
                      "schema": [{"name": "id", "type": "int64", "nullable": False}, {"name": "name", "type": "string"},
                                 {"name": "value", "type": "int64"}]}],
         "udf": {"bundle_id": produce, "entrypoint": "trace.handler"}},
        {"name": "derive", **common, "update_strategy": "replace",
         "inputs": [{"from": {"job": "produce", "output": 0}}],
         "outputs": [{"dataset": "derived_values", "kind": "derived",
                      "schema": [{"name": "id", "type": "int64"}, {"name": "doubled", "type": "int64"}]}],
         "udf": {"bundle_id": derive, "entrypoint": "trace.handler"}},
    ]


def _run(client: FlaskClient, tenant: Tenant, job: str) -> dict[str, Any]:
    run_id = client.post(f"/v1/jobs/{job}/runs", json={}, headers=tenant.headers("writer")).json["run_id"]

    def finished() -> dict[str, Any] | None:
        run = client.get(f"/v1/runs/{run_id}", headers=tenant.headers("reader")).json
        return run if run["status"] in ("succeeded", "failed") else None

    return wait_for(finished, timeout=120, message=f"the {job} run to finish")  # type: ignore[return-value]


def _dataset(client: FlaskClient, tenant: Tenant, name: str) -> dict[str, Any]:
    response = client.get(f"/v1/datasets/{name}", headers=tenant.headers("reader"))
    assert response.status_code == 200, response.json
    return response.json


def test_a_udf_reads_its_input_through_the_gateway_and_publishes_with_lineage(
        client: FlaskClient, tenant: Tenant, processes: Processes) -> None:
    put = client.put("/v1/dags/data", data=json.dumps(_dag(_upload(client, tenant, PRODUCE),
                                                           _upload(client, tenant, DERIVE))),
                     headers={**tenant.headers("writer"), "Content-Type": "application/json"})
    assert put.status_code == 200, put.json
    worker = processes.worker()

    produced = _run(client, tenant, "produce")
    attempt = produced["tasks"][0]["attempts"][0]
    assert produced["status"] == "succeeded", (attempt, processes.log(worker))
    assert _dataset(client, tenant, "produced")["current_version"] == 1
    # At least once: the same rows published again are all duplicates and make no new version.
    again = _run(client, tenant, "produce")
    assert again["status"] == "succeeded", again["tasks"][0]["attempts"]
    assert _dataset(client, tenant, "produced")["current_version"] == 1

    derived = _run(client, tenant, "derive")
    attempt = derived["tasks"][0]["attempts"][0]
    assert derived["status"] == "succeeded", (attempt, processes.log(worker))
    assert attempt["result"]["read"] == 4
    [pinned] = attempt["result"]["inputs"]
    assert (pinned["dataset"], pinned["version"], pinned["partition"]) == ("produced", 1, None)

    answer = client.post("/v1/query", json={"sql": "SELECT id, doubled FROM derived_values ORDER BY id"},
                         headers=tenant.headers("reader"))
    assert answer.status_code == 200, answer.json
    assert answer.json["rows"] == [{"id": 2, "doubled": 40}, {"id": 3, "doubled": 60}, {"id": 4, "doubled": 80},
                                   {"id": 5, "doubled": 100}]
    hot = client.post("/v1/query", json={"sql": "SELECT name FROM produced WHERE id = 1"},
                      headers=tenant.headers("reader"))
    assert hot.json["rows"] == [{"name": "n1"}]  # the first row of a key wins; the in-batch repeat did not

    output = _dataset(client, tenant, "derived_values")
    assert output["current_version"] == 1
    [version] = output["versions"]
    assert version["inputs"] == [{"dataset": "produced", "version": 1, "source": None}]
    assert version["attempt_id"] == attempt["id"] and version["rows"] == 4
    graph = client.get("/v1/lineage?asset=derived_values", headers=tenant.headers("reader")).json
    nodes = {node["id"]: node for node in graph["nodes"]}
    named = {node["name"]: node_id for node_id, node in nodes.items()}
    edges = {(nodes[edge["from"]]["name"], nodes[edge["to"]]["name"]): edge["versions"] for edge in graph["edges"]}
    assert named["produced"] == f"dataset:{pinned['dataset_id']}" and graph["asset"] == named["derived_values"]
    assert edges[("produced", "derive")] == [1] and edges[("derive", "derived_values")] == [1]
    assert edges[("produce", "produced")] == [1]
