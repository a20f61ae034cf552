"""Operator implementations. The catalog (names, what each needs) is tracecore.execution.operators."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flask import Flask

from tracecore.execution.lease import Failure, Lease
from tracecore.settings import Settings


@dataclass
class OperatorContext:
    """What an operator gets: its lease (with the fence every write must carry) and settings."""

    lease: Lease
    settings: Settings
    app: Flask | None = None

    @property
    def config(self) -> dict[str, Any]:
        return self.lease.config


@dataclass
class OperatorResult:
    """A success with measurements to record on the attempt beside the value."""

    value: Any = None
    peak_memory_bytes: int | None = None
    log_location: str | None = None


class AttemptFailed(Exception):
    """Raised by an operator that already knows how the attempt failed (e.g. from a sandbox)."""

    def __init__(self, failure: Failure, *, peak_memory_bytes: int | None = None,
                 log_location: str | None = None) -> None:
        super().__init__(failure.message)
        self.failure = failure
        self.peak_memory_bytes = peak_memory_bytes
        self.log_location = log_location
