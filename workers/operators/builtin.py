"""Platform operators that run in the worker itself (no sandbox): trusted code only."""

from __future__ import annotations

from . import OperatorContext


def noop(context: OperatorContext) -> None:
    """Succeeds at once; what is left of a run's time is the platform's overhead."""
    return None
