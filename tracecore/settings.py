"""Every Trace setting, declared once: name, type, default and a one-line doc.

Each setting is read from the environment variable ``TRACE_<NAME>``. docs/settings.md is
generated from this module (``trace settings --markdown``; a unit test checks it is current),
so this is the only place a setting is documented.

One way to read them: :func:`current_settings`. Inside a Flask app context (requests, Celery
tasks, beat) it answers that app's settings; given an ``app`` (threads outside any context, such
as the dispatcher's heartbeat) that app's; outside any app (the CLI, process bootstrap) the
process's, read once from the environment or set by :func:`configure`. An app holds its
settings under ``app.config[SETTINGS_KEY]``, put there once by ``tracecore.appctx.create_base_app``;
nothing else reads that key.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flask import Flask


def _setting(default: Any, doc: str) -> Any:
    return field(default=default, metadata={"doc": doc})


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError(f"not a boolean: {text!r}")


def _parse_list(text: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in text.split(",") if item.strip())


_PARSERS: dict[Any, Callable[[str], Any]] = {
    "str": str, "int": int, "float": float, "bool": _parse_bool, "tuple[str, ...]": _parse_list,
    "str | None": lambda text: text or None,
}


@dataclass(frozen=True)
class Settings:
    home: str = _setting("./.trace", "Data folder: embedded PostgreSQL and Redis, object store, admin token.")
    database_url: str | None = _setting(
        None, "PostgreSQL URL (postgresql://...). Unset: an embedded PostgreSQL under TRACE_HOME.")
    broker_url: str | None = _setting(
        None, "Celery broker URL (redis://...). Unset: an embedded Redis under TRACE_HOME.")
    host: str = _setting("127.0.0.1", "Address the API listens on.")
    port: int = _setting(8000, "Port the API listens on.")
    secret_key: str | None = _setting(
        None, "Key that signs capability tokens. Unset: a random key kept in TRACE_HOME/secret-key.")
    lease_ttl: float = _setting(
        120.0, "Seconds a task lease lasts before the reaper may hand the task to another worker.")
    broker_org_queues: int = _setting(
        16, "Broker queues an org's execute_task messages are spread over (by a hash of the org id); "
            "workers take from them in turn, so one org's backlog cannot hold back another's. "
            "0: one shared first-in-first-out queue.")
    reaper_interval: float = _setting(15.0, "Seconds between runs of the lease reaper (a beat entry).")
    retry_base_delay: float = _setting(
        1.0, "Base of the exponential retry backoff, in seconds (delay = base * 2**n, with jitter).")
    retry_max_delay: float = _setting(300.0, "Upper bound of one retry delay, in seconds.")
    max_job_timeout: float = _setting(
        3600.0, "Longest job timeout allowed, in seconds; the broker's visibility timeout is set above it.")
    min_schedule_interval: float = _setting(1.0, "Shortest `schedule: {every}` a DAG may declare, in seconds.")
    max_job_memory: int = _setting(8192, "Largest `limits.memory` a DAG may declare, in MB.")
    max_job_cpu: float = _setting(4.0, "Largest `limits.cpu` a DAG may declare, in vCPUs.")
    worker_concurrency: int = _setting(2, "Processes per Celery worker started by `trace worker` / `trace up`.")
    api_threads: int = _setting(0, "Request threads of each API worker process; 0: twice the cores plus one.")
    run_wait_max_total: int = _setting(
        0, "Most `GET /v1/runs/{id}?wait=` long polls one API process holds at once; 0: half of its request "
           "threads (at least 1). A wait past a cap answers at once (header Trace-Wait: refused).")
    run_wait_max_per_org: int = _setting(
        0, "Most long polls of one org held at once in one API process; 0: half of TRACE_RUN_WAIT_MAX_TOTAL "
           "(at least 1), so one org never holds every waiting slot.")
    run_wait_max_per_principal: int = _setting(2, "Most long polls of one API token held at once in one API process.")
    plugins: tuple[str, ...] = _setting(
        (), "Comma-separated Python modules imported at start that register extra operators.")
    sandbox: str = _setting("docker", "Sandbox backend for UDF bundles: docker, process (bubblewrap) or fargate.")
    redact: tuple[str, ...] = _setting(
        (), "Comma-separated secrets to redact from sandbox logs and errors, beside the capability token.")
    sandbox_work_dir_max_bytes: int = _setting(
        16 << 20, "Size of the tmpfs the worker mounts as each sandbox's /run/trace (event, result, gateway "
                  "socket): past it the sandbox's writes fail with ENOSPC; 0: a plain folder on the host's disk.")
    admin_email: str = _setting("admin@localhost", "Email of the admin user that `trace up` creates on first start.")
    api_url: str | None = _setting(None, "API base URL the CLI talks to. Unset: http://TRACE_HOST:TRACE_PORT.")
    token: str | None = _setting(None, "API token the CLI sends. Unset: the one in TRACE_HOME/admin-token.")
    fargate_region: str = _setting("us-east-1", "AWS region of the Fargate sandboxes (ECS, CloudWatch Logs, S3).")
    fargate_endpoint_url: str | None = _setting(
        None, "Endpoint URL for the AWS APIs the Fargate backend calls (tests: a moto server). Unset: AWS's.")
    fargate_cluster: str = _setting("trace", "ECS cluster the Fargate sandboxes run in.")
    fargate_subnets: tuple[str, ...] = _setting(
        (), "Comma-separated private subnet ids for the sandboxes' ENIs (no public IP is ever assigned).")
    fargate_security_groups: tuple[str, ...] = _setting(
        (), "Comma-separated security group ids: no ingress, egress only to the VPC endpoints (ECR, S3, Logs, API).")
    fargate_task_family: str = _setting("trace-udf", "Task definition family the Fargate backend registers.")
    fargate_image_prefix: str | None = _setting(
        None, "Registry prefix of the runtime images, e.g. 123456789012.dkr.ecr.eu-west-1.amazonaws.com/trace.")
    fargate_image_tag: str = _setting("latest", "Tag of the runtime images (trace-runtime-python, -node) to run.")
    fargate_execution_role_arn: str | None = _setting(
        None, "ECS task execution role (image pull, awslogs). The task itself gets no role: no AWS credentials.")
    fargate_log_group: str = _setting("/trace/udf", "CloudWatch Logs group of the sandboxes' output (awslogs).")
    fargate_bundle_bucket: str | None = _setting(
        None, "S3 bucket the Fargate backend stages bundles in (bundles/<sha256>.zip, fetched by presigned URL).")
    fargate_gateway_url: str | None = _setting(
        None, "Public API base URL the Fargate sandboxes reach the task gateway at (https://..., /v1/task/*).")
    fargate_start_timeout: float = _setting(
        300.0, "Seconds a Fargate task may take to start (provisioning, image pull) before it is stopped.")
    object_store: str = _setting(
        "", "Where objects live: empty = a local folder TRACE_HOME/objects, a folder path, or s3://bucket/prefix.")
    s3_endpoint: str | None = _setting(
        None, "S3 endpoint URL (SeaweedFS, MinIO, a moto server); unset = AWS. Credentials: the standard AWS chain.")
    s3_region: str = _setting("us-east-1", "AWS region of the S3 bucket (and of STS for the credential broker).")
    credentials_role_arn: str | None = _setting(
        None, "IAM role the credential broker assumes (STS AssumeRole, scoped by a session policy) to hand a "
              "task S3 credentials limited to its prefixes. Unset: the broker refuses S3 credentials.")
    sts_endpoint: str | None = _setting(None, "STS endpoint URL for the credential broker (tests: moto); unset = AWS.")
    query_timeout: float = _setting(
        30.0, "Seconds a Query Service query may run (registration included) before it is interrupted (408).")
    query_row_limit: int = _setting(
        1_000_000, "Most rows one query answers or exports; more are cut and the answer says truncated.")
    query_export_threshold: int = _setting(
        10_000, "Most rows a JSON query answer carries inline; a larger result is exported to Parquet "
                "and answered with a download (tasks: cut here, truncated).")
    query_memory_limit: str = _setting("1GB", "DuckDB memory_limit of one query (e.g. 512MB, 2GB); past it: 422.")
    query_threads: int = _setting(2, "DuckDB threads of one query.")
    query_max_result_bytes: int = _setting(
        32 * 1024 * 1024, "Most bytes (Arrow, counted as DuckDB hands them over) of a JSON answer's rows; past it a "
                          "user's answer becomes a download and a task's is 422 query_result_too_large.")
    query_max_export_bytes: int = _setting(
        512 * 1024 * 1024, "Most bytes of one exported query result (csv, parquet, a spilled JSON answer); past it "
                           "the export stops, nothing is stored: 422 query_result_too_large.")
    run_rate_limit: int = _setting(
        600, "Most API-triggered runs (manual and webhook) per org in one TRACE_RUN_RATE_WINDOW; past it: 429.")
    run_rate_window: int = _setting(60, "Seconds of the per-org window of TRACE_RUN_RATE_LIMIT.")
    token_trust_seconds: float = _setting(
        2.0, "Seconds an API process trusts a token it resolved before asking the database again "
             "(a revocation or role change made elsewhere takes effect within this); 0: every request.")
    org_max_running: int = _setting(
        50, "Most tasks of one org running at once (live leases), enforced when a lease is taken; "
            "a task over the cap waits in the queue.")
    chains: str = _setting(
        "", 'Chains registered (or updated) at start, a JSON list of POST /v1/chains bodies: [{"name": "anvil", '
            '"chain_id": 31337, "rpc_urls": ["http://127.0.0.1:8545"], "ws_url": "ws://127.0.0.1:8545", '
            '"finality": {"depth": 12}}].')
    default_chain: str = _setting(
        "anvil", "The chain whose datasets a DAG input from block_follower means (outputs 0 blocks, "
                 "1 transactions, 2 logs).")
    chain_follow: bool = _setting(True, "Whether `trace up` and `trace worker` start a chain follower process.")
    chain_poll_interval: float = _setting(
        0.25, "Seconds between the follower's eth_blockNumber polls (the safety net under newHeads).")
    chain_lease_ttl: float = _setting(
        6.0, "Seconds a follower's lease on a chain lasts unless renewed; another follower takes over after it.")
    chain_catchup_batch: int = _setting(
        100, "Most blocks fetched in one batched request and committed in one transaction while catching up.")
    chain_prune_grace: float = _setting(
        120.0, "Seconds after a chunk turns cold before its hot rows are deleted; longer than any query "
               "(TRACE_QUERY_TIMEOUT), so a query pinned before the compaction still reads them.")
    chain_check_interval: float = _setting(
        10.0, "Seconds between a follower's completeness checks (gaps are filled, broken links re-read).")
    beat_poll_interval: float = _setting(0.5, "Seconds between the beat's checks of the schedule rows.")
    trigger_sweep_interval: float = _setting(
        2.0, "Seconds between the beat's sweeps of data, refresh, idle and composite triggers: batches and "
             "timeouts that fall due, and whatever a lost worker hook did not fire.")
    trigger_lookback: float = _setting(
        86_400.0, "Oldest dataset update (seconds ago) a data or refresh trigger still consumes.")
    http_ingest_allowlist: tuple[str, ...] = _setting(
        (), "Comma-separated URL prefixes (https://api.example.com/v1/) and host patterns (api.example.com, "
            "*.example.com: https only) the http_ingest operator may fetch; empty: none. An internal address "
            "(loopback, private, link-local, metadata) only when the matching entry names that host itself.")
    http_ingest_max_bytes: int = _setting(16 << 20, "Largest answer body http_ingest reads; past it the attempt fails.")
    http_ingest_timeout: float = _setting(
        30.0, "Seconds one http_ingest fetch may take in all (DNS, connect, redirects, headers, body).")

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: Any) -> Settings:
        """Read ``TRACE_*`` variables; a malformed value names its variable."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for spec in fields(cls):
            variable = f"TRACE_{spec.name.upper()}"
            if variable in env:
                parser = _PARSERS[spec.type]
                try:
                    values[spec.name] = parser(env[variable])
                except ValueError as exc:
                    raise ValueError(f"{variable}: {exc}") from None
        values.update(overrides)
        return cls(**values)

    @property
    def home_path(self) -> Path:
        return Path(self.home).expanduser().resolve()

    @property
    def broker_visibility_timeout(self) -> int:
        """Redis redelivers an unacked message after this; it must outlast every job."""
        return int(self.max_job_timeout + self.lease_ttl + 60)

    @property
    def resolved_api_url(self) -> str:
        return self.api_url or f"http://{self.host}:{self.port}"

    @classmethod
    def describe(cls) -> list[tuple[str, str, str, str]]:
        """(variable, type, default, doc) for each setting, for docs and `trace settings`."""
        return [(f"TRACE_{spec.name.upper()}", str(spec.type), repr(spec.default), spec.metadata["doc"])
                for spec in fields(cls)]


# Where a Flask app holds its settings (app.config); read only by current_settings().
SETTINGS_KEY = "TRACE_SETTINGS"

_current: Settings | None = None


def current_settings(app: Flask | None = None) -> Settings:
    """The settings in force: ``app``'s, else the current Flask app's, else the process's.

    Per app rather than per process because one process may hold several apps (the tests'
    per-test apps, each with its own home and timings).
    """
    # No app context can exist before Flask is loaded, and the CLI's client commands never load it.
    flask = sys.modules.get("flask")
    if app is None and flask is not None and flask.has_app_context():
        app = flask.current_app
    if app is not None:
        settings: Settings = app.config[SETTINGS_KEY]
        return settings
    global _current
    if _current is None:
        _current = Settings.from_env()
    return _current


def configure(settings: Settings) -> Settings:
    """Replace the process's settings (tests, CLI flags)."""
    global _current
    _current = settings
    return settings
