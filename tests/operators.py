"""Operators for tests, registered as a plugin (TRACE_PLUGINS=tests.operators)."""

from __future__ import annotations

import time

from tracecore.execution.operators import OperatorInfo, register
from workers.operators import OperatorContext


class ProbeFailure(RuntimeError):
    """The error `always_fail` raises; tests look for its name on attempts."""


def sleep(context: OperatorContext) -> dict:
    time.sleep(float(context.config.get("seconds", 1)))
    return {"slept": context.config.get("seconds", 1), "fence": context.lease.fence}


def always_fail(context: OperatorContext) -> None:
    raise ProbeFailure(f"attempt {context.lease.attempt_number} failed on purpose")


def fail_first(context: OperatorContext) -> dict:
    """Fails its first attempt, succeeds after (a transient failure, for retries in DAG runs)."""
    if context.lease.attempt_number == 1:
        raise ProbeFailure("attempt 1 failed on purpose")
    return {"attempt": context.lease.attempt_number}


register(OperatorInfo("sleep", "Sleeps config.seconds (tests).", implementation="tests.operators:sleep"))
register(OperatorInfo("always_fail", "Raises every time (tests).", implementation="tests.operators:always_fail"))
register(OperatorInfo("fail_first", "Fails attempt 1, then succeeds (tests).",
                      implementation="tests.operators:fail_first"))
