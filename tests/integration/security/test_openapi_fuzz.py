"""Schemathesis against the real API: cases generated from ``/v1/openapi.json``, 0 server errors.

The app is the real one (real PostgreSQL, Redis, object store) served through its WSGI
interface, called as the admin of a throwaway org: never the installation admin, whose
token a fuzzer could use to demote itself or reach across orgs. Every operation gets
schema-conforming (positive) and schema-violating (negative) cases; the run is bounded (a
few examples per operation and mode) and derandomized (the same cases each time), so it is a
regression test rather than a lottery. ``test_bad_input.py`` holds the hand-picked hostile cases.

The operations are read from the document at run time (the app needs the test's services),
so the schemathesis pytest plugin's collection-time parametrization is not used: each
operation runs under its own ``@given`` and its failures are collected.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import pytest
import schemathesis
from flask import Flask
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from tests.conftest import Tenant

MAX_EXAMPLES = 30
SEED_SETTINGS = settings(max_examples=MAX_EXAMPLES, derandomize=True, deadline=None, database=None,
                         suppress_health_check=list(HealthCheck), print_blob=False)


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=lambda m: m.value)
def test_no_generated_request_is_a_server_error(app: Flask, make_tenant: Callable[[str], Tenant],
                                                mode: GenerationMode, caplog: pytest.LogCaptureFixture) -> None:
    headers = make_tenant("fuzz").headers("admin")
    schema = schemathesis.openapi.from_wsgi("/v1/openapi.json", app)
    failures: dict[str, str] = {}
    statuses: Counter[int] = Counter()
    operations = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        operations += 1

        @SEED_SETTINGS
        @given(case=operation.as_strategy(generation_mode=mode))
        def exercise(case: schemathesis.Case) -> None:
            statuses[case.call_and_validate(headers=headers, checks=[not_a_server_error]).status_code] += 1

        try:
            exercise()
        except Unsatisfiable:  # nothing to violate (no parameters, or a body of any shape): no negative case
            assert mode is GenerationMode.NEGATIVE, operation.label
        except Exception as exc:  # a failing case: keep going, report every operation at the end
            failures[operation.label] = str(exc)[:2000]
    assert operations >= 30
    # The cases got past authentication and, for the negative ones, were refused by validation.
    assert sum(n for status, n in statuses.items() if status < 300) >= operations, statuses
    assert statuses[400] >= (3 * operations if mode is GenerationMode.NEGATIVE else 1), statuses
    assert not failures, "\n\n".join(f"{label}:\n{text}" for label, text in failures.items())
    # Refused by validation, not by the error handler's backstop (which logs what slipped past).
    assert not [r.getMessage() for r in caplog.records if "bad input reached" in r.getMessage()]
