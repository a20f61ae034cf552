"""The OpenAPI document at /v1/openapi.json: public, OpenAPI 3.x, complete, and valid."""

from __future__ import annotations

import pytest
from flask.testing import FlaskClient
from openapi_spec_validator import validate

from tests.conftest import Tenant

EXPECTED = {
    "/healthz": {"get"},
    "/v1/orgs": {"post"},
    "/v1/tokens": {"post"},
    "/v1/me": {"get"},
    "/v1/dags": {"get"},
    "/v1/dags/{name}": {"get", "put"},
    "/v1/jobs/{name}": {"get"},
    "/v1/jobs/{name}/runs": {"post"},
    "/v1/runs": {"get"},
    "/v1/runs/{run_id}": {"get"},
}
METHODS = {"get", "put", "post", "delete", "patch", "head", "options", "trace"}


@pytest.fixture
def spec(client: FlaskClient) -> dict:
    response = client.get("/v1/openapi.json")  # no Authorization header
    assert response.status_code == 200, response.data[:500]
    assert response.mimetype == "application/json"
    return response.json


def test_served_without_auth_as_openapi_3(spec: dict) -> None:
    assert spec["openapi"].startswith("3.")
    assert spec["info"]["title"] == "Trace" and spec["info"]["version"] == "v1"


def test_the_document_is_a_valid_openapi_document(spec: dict) -> None:
    validate(spec)  # raises OpenAPIValidationError on any schema violation


def test_it_lists_every_route_of_the_api(spec: dict) -> None:
    paths = spec["paths"]
    for path, methods in EXPECTED.items():
        assert path in paths, f"{path} missing from {sorted(paths)}"
        assert methods <= set(paths[path]) & METHODS, (path, sorted(paths[path]))
    parameters = {p["name"] for p in paths["/v1/runs/{run_id}"]["parameters"]}
    assert "run_id" in parameters


def test_authentication_is_declared(spec: dict) -> None:
    schemes = spec["components"]["securitySchemes"]
    assert schemes["bearer"]["type"] == "http" and schemes["bearer"]["scheme"] == "bearer"
    assert spec["security"] == [{"bearer": []}]
    assert spec["paths"]["/healthz"]["get"]["security"] == []  # the health check is public


def test_operations_document_their_bodies_and_answers(spec: dict) -> None:
    paths = spec["paths"]
    put_dag = paths["/v1/dags/{name}"]["put"]
    assert {"application/yaml", "application/json"} <= set(put_dag["requestBody"]["content"])
    assert "200" in put_dag["responses"]
    trigger = paths["/v1/jobs/{name}/runs"]["post"]
    assert "202" in trigger["responses"]
    assert "application/json" in trigger["requestBody"]["content"]
    assert "201" in paths["/v1/orgs"]["post"]["responses"]
    assert "201" in paths["/v1/tokens"]["post"]["responses"]
    runs_query = {p["name"] for p in paths["/v1/runs"]["get"]["parameters"] if p["in"] == "query"}
    assert {"job", "status", "limit"} <= runs_query


def test_every_documented_route_exists(client: FlaskClient, tenant: Tenant, spec: dict) -> None:
    """No path in the document answers 404/405 for a route it documents (unknown names aside)."""
    for path, item in spec["paths"].items():
        for method in set(item) & {"get"}:
            concrete = path.replace("{name}", "nothing").replace("{run_id}", "00000000-0000-0000-0000-000000000000")
            response = getattr(client, method)(concrete, headers=tenant.headers("reader"))
            assert response.status_code != 405, (method, path)
            if "{" not in path:
                assert response.status_code == 200, (method, path, response.json)
            else:
                assert response.status_code == 404 and response.json["error"]["code"] == "not_found", (method, path)
