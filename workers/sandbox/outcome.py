"""How an invocation ended, decided the same way by every backend.

The wrapper (workers/runtime/bootstrap.py) writes one result document: to the file
``TRACE_RESULT_FILE`` where the backend shares a folder with the sandbox (docker, process),
or to stdout after a ``__TRACE_RESULT__`` marker line where it cannot (fargate). A backend
reads that document its own way, adds what only it knows (exit code, whether the sandbox
ran out of memory, whether the platform killed it from outside) and calls :func:`decide`.

The handler runs as the same user as the wrapper, so the result file is the sandbox's to
write: it is read with :func:`workers.sandbox.hostile_files.read_sandbox_file` (no symlink,
FIFO or device followed, at most the result cap read), in a folder :func:`work_area` caps.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import RESULT_CAP_BYTES, CappedLog, Invocation, Outcome, redact
from .hostile_files import InvalidSandboxFile, SandboxFileTooLarge, capped_work_dir, read_sandbox_file

RESULT_MARKER = "__TRACE_RESULT__"
# Room for the result document's own keys around a response of RESULT_CAP_BYTES.
RESULT_SLACK_BYTES = 4096
TOO_LARGE = "too_large"
_UNREAD: Any = object()


@dataclass(frozen=True)
class InvalidResult:
    """The result file was something the worker refuses to read (a symlink, a FIFO, a device...)."""

    message: str


@contextmanager
def work_area(invocation: Invocation) -> Iterator[bool]:
    """The invocation's work dir as a size-capped tmpfs for the block (see :mod:`.hostile_files`)."""
    with capped_work_dir(invocation.work_dir, invocation.work_dir_max_bytes) as capped:
        yield capped


def prepare_work_dir(invocation: Invocation) -> None:
    """The private folder mounted at /run/trace: the event goes in, the result comes out."""
    work = invocation.work_dir
    work.mkdir(parents=True, exist_ok=True)
    (work / "event.json").write_text(json.dumps(invocation.event))
    os.chmod(work / "event.json", 0o644)
    if not os.path.ismount(work):
        # An uncapped fallback folder: the sandbox user (uid 10001) writes the result here and connects to the
        # socket; the sticky bit keeps it from removing or replacing the worker's files (socket, event).
        # A capped work dir got mode 1770 root:10001 from its mount.
        os.chmod(work, 0o1777)


def read_result_file(path: Path) -> dict[str, Any] | str | InvalidResult | None:
    """The wrapper's result document, ``"too_large"``, :class:`InvalidResult`, or None when there is none
    (or it is not JSON). ``path`` is read as hostile: see :func:`read_sandbox_file`."""
    try:
        data = read_sandbox_file(path.parent, path.name, RESULT_CAP_BYTES + RESULT_SLACK_BYTES)
    except SandboxFileTooLarge:
        return TOO_LARGE
    except InvalidSandboxFile as exc:
        return InvalidResult(str(exc))
    except OSError as exc:  # the folder itself is gone or unreadable: no result
        return InvalidResult(f"the sandbox's folder cannot be read: {exc.strerror or exc}")
    if data is None:
        return None
    return parse_result(data.decode("utf-8", errors="replace"))


def parse_result(text: str) -> dict[str, Any] | str | None:
    if len(text.encode("utf-8", errors="replace")) > RESULT_CAP_BYTES + RESULT_SLACK_BYTES:
        return TOO_LARGE
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def outcome(invocation: Invocation, exit_code: int | None, oom: bool, killed_from_outside: bool, logs: CappedLog,
            duration_ms: float, result: Any = _UNREAD) -> Outcome:
    """The outcome of a backend that shares the work dir with the sandbox (result in result.json, read here
    unless the backend passes what it read already)."""
    text, truncated = logs.text(invocation.secrets)
    if result is _UNREAD:
        result = read_result_file(invocation.work_dir / "result.json")
    return decide(invocation, result, exit_code=exit_code, oom=oom,
                  killed_from_outside=killed_from_outside, logs_text=text, logs_truncated=truncated,
                  duration_ms=duration_ms)


def decide(invocation: Invocation, result: dict[str, Any] | str | InvalidResult | None, *, exit_code: int | None,
           oom: bool, killed_from_outside: bool, logs_text: str, logs_truncated: bool, duration_ms: float) -> Outcome:
    """One mapping for every backend. ``logs_text`` must already be redacted."""
    common: dict[str, Any] = {"duration_ms": duration_ms, "logs": logs_text, "logs_truncated": logs_truncated,
                              "exit_code": exit_code}
    if result == TOO_LARGE:
        return Outcome("result_too_large", error_type="ResultTooLarge",
                       error_message=f"the handler's answer exceeds {RESULT_CAP_BYTES} bytes", **common)
    if isinstance(result, InvalidResult):
        return Outcome("invalid_result", error_type="InvalidResult", error_message=result.message, **common)
    peak = result.get("peak_memory_bytes") if isinstance(result, dict) else None
    common["peak_memory_bytes"] = peak if isinstance(peak, int) else None
    if oom:
        return Outcome("oom", error_type="OutOfMemory",
                       error_message=f"the sandbox exceeded its {invocation.limits.memory_mb} MB memory limit",
                       **common)
    if isinstance(result, dict):
        return from_wrapper(invocation, result, common)
    if killed_from_outside:
        return Outcome("timeout", error_type="Timeout",
                       error_message=f"no answer within {invocation.limits.timeout_s:g} s", **common)
    if exit_code is not None and exit_code >= 128:
        return Outcome("killed", error_type="Killed", error_message=f"the sandbox was killed (exit {exit_code})",
                       **common)
    return Outcome("sandbox_error", error_type="NoResult",
                   error_message=f"the sandbox ended (exit {exit_code}) without a result", **common)


def from_wrapper(invocation: Invocation, result: dict[str, Any], common: dict[str, Any]) -> Outcome:
    status = result.get("status")
    error = result.get("error") or {}
    secrets = invocation.secrets
    stack = error.get("stackTrace")
    stack_text = "\n".join(map(str, stack)) if isinstance(stack, list) else str(stack or "")
    error_type = redact(str(error.get("errorType") or "Error"), secrets)
    if status == "ok":
        return Outcome("ok", response=result.get("response"), **common)
    if status in ("error", "init_error"):
        reason = "result_too_large" if error_type == "result_too_large" else status
        message = redact(str(error.get("errorMessage") or ""), secrets)
        return Outcome(reason, error_type=error_type, error_message=message, stack_trace=redact(stack_text, secrets),
                       **common)
    if status == "timeout":
        return Outcome("timeout", error_type="Timeout",
                       error_message=f"no answer within {invocation.limits.timeout_s:g} s", **common)
    if status == "exited":
        code = result.get("exit_code")
        reason = "killed" if isinstance(code, int) and code < 0 else "error"
        return Outcome(reason, error_type="RuntimeExited",
                       error_message=f"the runtime exited (code {code}) without answering", **common)
    return Outcome("sandbox_error", error_type="BadResult", error_message=f"unknown wrapper status {status!r}",
                   **common)


def pid_alive(pid: int) -> bool:
    """A zombie counts as dead: a SIGKILLed worker's children linger as zombies until reaped."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return False
