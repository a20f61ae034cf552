"""Operator implementations. The catalog (names, what each needs) is tracecore.operators."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tracecore.lease import Lease
from tracecore.settings import Settings


@dataclass
class OperatorContext:
    """What an operator gets: its lease (with the fence every write must carry) and settings."""

    lease: Lease
    settings: Settings

    @property
    def config(self) -> dict[str, Any]:
        return self.lease.config
