"""Sandbox backends: run one UDF invocation in a fresh, isolated place and say how it ended.

Every backend takes the same :class:`Invocation` and answers the same :class:`Outcome`,
so the `udf` operator does not care where the code ran. Backends (one module each):
``docker`` (default where an engine answers), ``process`` (bubblewrap, weaker, for
machines without Docker), ``fargate`` (AWS ECS RunTask).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from tracecore.dags.spec import Limits

# Exit reasons an attempt can record (the list; `ok` is success).
EXIT_REASONS = ("ok", "error", "init_error", "timeout", "oom", "killed", "integrity_error", "sandbox_error",
                "result_too_large", "invalid_result")

LOG_CAP_BYTES = 1 << 20
RESULT_CAP_BYTES = 256 << 10
# The shared work dir's tmpfs size (TRACE_SANDBOX_WORK_DIR_MAX_BYTES; workers/sandbox/hostile_files.py).
WORK_DIR_CAP_BYTES = 16 << 20
TRUNCATION_MARK = "\n[... output truncated by Trace: {dropped} bytes not kept ...]\n"
REDACTED = "[REDACTED]"

RUNTIME_IMAGES = {"python3.11": "trace-runtime-python", "nodejs": "trace-runtime-node",
                  "provided": "trace-runtime-python"}


@dataclass
class Invocation:
    """One run of a bundle. ``work_dir`` is a private host folder mounted at /run/trace:
    the event goes in, the result comes out, the gateway socket lives there. The backends
    that share it make it a tmpfs of ``work_dir_max_bytes`` (0: a plain folder)."""

    bundle_dir: Path
    runtime: str
    handler: str
    event: dict[str, Any]
    work_dir: Path
    limits: Limits = field(default_factory=Limits)  # the job spec's own type: its defaults are declared once
    env: dict[str, str] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    secrets: tuple[str, ...] = ()
    function_name: str = "trace-udf"
    work_dir_max_bytes: int = WORK_DIR_CAP_BYTES


@dataclass
class Outcome:
    exit_reason: str
    response: Any = None
    error_type: str | None = None
    error_message: str | None = None
    stack_trace: str | None = None
    duration_ms: float = 0.0
    peak_memory_bytes: int | None = None
    logs: str = ""
    logs_truncated: bool = False
    exit_code: int | None = None


class SandboxBackend(Protocol):
    name: str

    def run(self, invocation: Invocation) -> Outcome: ...

    def reap_orphans(self) -> int:
        """Remove sandboxes left behind by dead workers; answers how many."""
        ...


def redact(text: str, secrets: tuple[str, ...]) -> str:
    """Replace every secret (and the token) with a marker, longest first."""
    for secret in sorted({s for s in secrets if s and len(s) >= 6}, key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    return text


def _redact_cut_tail(text: str, secrets: tuple[str, ...]) -> str:
    """The cap may cut a secret in two: the kept half (4 characters or more) is redacted too."""
    for secret in sorted({s for s in secrets if s and len(s) >= 6}, key=len, reverse=True):
        for size in range(len(secret) - 1, 3, -1):
            if text.endswith(secret[:size]):
                return text[:-size] + REDACTED
    return text


class CappedLog:
    """Keeps the first ``cap`` bytes of a stream and counts the rest, so 100 MB of output
    costs the worker 1 MB of memory."""

    def __init__(self, cap: int = LOG_CAP_BYTES) -> None:
        self.cap = cap
        self.kept = bytearray()
        self.dropped = 0

    def feed(self, chunk: bytes) -> None:
        room = self.cap - len(self.kept)
        if room > 0:
            self.kept += chunk[:room]
        self.dropped += max(0, len(chunk) - max(room, 0))

    def text(self, secrets: tuple[str, ...]) -> tuple[str, bool]:
        body = redact(self.kept.decode("utf-8", errors="replace"), secrets)
        if self.dropped:
            body = _redact_cut_tail(body, secrets)
            body += TRUNCATION_MARK.format(dropped=self.dropped)
        return body, bool(self.dropped)


_NAME = re.compile(r"[^a-zA-Z0-9_.-]")


def safe_name(text: str) -> str:
    return _NAME.sub("-", text)[:63]
