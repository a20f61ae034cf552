"""The bounds of every number a DAG may declare, in one table (the validator and the README read it).

Why: a DAG is tenant input that the platform acts on. ``schedule: {every: 1ms}`` fired 27 runs
in 12 s and ``limits.memory: 1e30`` was accepted (issue 11); an unbounded ``max_concurrency``
overflowed PostgreSQL's ``integer`` at lease time, an unbounded ``catch_up`` would fire that many
runs after downtime. So every numeric field has a documented minimum and maximum; a value
outside is refused at save time with 400 ``out_of_range`` and the field's path (a value that is
not a number or duration at all, NaN and infinity included, stays ``invalid_type`` /
``invalid_duration`` / ``invalid_value``). Three maxima and one minimum are installation
settings, because they depend on the machines (``TRACE_MIN_SCHEDULE_INTERVAL``,
``TRACE_MAX_JOB_CPU``, ``TRACE_MAX_JOB_MEMORY``, ``TRACE_MAX_JOB_TIMEOUT``).

====================================  =========================  ==============================
field                                 minimum                    maximum
====================================  =========================  ==============================
``schedule.every``                    TRACE_MIN_SCHEDULE_INTERVAL 366 d
                                      (1 s)
``schedule.catch_up``                 0                          100 ticks
``limits.cpu``                        0.1 vCPU                   TRACE_MAX_JOB_CPU (4)
``limits.memory``                     64 MB                      TRACE_MAX_JOB_MEMORY (8192 MB)
``limits.timeout``                    1 s                        TRACE_MAX_JOB_TIMEOUT (3600 s)
``limits.pids``                       16                         4096
``max_retries``                       0                          100
``max_concurrency``                   1                          10,000
``idle_timeout``                      1 s                        30 d
``trigger ... any_of.timeout``        1 s                        30 d
``batch.window``                      1 s                        1 d
``batch.max_updates``                 1                          10,000
``outputs`` (count or list)           0                          64
``inputs[].from.output``              0                          63
====================================  =========================  ==============================
"""

from __future__ import annotations

from dataclasses import dataclass

from tracecore.settings import Settings

DAY = 86_400.0


@dataclass(frozen=True)
class Bound:
    """Inclusive bounds of one field, with the unit its message names."""

    low: float
    high: float
    unit: str = ""

    def holds(self, value: float) -> bool:
        return self.low <= value <= self.high

    def describe(self) -> str:
        unit = f" {self.unit}" if self.unit else ""
        return f"between {_number(self.low)} and {_number(self.high)}{unit}"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def bounds(settings: Settings | None = None) -> dict[str, Bound]:
    """The table above, with the installation's settings filled in (defaults without ``settings``)."""
    s = settings or Settings()
    return {
        "schedule.every": Bound(s.min_schedule_interval, 366 * DAY, "s"),
        "schedule.catch_up": Bound(0, 100),
        "limits.cpu": Bound(0.1, s.max_job_cpu, "vCPU"),
        "limits.memory": Bound(64, s.max_job_memory, "MB"),
        "limits.timeout": Bound(1, s.max_job_timeout, "s"),
        "limits.pids": Bound(16, 4096),
        "max_retries": Bound(0, 100),
        "max_concurrency": Bound(1, 10_000),
        "idle_timeout": Bound(1, 30 * DAY, "s"),
        "trigger.timeout": Bound(1, 30 * DAY, "s"),
        "batch.window": Bound(1, DAY, "s"),
        "batch.max_updates": Bound(1, 10_000),
        "outputs": Bound(0, 64),
        "inputs.output": Bound(0, 63),
    }
