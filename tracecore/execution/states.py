"""Every state and outcome of execution, defined once as ``StrEnum``s, and the state machine.

A member *is* its string (``TaskState.SUCCEEDED == "succeeded"``), so it goes into SQL
parameters, JSON and CHECK constraints unchanged, while code that branches on an outcome gets
a closed set a type checker can follow. The transitions below are the only ones allowed
(``runs.py`` compiles them into CHECK constraints and PostgreSQL triggers); the SQL of the hot
path spells the same strings (``sql.py``). Render one into SQL text with
:func:`quoted`, never with ``repr`` (an enum member's repr is not a SQL literal).
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum
from typing import Literal


class RunState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"


class TaskState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    RETRYING = "retrying"
    SUCCEEDED = "succeeded"
    DEAD_LETTER = "dead_letter"
    CANCELED = "canceled"


class AttemptState(StrEnum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    FENCED = "fenced"
    LOST = "lost"


class ExitReason(StrEnum):
    """The exit reasons the platform itself records. An attempt may also end with a sandbox's
    reason (``timeout``, ``oom`` ...: ``workers/sandbox``) or a ``TraceError``'s code."""

    OK = "ok"
    ERROR = "error"  # the operator (user code) raised
    FENCED = "fenced"  # a write after the lease moved on
    WORKER_LOST = "worker_lost"  # the lease expired before the attempt finished


class LeaseVerdict(StrEnum):
    """What the lease statement (``lease.take``) decided for a task."""

    OK = "ok"
    GONE = "gone"  # another worker holds it, or it is done
    FULL = "full"  # the org's or the job's running tasks are at their cap: the task waits
    MISSING = "missing"  # a counter row does not exist yet: take() creates it and tries again
    UNSEEN = "unseen"  # no such task yet: its creator has not committed (or rolled back)


class Refused(StrEnum):
    """Why ``lease.take`` leased nothing."""

    HELD = "held"  # another worker holds the task, it is done, or it never committed
    OVER_CAPACITY = "over_capacity"  # a cap is reached: deliver the task again shortly

    def __bool__(self) -> Literal[False]:
        """A refusal is falsy, so ``if held := take(...)`` reads "did I get the lease" (and a
        type checker narrows it to ``Lease``)."""
        return False


class Gate(StrEnum):
    """Whether a task of a DAG run may be leased now (``dag_runs.gate``)."""

    READY = "ready"  # every upstream of this run succeeded
    WAIT = "wait"  # an upstream is still open
    BLOCKED = "blocked"  # an upstream dead-lettered or was canceled
    DONE = "done"  # the task is terminal already


# --- the state machine ------------------------------------------------------------------------------------

R, T, A = RunState, TaskState, AttemptState
RUN_TRANSITIONS: dict[RunState, tuple[RunState, ...]] = {
    R.QUEUED: (R.RUNNING, R.SUCCEEDED, R.FAILED, R.CANCELED),
    R.RUNNING: (R.SUCCEEDED, R.FAILED, R.CANCELED),
    R.SUCCEEDED: (),
    R.FAILED: (),
    R.CANCELED: (),
}

TASK_TRANSITIONS: dict[TaskState, tuple[TaskState, ...]] = {
    T.QUEUED: (T.RUNNING, T.CANCELED),
    # running -> running: another worker took over an expired lease (fence + 1).
    # running -> queued: the reaper hands an expired lease back to the queue.
    T.RUNNING: (T.RUNNING, T.QUEUED, T.RETRYING, T.SUCCEEDED, T.DEAD_LETTER, T.CANCELED),
    T.RETRYING: (T.RUNNING, T.CANCELED),
    T.SUCCEEDED: (),
    T.DEAD_LETTER: (),
    T.CANCELED: (),
}

ATTEMPT_TRANSITIONS: dict[AttemptState, tuple[AttemptState, ...]] = {
    A.RUNNING: (A.SUCCEEDED, A.FAILED, A.FENCED, A.LOST),
    # A lost attempt (its worker seemed dead) that later tries to write is fenced.
    A.LOST: (A.FENCED,),
    A.SUCCEEDED: (),
    A.FAILED: (),
    A.FENCED: (),
}
del R, T, A

TERMINAL_TASK_STATES = tuple(state for state, nexts in TASK_TRANSITIONS.items() if not nexts)
TERMINAL_RUN_STATES = tuple(state for state, nexts in RUN_TRANSITIONS.items() if not nexts)


def quoted(values: Iterable[str]) -> str:
    """``'a', 'b'``: states as SQL literals (the values are fixed identifiers, never input)."""
    return ", ".join(f"'{value}'" for value in values)
