"""GET /v1/runtimes: every bundle runtime with the vetted libraries its image carries, read from the lists the
images are built from (deploy/images/*-libraries.txt)."""

from __future__ import annotations

from pathlib import Path

import pytest
from flask.testing import FlaskClient

from tests.conftest import Tenant
from tracecore.execution import bundles
from tracecore.runtimes import parse_libraries

IMAGES = Path(__file__).resolve().parents[4] / "deploy" / "images"


def test_lists_every_runtime_with_its_pinned_libraries(client: FlaskClient, tenant: Tenant) -> None:
    response = client.get("/v1/runtimes", headers=tenant.headers("reader"))
    assert response.status_code == 200, response.get_data(as_text=True)
    listed = {entry["name"]: entry for entry in response.get_json()}
    assert set(listed) == set(bundles.RUNTIMES)
    python = {lib["name"]: lib for lib in listed["python3.11"]["libraries"]}
    assert {"numpy", "pandas", "pyarrow", "polars"} <= set(python)
    assert all(not python[name]["dependency"] and python[name]["reason"] for name in ("numpy", "pandas"))
    assert python["tzdata"]["dependency"] is True
    node = {lib["name"]: lib["version"] for lib in listed["nodejs"]["libraries"]}
    assert set(node) == {"ethers"}
    assert listed["provided"]["libraries"] == []
    # The same pins as the files the images are built from, version for version.
    for runtime, file in (("python3.11", "python-libraries.txt"), ("nodejs", "node-libraries.txt")):
        pinned = {lib.name: lib.version for lib in parse_libraries((IMAGES / file).read_text())}
        assert {lib["name"]: lib["version"] for lib in listed[runtime]["libraries"]} == pinned
    assert listed["python3.11"]["image"] == "trace-runtime-python"


def test_needs_a_token(client: FlaskClient) -> None:
    assert client.get("/v1/runtimes").status_code == 401


@pytest.mark.parametrize("line", ["numpy", "numpy>=2", "== 1.0", "pandas==3.1.1 trailing"])
def test_a_malformed_list_line_is_refused(line: str) -> None:
    with pytest.raises(ValueError, match="line 2"):
        parse_libraries(f"# header\n{line}\n")
