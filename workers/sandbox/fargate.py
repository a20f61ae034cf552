"""The Fargate backend (``TRACE_SANDBOX=fargate``): one ECS task on Fargate per invocation.

Isolation is AWS's: every task is its own micro-VM. What this backend adds:

* **Network**: ``awsvpc`` in the configured private subnets with ``assignPublicIp: DISABLED`` and
  the configured security groups. The operator creates those groups with **no ingress and no
  egress except the VPC endpoints** the task needs: ECR (api, dkr) and S3 (image layers, the
  staged bundle: the S3 gateway endpoint's prefix list), CloudWatch Logs (awslogs), and the
  platform API's task gateway (an internal load balancer or PrivateLink endpoint serving
  ``TRACE_FARGATE_GATEWAY_URL``). No NAT, no internet gateway route: nothing else is reachable.
* **Task definition** (:meth:`FargateBackend.ensure_task_definition`, registered once per content,
  found again by its ``trace:content-sha256`` tag): ``requiresCompatibilities: [FARGATE]``,
  ``networkMode: awsvpc``, cpu and memory from the job's limits (the smallest Fargate size that
  holds them; the container's own hard memory limit is exactly the job's), a read-only root file
  system, user 10001, not privileged, every capability dropped, an init process, ``nproc`` and
  ``core`` ulimits, ``/tmp`` on the task's ephemeral storage, logs to CloudWatch (awslogs), an
  execution role for the image pull and logs, and **no task role**: the sandbox holds no AWS
  credentials. ``deploy/ecs/task-definition.json`` shows the same document for operators.
* **Invocation**: Fargate shares no folder with the worker, so
  - the bundle is staged in S3 (``fargate-bundles/<sha256>.zip`` in ``TRACE_FARGATE_BUNDLE_BUCKET``)
    and fetched by a short-lived presigned URL by a small stager (:data:`STAGER`, the container's
    command) that checks its SHA-256, unpacks it to ``/tmp/task`` and execs the usual wrapper
    (``/opt/trace/runtime/bootstrap.py``) with ``TRACE_TASK_ROOT=/tmp/task``;
  - the event and the capability token travel in the container overrides' environment
    (``TRACE_EVENT`` inline, ``TRACE_CAPABILITY_TOKEN``), which ECS caps at 8 KiB: a larger event
    is a ``sandbox_error`` (the token is visible to principals allowed ``ecs:DescribeTasks`` for as
    long as it lives; it is short-lived and scoped to the one task);
  - the gateway is the public API's ``/v1/task/`` routes at ``TRACE_FARGATE_GATEWAY_URL``;
  - the result comes back on stdout: ``TRACE_RESULT_FILE`` names a path that cannot exist on the
    read-only root (:data:`UNWRITABLE_RESULT_FILE`), so the wrapper prints its result after the
    ``__TRACE_RESULT__`` marker line, and the backend reads it from CloudWatch Logs. The *last*
    marker counts: the wrapper writes it after its runtime process group is gone.
* **Ending**: ``describe_tasks`` is polled until ``STOPPED``. A task still not running after
  ``TRACE_FARGATE_START_TIMEOUT`` or still running ``timeout + 1.5 s`` after it started is
  stopped (``stop_task``). The container's ``OutOfMemoryError`` reason maps to ``oom``, our stop
  for the deadline to ``timeout``, ``TaskFailedToStart`` (e.g. an image that cannot be pulled) to
  ``sandbox_error``, and otherwise the wrapper's result decides, as for every backend
  (:mod:`workers.sandbox.outcome`).

Tasks carry ``startedBy=trace-<host>--<pid>``; :meth:`FargateBackend.reap_orphans` stops those of a
dead worker on this host, and any that outlived every job.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import socket
import threading
import time
import zipfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tracecore.dags.spec import Limits
from tracecore.exceptions import PlatformError
from tracecore.settings import Settings

from . import LOG_CAP_BYTES, RESULT_CAP_BYTES, RUNTIME_IMAGES, CappedLog, Invocation, Outcome
from .outcome import RESULT_MARKER, RESULT_SLACK_BYTES, TOO_LARGE, decide, parse_result, pid_alive

log = logging.getLogger(__name__)

CONTAINER = "udf"
LOG_STREAM_PREFIX = "trace"
STARTED_BY_PREFIX = "trace-"
CONTENT_TAG = "trace:content-sha256"
SANDBOX_USER = "10001"
TASK_ROOT = "/tmp/task"
# A path under a folder that does not exist on the read-only root: the wrapper cannot write its
# result file there and prints the result to stdout after the marker line instead.
UNWRITABLE_RESULT_FILE = "/.trace-no-result-file/result.json"
BUNDLE_PREFIX = "fargate-bundles/"
OVERRIDES_LIMIT_BYTES = 8192  # ECS: the JSON of a task's overrides
KILL_GRACE_S = 1.5
MAX_RESULT_PARSES = 16  # awslogs splits an event at 256 KB: the wrapper's document spans two or three
STOP_WAIT_S = 120.0  # after stop_task: how long to wait for STOPPED before giving up on the answer
LIVE_STATES = ("RUNNING", "DEACTIVATING", "STOPPING", "DEPROVISIONING")
FOREIGN_STOPS = ("UserInitiated", "ServiceSchedulerInitiated", "SpotInterruption", "TerminationNotice")

# Fargate's task sizes: cpu units -> the memory sizes (MiB) allowed with it, smallest first.
FARGATE_SIZES: tuple[tuple[int, tuple[int, ...]], ...] = (
    (256, (512, 1024, 2048)),
    (512, tuple(range(1024, 4096 + 1, 1024))),
    (1024, tuple(range(2048, 8192 + 1, 1024))),
    (2048, tuple(range(4096, 16384 + 1, 1024))),
    (4096, tuple(range(8192, 30720 + 1, 1024))),
    (8192, tuple(range(16384, 61440 + 1, 4096))),
    (16384, tuple(range(32768, 122880 + 1, 8192))),
)

# The container's command: fetch the bundle, check it, unpack it, exec the wrapper. Standard
# library only (it runs in the runtime images' python3); any failure is an init_error result
# printed the way the wrapper prints its own.
STAGER = r'''
import hashlib, json, os, sys, urllib.request, zipfile

def fail(message):
    document = {"status": "init_error", "response": None, "duration_ms": 0.0, "exit_code": None,
                "error": {"errorMessage": message, "errorType": "Trace.BundleUnavailable", "stackTrace": []}}
    sys.stdout.write("__TRACE_RESULT__\n" + json.dumps(document) + "\n")
    sys.stdout.flush()
    sys.exit(1)

env = dict(os.environ)
url, expected = env.pop("TRACE_BUNDLE_URL", ""), env.pop("TRACE_BUNDLE_SHA256", "")
root, archive = env.get("TRACE_TASK_ROOT") or "/tmp/task", "/tmp/bundle.zip"
try:
    digest = hashlib.sha256()
    with urllib.request.urlopen(url, timeout=60) as response, open(archive, "wb") as out:
        for chunk in iter(lambda: response.read(1 << 20), b""):
            digest.update(chunk)
            out.write(chunk)
    if digest.hexdigest() != expected:
        fail("the staged bundle does not match its SHA-256")
    with zipfile.ZipFile(archive) as bundle:
        for info in bundle.infolist():
            if info.filename.startswith("/") or ".." in info.filename.split("/"):
                fail(f"unsafe path in the bundle: {info.filename!r}")
            path = bundle.extract(info, root)
            mode = (info.external_attr >> 16) & 0o777
            if mode and not info.is_dir():
                os.chmod(path, (mode & 0o755) | 0o400)
    os.remove(archive)
except Exception as exc:
    fail(f"cannot fetch the bundle: {type(exc).__name__}: {exc}")
env["TRACE_TASK_ROOT"] = root
os.chdir(root)
bootstrap = env.pop("TRACE_RUNTIME_BOOTSTRAP", "") or "/opt/trace/runtime/bootstrap.py"
os.execve(sys.executable, [sys.executable, bootstrap], env)
'''


def fargate_size(limits: Limits) -> tuple[str, str]:
    """The smallest Fargate (cpu units, memory MiB) that holds the limits: 0.25 vCPU, 512 MB -> ("256", "512")."""
    want_cpu = limits.cpu * 1024
    for cpu, memories in FARGATE_SIZES:
        if cpu + 1e-6 < want_cpu:
            continue
        for memory in memories:
            if memory >= limits.memory_mb:
                return str(cpu), str(memory)
    raise PlatformError(f"no Fargate task size holds {limits.cpu:g} vCPU and {limits.memory_mb} MB",
                        code="sandbox_limits")


class FargateBackend:
    name = "fargate"

    def __init__(self, *, ecs: Any, logs: Any, s3: Any, cluster: str, subnets: tuple[str, ...],
                 security_groups: tuple[str, ...], image_prefix: str, execution_role_arn: str, bundle_bucket: str,
                 gateway_url: str, region: str, family: str = "trace-udf", image_tag: str = "latest",
                 log_group: str = "/trace/udf", start_timeout_s: float = 300.0, poll_interval_s: float = 2.0,
                 log_wait_s: float = 15.0, orphan_age_s: float = 3600.0) -> None:
        self.ecs, self.logs, self.s3 = ecs, logs, s3
        self.cluster = cluster
        self.subnets = tuple(subnets)
        self.security_groups = tuple(security_groups)
        self.image_prefix = image_prefix.rstrip("/")
        self.image_tag = image_tag
        self.execution_role_arn = execution_role_arn
        self.bundle_bucket = bundle_bucket
        self.gateway_url = gateway_url
        self.region = region
        self.family = family
        self.log_group = log_group
        self.start_timeout_s = start_timeout_s
        self.poll_interval_s = poll_interval_s
        self.log_wait_s = log_wait_s
        self.orphan_age_s = orphan_age_s
        self._lock = threading.Lock()
        self._task_definitions: dict[str, str] = {}
        self._bundles: dict[str, tuple[str, str]] = {}
        self._log_group_ready = False

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> FargateBackend:
        required = {"TRACE_FARGATE_SUBNETS": settings.fargate_subnets,
                    "TRACE_FARGATE_SECURITY_GROUPS": settings.fargate_security_groups,
                    "TRACE_FARGATE_IMAGE_PREFIX": settings.fargate_image_prefix,
                    "TRACE_FARGATE_EXECUTION_ROLE_ARN": settings.fargate_execution_role_arn,
                    "TRACE_FARGATE_BUNDLE_BUCKET": settings.fargate_bundle_bucket,
                    "TRACE_FARGATE_GATEWAY_URL": settings.fargate_gateway_url}
        missing = [name for name, value in required.items() if not value]
        if missing:
            raise PlatformError(f"TRACE_SANDBOX=fargate needs {', '.join(missing)}", code="sandbox_unavailable",
                                details={"missing": missing})
        import boto3

        session = boto3.session.Session(region_name=settings.fargate_region)
        clients = {name: session.client(name, endpoint_url=settings.fargate_endpoint_url)
                   for name in ("ecs", "logs", "s3")}
        options: dict[str, Any] = {
            **clients, "cluster": settings.fargate_cluster, "subnets": settings.fargate_subnets,
            "security_groups": settings.fargate_security_groups, "image_prefix": settings.fargate_image_prefix,
            "image_tag": settings.fargate_image_tag, "execution_role_arn": settings.fargate_execution_role_arn,
            "bundle_bucket": settings.fargate_bundle_bucket, "gateway_url": settings.fargate_gateway_url,
            "region": settings.fargate_region, "family": settings.fargate_task_family,
            "log_group": settings.fargate_log_group, "start_timeout_s": settings.fargate_start_timeout,
            "orphan_age_s": settings.max_job_timeout + settings.fargate_start_timeout + 300,
        }
        options.update(overrides)
        return cls(**options)

    # -- task definition -----------------------------------------------------------------------

    def image_for(self, runtime: str) -> str:
        image = RUNTIME_IMAGES.get(runtime)
        if image is None:
            raise PlatformError(f"no runtime image for {runtime!r}", code="unknown_runtime")
        return f"{self.image_prefix}/{image}:{self.image_tag}"

    def task_definition_spec(self, runtime: str, limits: Limits) -> dict[str, Any]:
        """The register_task_definition arguments for a runtime and limits (tags aside)."""
        cpu, memory = fargate_size(limits)
        return {
            "family": self.family,
            "requiresCompatibilities": ["FARGATE"],
            "networkMode": "awsvpc",
            "cpu": cpu,
            "memory": memory,
            "executionRoleArn": self.execution_role_arn,
            # No taskRoleArn: the sandbox gets no AWS credentials at all.
            "volumes": [{"name": "tmp"}],
            "containerDefinitions": [{
                "name": CONTAINER,
                "image": self.image_for(runtime),
                "essential": True,
                "user": SANDBOX_USER,
                "readonlyRootFilesystem": True,
                "memory": int(limits.memory_mb),  # the container's hard limit: exactly the job's
                "linuxParameters": {"initProcessEnabled": True, "capabilities": {"drop": ["ALL"]}},
                "ulimits": [{"name": "nproc", "softLimit": int(limits.pids), "hardLimit": int(limits.pids)},
                            {"name": "core", "softLimit": 0, "hardLimit": 0}],
                "mountPoints": [{"sourceVolume": "tmp", "containerPath": "/tmp", "readOnly": False}],
                "command": ["/usr/bin/python3", "-I", "-c", STAGER],
                "workingDirectory": "/tmp",
                "environment": [{"name": "TRACE_RESULT_FILE", "value": UNWRITABLE_RESULT_FILE},
                                {"name": "TRACE_TASK_ROOT", "value": TASK_ROOT}],
                "stopTimeout": 2,
                "logConfiguration": {"logDriver": "awslogs", "options": {
                    "awslogs-group": self.log_group, "awslogs-region": self.region,
                    "awslogs-stream-prefix": LOG_STREAM_PREFIX}},
            }],
        }

    def ensure_task_definition(self, runtime: str, limits: Limits) -> str:
        """The ARN of an ACTIVE revision with exactly this content, registering one only if none has it."""
        spec = self.task_definition_spec(runtime, limits)
        digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()
        with self._lock:
            cached = self._task_definitions.get(digest)
        if cached:
            return cached
        arn = self._find_task_definition(digest)
        if arn is None:
            self._ensure_log_group()
            answer = self.ecs.register_task_definition(
                **spec, tags=[{"key": CONTENT_TAG, "value": digest}, {"key": "trace:managed", "value": "1"}])
            arn = answer["taskDefinition"]["taskDefinitionArn"]
            log.info("fargate: registered %s (%s)", arn, digest[:12])
        with self._lock:
            self._task_definitions[digest] = arn
        return arn

    def _find_task_definition(self, digest: str) -> str | None:
        paginator = self.ecs.get_paginator("list_task_definitions")
        seen = 0
        for page in paginator.paginate(familyPrefix=self.family, status="ACTIVE", sort="DESC"):
            for arn in page.get("taskDefinitionArns", []):
                seen += 1
                if seen > 100:  # older revisions than that are not worth a call each
                    return None
                answer = self.ecs.describe_task_definition(taskDefinition=arn, include=["TAGS"])
                if answer["taskDefinition"].get("family") != self.family:
                    continue
                tags = {tag.get("key"): tag.get("value") for tag in answer.get("tags") or []}
                if tags.get(CONTENT_TAG) == digest:
                    return str(arn)
        return None

    def _ensure_log_group(self) -> None:
        if self._log_group_ready:
            return
        from botocore.exceptions import ClientError

        try:
            self.logs.create_log_group(logGroupName=self.log_group)
        except ClientError as exc:
            if _error_code(exc) != "ResourceAlreadyExistsException":
                raise
        self._log_group_ready = True

    # -- bundles -------------------------------------------------------------------------------

    def stage_bundle(self, bundle_dir: Path) -> tuple[str, str]:
        """Upload the bundle (once per content) and answer (presigned GET URL, sha256)."""
        from botocore.exceptions import ClientError

        key_path = str(Path(bundle_dir).resolve())
        with self._lock:
            staged = self._bundles.get(key_path)
        if staged is None:
            data = zip_bundle(Path(bundle_dir))
            sha256 = hashlib.sha256(data).hexdigest()
            key = f"{BUNDLE_PREFIX}{sha256}.zip"
            try:
                self.s3.head_object(Bucket=self.bundle_bucket, Key=key)
            except ClientError as exc:
                # Without s3:ListBucket a missing key answers 403: upload, and let put_object say if denied.
                if _error_code(exc) not in ("404", "NoSuchKey", "NotFound", "403", "AccessDenied"):
                    raise
                self.s3.put_object(Bucket=self.bundle_bucket, Key=key, Body=data, ContentType="application/zip")
            staged = (key, sha256)
            with self._lock:
                self._bundles[key_path] = staged
        key, sha256 = staged
        url = self.s3.generate_presigned_url("get_object", Params={"Bucket": self.bundle_bucket, "Key": key},
                                             ExpiresIn=int(self.start_timeout_s + 300))
        return url, sha256

    # -- running -------------------------------------------------------------------------------

    @property
    def started_by(self) -> str:
        """``trace-<host>--<pid>`` (ECS allows letters, digits, - / _ and 128 characters)."""
        return f"{STARTED_BY_PREFIX}{_host_token(socket.gethostname())}--{os.getpid()}"

    def overrides(self, invocation: Invocation, bundle_url: str, bundle_sha256: str) -> dict[str, Any]:
        limits = invocation.limits
        environment = {
            **invocation.env, "TRACE_RUNTIME": invocation.runtime, "_HANDLER": invocation.handler,
            "TRACE_EVENT": json.dumps(invocation.event, separators=(",", ":")),
            "TRACE_TIMEOUT_S": str(limits.timeout_s), "TRACE_FUNCTION_NAME": invocation.function_name,
            "TRACE_MEMORY_MB": str(limits.memory_mb), "TRACE_GATEWAY": self.gateway_url,
            "TRACE_RESULT_FILE": UNWRITABLE_RESULT_FILE, "TRACE_TASK_ROOT": TASK_ROOT,
            "TRACE_BUNDLE_URL": bundle_url, "TRACE_BUNDLE_SHA256": bundle_sha256,
        }
        return {"containerOverrides": [{"name": CONTAINER, "environment": [
            {"name": name, "value": value} for name, value in environment.items()]}]}

    def run(self, invocation: Invocation) -> Outcome:
        from botocore.exceptions import BotoCoreError, ClientError

        started = time.monotonic()

        def failed(error_type: str, message: str) -> Outcome:
            return Outcome("sandbox_error", error_type=error_type, error_message=message,
                           duration_ms=(time.monotonic() - started) * 1000)

        if invocation.runtime not in RUNTIME_IMAGES:
            return failed("UnknownRuntime", f"no runtime image for {invocation.runtime!r}")
        try:
            task_definition = self.ensure_task_definition(invocation.runtime, invocation.limits)
            bundle_url, bundle_sha256 = self.stage_bundle(invocation.bundle_dir)
            overrides = self.overrides(invocation, bundle_url, bundle_sha256)
            size = len(json.dumps(overrides, separators=(",", ":")))
            if size > OVERRIDES_LIMIT_BYTES:
                return failed("EventTooLarge", f"the event and environment take {size} bytes; ECS overrides "
                                               f"hold {OVERRIDES_LIMIT_BYTES}")
            answer = self.ecs.run_task(
                cluster=self.cluster, taskDefinition=task_definition, launchType="FARGATE", count=1,
                startedBy=self.started_by, overrides=overrides, enableExecuteCommand=False,
                networkConfiguration={"awsvpcConfiguration": {
                    "subnets": list(self.subnets), "securityGroups": list(self.security_groups),
                    "assignPublicIp": "DISABLED"}},
                tags=[{"key": key[:128], "value": str(value)[:256]} for key, value in invocation.labels.items()])
        except PlatformError as exc:
            return failed(exc.code, exc.message)
        except (ClientError, BotoCoreError) as exc:
            return failed(type(exc).__name__, str(exc))
        tasks = answer.get("tasks") or []
        if not tasks:
            reasons = "; ".join(f"{item.get('reason')}: {item.get('detail') or item.get('arn') or ''}"
                                for item in answer.get("failures") or [])
            return failed("RunTaskFailed", reasons or "ECS started no task")
        task_arn = tasks[0]["taskArn"]
        finished = False
        try:
            task, stopped_for = self._wait(task_arn, invocation.limits)
            finished = True
        except (ClientError, BotoCoreError) as exc:
            return failed(type(exc).__name__, str(exc))
        finally:
            if not finished:  # an error or the worker being interrupted: never leave the task running
                self._stop(task_arn, "trace: the worker gave up on this invocation")
        return self._outcome(invocation, task, stopped_for, started)

    def _wait(self, task_arn: str, limits: Limits) -> tuple[dict[str, Any], str | None]:
        """Poll until STOPPED; stop the task at the start or run deadline. Answers (task, why we stopped it)."""
        submitted = time.monotonic()
        running_since: float | None = None
        stopped_for: str | None = None
        stop_sent = 0.0
        while True:
            task = self._describe(task_arn)
            status = task.get("lastStatus")
            if status == "STOPPED":
                return task, stopped_for
            now = time.monotonic()
            if running_since is None and status in LIVE_STATES:
                running_since = now
            if stopped_for is None:
                if running_since is None and now - submitted > self.start_timeout_s:
                    stopped_for = "start_timeout"
                elif running_since is not None and now - running_since > limits.timeout_s + KILL_GRACE_S:
                    stopped_for = "timeout"
                if stopped_for is not None:
                    stop_sent = now
                    self._stop(task_arn, f"trace: {stopped_for.replace('_', ' ')} "
                                         f"({limits.timeout_s:g} s run, {self.start_timeout_s:g} s start)")
            elif now - stop_sent > STOP_WAIT_S:
                return task, stopped_for
            time.sleep(self.poll_interval_s)

    def _describe(self, task_arn: str) -> dict[str, Any]:
        answer = self.ecs.describe_tasks(cluster=self.cluster, tasks=[task_arn])
        for task in answer.get("tasks") or []:
            if task.get("taskArn") == task_arn:
                return dict(task)
        return {"taskArn": task_arn, "lastStatus": "MISSING"}

    def _stop(self, task_arn: str, reason: str) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.ecs.stop_task(cluster=self.cluster, task=task_arn, reason=reason[:255])
        except (ClientError, BotoCoreError) as exc:
            log.warning("fargate: cannot stop %s: %s", task_arn, exc)

    def _outcome(self, invocation: Invocation, task: dict[str, Any], stopped_for: str | None,
                 started: float) -> Outcome:
        container = next((item for item in task.get("containers") or [] if item.get("name") == CONTAINER),
                         (task.get("containers") or [{}])[0])
        exit_code = container.get("exitCode")
        reason = str(container.get("reason") or "")
        stop_code = str(task.get("stopCode") or "")
        stopped_reason = str(task.get("stoppedReason") or "")
        oom = "OutOfMemoryError" in reason or "OutOfMemory" in stopped_reason
        if stopped_for == "start_timeout":
            return Outcome("sandbox_error", error_type="TaskStartTimeout",
                           error_message=f"the Fargate task did not start within {self.start_timeout_s:g} s",
                           duration_ms=(time.monotonic() - started) * 1000)
        if stop_code == "TaskFailedToStart" and not oom:
            return Outcome("sandbox_error", error_type="TaskFailedToStart",
                           error_message=stopped_reason or reason or "the Fargate task failed to start",
                           duration_ms=(time.monotonic() - started) * 1000)
        # Our own stop or an OOM kill: no result line is coming, so do not wait for one.
        expect_result = stopped_for is None and not oom and exit_code is not None
        lines = self._read_logs(task["taskArn"], wait_for_result=expect_result)
        result, lines = split_result(lines)
        logs = CappedLog()
        for line in lines:
            logs.feed(line.encode("utf-8", errors="replace") + b"\n")
        text, truncated = logs.text(invocation.secrets)
        outcome = decide(invocation, result, exit_code=exit_code, oom=oom, killed_from_outside=stopped_for == "timeout",
                         logs_text=text, logs_truncated=truncated, duration_ms=(time.monotonic() - started) * 1000)
        if outcome.exit_reason == "sandbox_error" and stop_code in FOREIGN_STOPS:
            outcome.exit_reason, outcome.error_type = "killed", "Killed"
            outcome.error_message = f"the Fargate task was stopped: {stopped_reason or stop_code}"
        return outcome

    def log_stream(self, task_arn: str) -> str:
        """The awslogs stream of a task: <prefix>/<container>/<task id>."""
        return f"{LOG_STREAM_PREFIX}/{CONTAINER}/{task_arn.rsplit('/', 1)[-1]}"

    def _read_logs(self, task_arn: str, wait_for_result: bool) -> list[str]:
        """The task's log lines (at most about LOG_CAP_BYTES from the head, plus the tail that holds the
        result). awslogs delivers with a delay: wait up to ``log_wait_s`` for the result marker."""
        deadline = time.monotonic() + (self.log_wait_s if wait_for_result else 0.0)
        while True:
            lines = self._log_lines(self.log_stream(task_arn))
            if not wait_for_result or any(line.rstrip("\r\n") == RESULT_MARKER for line in lines):
                return lines
            if time.monotonic() >= deadline:
                return lines
            time.sleep(min(1.0, max(0.05, self.poll_interval_s)))

    def _log_lines(self, stream: str) -> list[str]:
        head: list[str] = []
        kept = 0
        token: str | None = None
        complete = False
        while kept <= LOG_CAP_BYTES:
            page = self._log_page(stream, start_from_head=True, token=token)
            if page is None:
                return head
            events = page.get("events") or []
            head.extend(event.get("message", "") for event in events)
            kept += sum(len(event.get("message", "")) + 1 for event in events)
            next_token = page.get("nextForwardToken")
            if not events or next_token == token:
                complete = True
                break
            token = next_token
        if complete:
            return head
        # Over the cap: the head is enough for the logs; the result sits at the very end.
        tail = self._log_page(stream, start_from_head=False, token=None)
        tail_lines = [event.get("message", "") for event in (tail or {}).get("events") or []]
        return [*head, f"[... log lines between the head and the last {len(tail_lines)} not read ...]", *tail_lines]

    def _log_page(self, stream: str, *, start_from_head: bool, token: str | None) -> dict[str, Any] | None:
        from botocore.exceptions import ClientError

        request: dict[str, Any] = {"logGroupName": self.log_group, "logStreamName": stream,
                                   "startFromHead": start_from_head}
        if token:
            request["nextToken"] = token
        try:
            return dict(self.logs.get_log_events(**request))
        except ClientError as exc:
            if _error_code(exc) == "ResourceNotFoundException":
                return None
            raise

    # -- orphans -------------------------------------------------------------------------------

    def reap_orphans(self) -> int:
        """Stop tasks started by a worker of this host that is gone, or running longer than any job."""
        host = _host_token(socket.gethostname())
        now = datetime.now(UTC)
        stopped = 0
        for task in self._running_tasks():
            started_by = str(task.get("startedBy") or "")
            if not started_by.startswith(STARTED_BY_PREFIX):
                continue
            worker_host, _, pid = started_by[len(STARTED_BY_PREFIX):].rpartition("--")
            dead = worker_host == host and pid.isdigit() and not pid_alive(int(pid))
            created = task.get("createdAt") or task.get("startedAt")
            too_old = isinstance(created, datetime) and (now - created).total_seconds() > self.orphan_age_s
            if dead or too_old:
                why = "its worker is gone" if dead else "it outlived every job"
                self._stop(task["taskArn"], f"trace: orphan sandbox ({why})")
                stopped += 1
        return stopped

    def _running_tasks(self) -> Iterator[dict[str, Any]]:
        paginator = self.ecs.get_paginator("list_tasks")
        arns: list[str] = []
        for page in paginator.paginate(cluster=self.cluster, desiredStatus="RUNNING", launchType="FARGATE"):
            arns.extend(page.get("taskArns") or [])
        for index in range(0, len(arns), 100):
            answer = self.ecs.describe_tasks(cluster=self.cluster, tasks=arns[index:index + 100])
            yield from answer.get("tasks") or []


def split_result(lines: list[str]) -> tuple[dict[str, Any] | str | None, list[str]]:
    """(the wrapper's result document after the LAST marker line, the other lines)."""
    marker = max((index for index, line in enumerate(lines) if line.rstrip("\r\n") == RESULT_MARKER), default=None)
    if marker is None:
        return None, lines
    # awslogs may split a long line into several events: join until the document parses. The lines are the
    # sandbox's to write: the joined size is bounded by the result cap, and parsing is tried only where a
    # document can end, a bounded number of times (no quadratic re-parse of crafted lines).
    text, size, tries = "", 0, 0
    for end in range(marker + 1, len(lines)):
        text += lines[end]
        size += len(lines[end].encode("utf-8", errors="replace"))
        if size > RESULT_CAP_BYTES + RESULT_SLACK_BYTES:
            return TOO_LARGE, lines[:marker]
        if not text.rstrip().endswith("}"):
            continue
        tries += 1
        if tries > MAX_RESULT_PARSES:
            break
        result = parse_result(text)
        if result is not None:
            return result, lines[:marker] + lines[end + 1:]
    return None, lines[:marker]


def zip_bundle(bundle_dir: Path) -> bytes:
    """The bundle folder as a reproducible zip (sorted, fixed timestamps, modes kept): same files, same bytes."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(bundle_dir.rglob("*")):
            if not path.is_file():
                continue
            info = zipfile.ZipInfo(path.relative_to(bundle_dir).as_posix(), date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = (path.stat().st_mode & 0o777) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, path.read_bytes())
    return buffer.getvalue()


def _host_token(host: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "-", host)[:96]


def _error_code(exc: Any) -> str:
    return str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))


def task_definition_template(runtime: str = "python3.11", limits: Limits | None = None) -> str:
    """deploy/ecs/task-definition.json: what ensure_task_definition registers, with the operator's values
    as ${TRACE_FARGATE_...} placeholders (``python -m workers.sandbox.fargate > deploy/ecs/task-definition.json``)."""
    backend = FargateBackend(
        ecs=None, logs=None, s3=None, cluster="${TRACE_FARGATE_CLUSTER}", subnets=(), security_groups=(),
        image_prefix="${TRACE_FARGATE_IMAGE_PREFIX}", image_tag="${TRACE_FARGATE_IMAGE_TAG}",
        execution_role_arn="${TRACE_FARGATE_EXECUTION_ROLE_ARN}", bundle_bucket="${TRACE_FARGATE_BUNDLE_BUCKET}",
        gateway_url="${TRACE_FARGATE_GATEWAY_URL}", region="${TRACE_FARGATE_REGION}",
        family="${TRACE_FARGATE_TASK_FAMILY}", log_group="${TRACE_FARGATE_LOG_GROUP}")
    return json.dumps(backend.task_definition_spec(runtime, limits or Limits()), indent=2) + "\n"


if __name__ == "__main__":
    import sys

    sys.stdout.write(task_definition_template())
