"""The `udf` operator (and `alert_evaluate`): run the job's bundle in a sandbox.

Per attempt: re-hash the stored bundle (a mismatch runs nothing), unpack it once per
SHA-256 into a read-only cache, mint a capability token for this lease, open a task
gateway socket for this task only, run the sandbox backend, and turn its outcome into
an attempt: the answer (capped), or a failure with its exit reason, plus peak memory
and the logs (capped, secrets redacted) stored in the object store.

The token pins the job's inputs at their current versions (``publish.pinned_inputs``), so
the UDF's queries and the lineage of what it publishes name exactly the data it saw. Rows
the handler returns (``{"rows": [...]}``) are published to the job's first output through
the same fenced buffer-publish as the gateway's; a refused publish fails the attempt
(``publish_error``, or ``stale_fence`` when a newer attempt owns the task).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

from tracecore.dags.spec import Limits
from tracecore.data import publish
from tracecore.exceptions import StaleFence, TraceError
from tracecore.execution import bundles, redaction, tokens
from tracecore.execution.lease import Failure
from tracecore.infra.storage import object_store
from tracecore.settings import Settings

from ..gateway import TaskGateway
from ..sandbox import RESULT_CAP_BYTES, Invocation, Outcome
from ..sandbox.hostile_files import capped_work_dir, remove_work_dir
from ..sandbox.select import backend_for
from . import AttemptFailed, OperatorContext, OperatorResult

_unpack_lock = threading.Lock()
# Exit reasons that say the code is wrong, not that the machine hiccupped: retrying will not help.
NOT_RETRYABLE = {"integrity_error", "init_error", "result_too_large", "invalid_result"}


def run(context: OperatorContext) -> OperatorResult:
    lease, settings = context.lease, context.settings
    assert context.app is not None, "the udf operator runs inside a worker's Flask app"
    udf = lease.job_spec.get("udf") or {}
    store = object_store(settings)
    bundle = bundles.get_bundle(lease.org_id, udf.get("bundle_id", ""))
    try:
        data = bundles.fetch_verified(bundle, store)
    except bundles.BundleIntegrityError as exc:
        raise AttemptFailed(Failure("integrity_error", "BundleIntegrityError", exc.message, retryable=False)) from None
    bundle_dir = _unpacked(settings, bundle.sha256, data)
    secret = tokens.secret_key(settings)
    capability = tokens.for_lease(lease, settings, inputs=publish.pinned_inputs(lease.org_id, lease.job_spec))
    token = tokens.mint(capability, secret)
    limits = Limits(**_limits(lease.job_spec.get("limits") or {}))
    work_dir = Path(tempfile.mkdtemp(prefix=f"{lease.task_id}-{lease.fence}-", dir=_sandboxes_dir(settings)))
    max_bytes = settings.sandbox_work_dir_max_bytes
    invocation = Invocation(
        bundle_dir=bundle_dir, runtime=bundle.runtime, handler=udf.get("entrypoint") or bundle.handler,
        event=_event(lease, capability), work_dir=work_dir, limits=limits,
        env={"TRACE_CAPABILITY_TOKEN": token},
        labels={"org.trace.task": str(lease.task_id), "org.trace.fence": str(lease.fence),
                "org.trace.org": str(lease.org_id)},
        secrets=(token, *_platform_secrets(settings)), function_name=lease.job_name, work_dir_max_bytes=max_bytes)
    try:
        # The size-capped tmpfs first, then the gateway's socket in it (workers/sandbox/hostile_files.py).
        with capped_work_dir(work_dir, max_bytes), TaskGateway(work_dir / "gateway.sock", context.app,
                                                               lease.task_id, secret):
            outcome = backend_for(settings).run(invocation)
    finally:
        remove_work_dir(work_dir)
    outcome = redacted(outcome, (*redaction.token_secrets(token), *_platform_secrets(settings)))
    log_location = _store_logs(store, lease, outcome)
    if outcome.exit_reason != "ok":
        raise AttemptFailed(Failure(outcome.exit_reason, outcome.error_type or outcome.exit_reason,
                                    outcome.error_message or outcome.exit_reason, outcome.stack_trace or "",
                                    retryable=outcome.exit_reason not in NOT_RETRYABLE),
                            peak_memory_bytes=outcome.peak_memory_bytes, log_location=log_location)
    if len(json.dumps(outcome.response, default=str)) > RESULT_CAP_BYTES:
        raise AttemptFailed(Failure("result_too_large", "ResultTooLarge",
                                    f"the handler's answer exceeds {RESULT_CAP_BYTES} bytes", retryable=False),
                            peak_memory_bytes=outcome.peak_memory_bytes, log_location=log_location)
    response = outcome.response
    if isinstance(response, dict) and isinstance(response.get("rows"), list):
        _publish_returned(capability, response["rows"], store, outcome, log_location)
    return OperatorResult(response, peak_memory_bytes=outcome.peak_memory_bytes, log_location=log_location)


def redacted(outcome: Outcome, secrets: tuple[str, ...]) -> Outcome:
    """The outcome with every credential taken out of what the sandbox said: answer (rows included,
    so none is published either), error, stack trace and logs. Done here, once the backend has read
    the result, because everything after it stores or publishes it (DESIGN.md: never in logs)."""
    return dataclasses.replace(
        outcome, response=redaction.redact_value(outcome.response, secrets),
        error_type=redaction.redact_optional(outcome.error_type, secrets),
        error_message=redaction.redact_optional(outcome.error_message, secrets),
        stack_trace=redaction.redact_optional(outcome.stack_trace, secrets),
        logs=redaction.redact(outcome.logs, secrets))


def _publish_returned(capability: tokens.Capability, rows: list[Any], store: Any, outcome: Outcome,
                      log_location: str | None) -> None:
    """Publish the rows a handler returned to the job's first output; a refusal fails the attempt.

    Only platform faults (5xx) are retried: a dead-lettered batch or an undeclared dataset
    would be refused again, and a stale fence means another attempt owns the task.
    """
    measured: dict[str, Any] = {"peak_memory_bytes": outcome.peak_memory_bytes, "log_location": log_location}
    try:
        publish.publish_rows(capability, None, rows, store=store)
    except StaleFence as exc:
        raise AttemptFailed(Failure("stale_fence", "StaleFence", exc.message, retryable=False), **measured) from None
    except TraceError as exc:
        details = f" {json.dumps(exc.details, default=str)[:2000]}" if exc.details else ""
        raise AttemptFailed(Failure("publish_error", type(exc).__name__, f"{exc.code}: {exc.message}{details}",
                                    retryable=exc.http_status >= 500), **measured) from None


def _event(lease: Any, capability: tokens.Capability) -> dict[str, Any]:
    """The Lambda event (DESIGN.md, "The UDF event"); ``now`` and ``seed`` are injected so the
    code stays deterministic on replay: the same task and fence give the same values."""
    return {
        "task": {"id": str(lease.task_id), "run_id": str(lease.run_id), "attempt": lease.attempt_number,
                 "org_id": str(lease.org_id), "job": lease.job_name, "operator": lease.operator},
        "inputs": [dict(item) for item in capability.inputs],
        "window": lease.window,
        "config": lease.config,
        "params": {"now": capability.issued_at_iso, "seed": int(str(lease.task_id.int)[:9])},
        "gateway": "unix:///run/trace/gateway.sock",
    }


def _limits(spec: dict[str, Any]) -> dict[str, Any]:
    known = {"cpu", "memory_mb", "timeout_s", "pids"}
    return {key: value for key, value in spec.items() if key in known and value is not None}


def _sandboxes_dir(settings: Settings) -> Path:
    path = settings.home_path / "sandboxes"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _unpacked(settings: Settings, sha256: str, data: bytes) -> Path:
    """Unpack once per content hash; the folder is complete before it gets its final name."""
    cache = settings.home_path / "bundle-cache"
    target = cache / sha256
    if target.exists():
        return target
    with _unpack_lock:
        if target.exists():
            return target
        cache.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{sha256[:12]}-", dir=cache))
        bundles.unpack(data, staging / "task")
        (staging / "task").rename(target)
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _platform_secrets(settings: Settings) -> tuple[str, ...]:
    values = [settings.secret_key or "", settings.database_url or "", settings.broker_url or "",
              *settings.redact]
    return tuple(value for value in values if value)


def _store_logs(store: Any, lease: Any, outcome: Outcome) -> str | None:
    if not outcome.logs:
        return None
    key = f"logs/{lease.org_id}/{lease.task_id}/{lease.fence}.log"
    store.put(key, outcome.logs.encode())
    return key
