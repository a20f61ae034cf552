"""The Fargate backend against moto's server (ECS, EC2, CloudWatch Logs, S3 on 127.0.0.1).

A fake is allowed only for what cannot run here: AWS itself. moto records tasks but runs
nothing: no container starts, no log line is written by a container. So these tests assert on
what moto recorded (the registered task definition, the run_task call's network configuration
and overrides, the stop_task calls) and stand in for the container where one would act:
``logs.put_log_events`` writes the lines the wrapper would print, and moto's own state-manager
API (``/moto-api/state-manager/set-transition``) holds a task RUNNING or lets it reach STOPPED
(with exitCode 0, as moto reports it). Two answers moto cannot produce at all (a container
killed with ``OutOfMemoryError``, a task that ``TaskFailedToStart``) are written into moto's real
``describe_tasks`` answer by a botocore ``after-call`` hook on that one operation; every other
call goes to moto unchanged.

The container's command itself (the bundle stager, then the real wrapper) does run here, as a
subprocess: it fetches the bundle that the backend staged in moto's S3 by its presigned URL.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
import requests

from tracecore.dags.spec import Limits
from tracecore.exceptions import PlatformError
from tracecore.settings import Settings
from workers.sandbox import REDACTED, Invocation, Outcome
from workers.sandbox.fargate import (
    CONTAINER,
    CONTENT_TAG,
    STAGER,
    UNWRITABLE_RESULT_FILE,
    FargateBackend,
    fargate_size,
    split_result,
    task_definition_template,
)
from workers.sandbox.outcome import RESULT_MARKER, decide

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[4]
REGION = "us-east-1"
ACCOUNT = "123456789012"
TOKEN = "cap-token-fargate-0123456789abcdef"
PLATFORM_SECRET = "postgresql://trace:hunter2-db-password@db/trace"
IMAGE_PREFIX = f"{ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com/trace"
EXECUTION_ROLE = f"arn:aws:iam::{ACCOUNT}:role/trace-sandbox-execution"
GATEWAY = "https://trace.example.test"
BUCKET = "trace-bundles"
ALLOWED_ENV = {"TRACE_CAPABILITY_TOKEN", "TRACE_RUNTIME", "_HANDLER", "TRACE_EVENT", "TRACE_TIMEOUT_S",
               "TRACE_FUNCTION_NAME", "TRACE_MEMORY_MB", "TRACE_GATEWAY", "TRACE_RESULT_FILE", "TRACE_TASK_ROOT",
               "TRACE_BUNDLE_URL", "TRACE_BUNDLE_SHA256"}


@pytest.fixture(scope="module")
def aws() -> Iterator[dict[str, Any]]:
    """moto's server on a free loopback port, dummy credentials, and the network an operator would make."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one access-log line per AWS call otherwise
    with pytest.MonkeyPatch.context() as patch:
        for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                            "AWS_SESSION_TOKEN": "testing", "AWS_DEFAULT_REGION": REGION,
                            "AWS_CONFIG_FILE": "/nonexistent/aws-config",
                            "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials"}.items():
            patch.setenv(name, value)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        client = lambda name: boto3.client(name, region_name=REGION, endpoint_url=endpoint)  # noqa: E731
        ec2 = client("ec2")
        vpc = ec2.create_vpc(CidrBlock="10.42.0.0/16")["Vpc"]["VpcId"]
        # Interface endpoints with private DNS (ECR, Logs, the API) need DNS hostnames in the VPC.
        ec2.modify_vpc_attribute(VpcId=vpc, EnableDnsSupport={"Value": True})
        ec2.modify_vpc_attribute(VpcId=vpc, EnableDnsHostnames={"Value": True})
        subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.42.1.0/24")["Subnet"]["SubnetId"]
        group = ec2.create_security_group(GroupName="trace-sandbox", Description="no egress but VPC endpoints",
                                          VpcId=vpc)["GroupId"]
        # What the operator does: drop the default allow-all egress (endpoint rules would be added here).
        ec2.revoke_security_group_egress(GroupId=group, IpPermissions=[
            {"IpProtocol": "-1", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}])
        client("ecs").create_cluster(clusterName="trace")
        client("s3").create_bucket(Bucket=BUCKET)
        try:
            yield {"endpoint": endpoint, "client": client, "subnet": subnet, "group": group}
        finally:
            server.stop()


@pytest.fixture
def settings(aws: dict[str, Any]) -> Settings:
    return Settings(sandbox="fargate", fargate_region=REGION, fargate_endpoint_url=aws["endpoint"],
                    fargate_subnets=(aws["subnet"],), fargate_security_groups=(aws["group"],),
                    fargate_image_prefix=IMAGE_PREFIX, fargate_image_tag="2024.1",
                    fargate_execution_role_arn=EXECUTION_ROLE, fargate_bundle_bucket=BUCKET,
                    fargate_gateway_url=GATEWAY, fargate_start_timeout=30.0)


@pytest.fixture
def backend(settings: Settings) -> FargateBackend:
    return FargateBackend.from_settings(settings, poll_interval_s=0.05, log_wait_s=2.0)


@pytest.fixture
def transitions(aws: dict[str, Any]) -> Iterator[Callable[[dict[str, Any]], None]]:
    """Steer moto's task lifecycle through its state-manager API; back to moto's default afterwards."""
    def set_transition(transition: dict[str, Any]) -> None:
        answer = requests.post(f"{aws['endpoint']}/moto-api/state-manager/set-transition",
                               json={"model_name": "ecs::task", "transition": transition}, timeout=10)
        assert answer.status_code == 201, answer.text

    yield set_transition
    requests.post(f"{aws['endpoint']}/moto-api/state-manager/unset-transition",
                  json={"model_name": "ecs::task"}, timeout=10)


HOLD = {"progression": "manual", "times": 10**9}  # every describe_tasks answers RUNNING
RELEASE = {"progression": "immediate"}  # the next describe_tasks answers STOPPED


def make_invocation(tmp_path: Path, **limits: Any) -> Invocation:
    bundle = tmp_path / "bundle"
    bundle.mkdir(exist_ok=True)
    (bundle / "trace.py").write_text("def handler(event, context):\n    return {'rows': [event['task']['id']]}\n")
    return Invocation(bundle_dir=bundle, runtime="python3.11", handler="trace.handler",
                      event={"task": {"id": "t-7"}, "config": {"n": 1}}, work_dir=tmp_path / "work",
                      limits=Limits(**limits), env={"TRACE_CAPABILITY_TOKEN": TOKEN},
                      labels={"org.trace.task": "t-7"}, secrets=(TOKEN, PLATFORM_SECRET))


def moto_task(aws: dict[str, Any], task_arn: str) -> Any:
    """moto's own record of a task (in this process: ThreadedMotoServer shares moto's backends)."""
    from moto.ecs.models import ecs_backends

    return ecs_backends[ACCOUNT][REGION].tasks["trace"][task_arn]


def new_task(aws: dict[str, Any], before: set[str], timeout: float = 10.0) -> str:
    ecs = aws["client"]("ecs")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        fresh = set(ecs.list_tasks(cluster="trace")["taskArns"]) - before
        if fresh:
            assert len(fresh) == 1
            return fresh.pop()
        time.sleep(0.02)
    raise AssertionError("the backend started no task")


def all_tasks(aws: dict[str, Any]) -> set[str]:
    return set(aws["client"]("ecs").list_tasks(cluster="trace")["taskArns"])


def run_in_thread(backend: FargateBackend, invocation: Invocation) -> tuple[threading.Thread, dict[str, Outcome]]:
    box: dict[str, Outcome] = {}
    thread = threading.Thread(target=lambda: box.update(outcome=backend.run(invocation)), daemon=True)
    thread.start()
    return thread, box


def put_container_logs(aws: dict[str, Any], backend: FargateBackend, task_arn: str, lines: list[str]) -> None:
    """Stand in for the container: what awslogs would ship from its stdout/stderr."""
    logs = aws["client"]("logs")
    stream = backend.log_stream(task_arn)
    logs.create_log_stream(logGroupName=backend.log_group, logStreamName=stream)
    now = int(time.time() * 1000)
    logs.put_log_events(logGroupName=backend.log_group, logStreamName=stream,
                        logEvents=[{"timestamp": now + index, "message": line} for index, line in enumerate(lines)])


def result_line(**fields: Any) -> str:
    document = {"status": "ok", "response": None, "error": None, "duration_ms": 12.5, "exit_code": 0, **fields}
    return json.dumps(document)


# ------------------------------------------------------------------------------------------------


def test_sizes_map_limits_to_the_smallest_fargate_task() -> None:
    assert fargate_size(Limits()) == ("256", "512")
    assert fargate_size(Limits(cpu=0.25, memory_mb=128)) == ("256", "512")
    assert fargate_size(Limits(cpu=0.5, memory_mb=3000)) == ("512", "3072")
    assert fargate_size(Limits(cpu=1, memory_mb=512)) == ("1024", "2048")
    assert fargate_size(Limits(cpu=0.25, memory_mb=4096)) == ("512", "4096")
    with pytest.raises(PlatformError):
        fargate_size(Limits(cpu=64, memory_mb=512))


def test_from_settings_names_what_is_missing() -> None:
    with pytest.raises(PlatformError, match=r"TRACE_FARGATE_SUBNETS.*TRACE_FARGATE_GATEWAY_URL"):
        FargateBackend.from_settings(Settings(sandbox="fargate", fargate_security_groups=("sg-1",),
                                              fargate_image_prefix="x", fargate_execution_role_arn="y",
                                              fargate_bundle_bucket="z"))


def test_the_deploy_template_is_what_the_backend_registers() -> None:
    path = ROOT / "deploy" / "ecs" / "task-definition.json"
    assert path.read_text() == task_definition_template(), (
        "regenerate it: python -m workers.sandbox.fargate > deploy/ecs/task-definition.json")


def test_task_definition_is_locked_down_and_registered_once(aws: dict[str, Any], settings: Settings,
                                                             backend: FargateBackend) -> None:
    ecs = aws["client"]("ecs")
    arn = backend.ensure_task_definition("python3.11", Limits())
    described = ecs.describe_task_definition(taskDefinition=arn, include=["TAGS"])
    definition = described["taskDefinition"]
    assert definition["requiresCompatibilities"] == ["FARGATE"]
    assert definition["networkMode"] == "awsvpc"
    assert (definition["cpu"], definition["memory"]) == ("256", "512")
    assert definition["executionRoleArn"] == EXECUTION_ROLE
    assert "taskRoleArn" not in definition  # no AWS credentials inside the sandbox
    [container] = definition["containerDefinitions"]
    assert container["name"] == CONTAINER
    assert container["readonlyRootFilesystem"] is True
    assert container["user"] == "10001"
    assert not container.get("privileged", False)
    assert container["linuxParameters"]["initProcessEnabled"] is True
    assert container["linuxParameters"]["capabilities"]["drop"] == ["ALL"]
    assert container["image"] == f"{IMAGE_PREFIX}/trace-runtime-python:2024.1"
    assert container["memory"] == 512
    assert {"name": "nproc", "softLimit": 128, "hardLimit": 128} in container["ulimits"]
    assert container["logConfiguration"] == {"logDriver": "awslogs", "options": {
        "awslogs-group": "/trace/udf", "awslogs-region": REGION, "awslogs-stream-prefix": "trace"}}
    assert {"name": "TRACE_RESULT_FILE", "value": UNWRITABLE_RESULT_FILE} in container["environment"]
    assert container["command"][:3] == ["/usr/bin/python3", "-I", "-c"]
    tags = {tag["key"]: tag["value"] for tag in described["tags"]}
    assert len(tags[CONTENT_TAG]) == 64
    assert aws["client"]("logs").describe_log_groups(logGroupNamePrefix="/trace/udf")["logGroups"]

    # Idempotent, also for a new worker with an empty cache: found again by its content tag.
    again = FargateBackend.from_settings(settings).ensure_task_definition("python3.11", Limits())
    assert again == arn
    assert len(ecs.list_task_definitions(familyPrefix="trace-udf")["taskDefinitionArns"]) == 1
    # Other content (node image, more memory): a new revision of the same family.
    node = backend.ensure_task_definition("nodejs", Limits(memory_mb=1024))
    node_definition = ecs.describe_task_definition(taskDefinition=node)["taskDefinition"]
    assert node != arn and node_definition["family"] == "trace-udf"
    assert node_definition["containerDefinitions"][0]["image"] == f"{IMAGE_PREFIX}/trace-runtime-node:2024.1"
    assert (node_definition["cpu"], node_definition["memory"]) == ("256", "1024")


def test_ok_outcome_read_from_cloudwatch(aws: dict[str, Any], backend: FargateBackend, tmp_path: Path,
                                         transitions: Callable[[dict[str, Any]], None]) -> None:
    transitions(HOLD)
    invocation = make_invocation(tmp_path)
    before = all_tasks(aws)
    thread, box = run_in_thread(backend, invocation)
    task_arn = new_task(aws, before)

    # What moto recorded of run_task.
    recorded = moto_task(aws, task_arn)
    assert recorded.launch_type == "FARGATE"
    assert recorded.started_by == backend.started_by and recorded.started_by.endswith(f"--{os.getpid()}")
    assert recorded.network_configuration == {"awsvpcConfiguration": {
        "subnets": [aws["subnet"]], "securityGroups": [aws["group"]], "assignPublicIp": "DISABLED"}}
    eni = recorded.attachments[0]["details"]
    eni_id = next(item["value"] for item in eni if item["name"] == "networkInterfaceId")
    [interface] = aws["client"]("ec2").describe_network_interfaces(NetworkInterfaceIds=[eni_id])["NetworkInterfaces"]
    assert interface["SubnetId"] == aws["subnet"]
    assert [group["GroupId"] for group in interface["Groups"]] == [aws["group"]]
    assert "Association" not in interface  # no public IP
    described = aws["client"]("ecs").describe_tasks(cluster="trace", tasks=[task_arn], include=["TAGS"])["tasks"][0]
    assert {"key": "org.trace.task", "value": "t-7"} in described["tags"]
    [override] = described["overrides"]["containerOverrides"]
    assert override["name"] == CONTAINER
    env = {item["name"]: item["value"] for item in override["environment"]}
    assert set(env) == ALLOWED_ENV
    assert env["TRACE_CAPABILITY_TOKEN"] == TOKEN
    assert json.loads(env["TRACE_EVENT"]) == invocation.event
    assert env["TRACE_GATEWAY"] == GATEWAY
    assert env["TRACE_RESULT_FILE"] == UNWRITABLE_RESULT_FILE
    assert PLATFORM_SECRET not in json.dumps(described["overrides"])  # nothing secret but the token
    # The bundle was staged in S3 under its hash.
    staged = aws["client"]("s3").get_object(Bucket=BUCKET, Key=f"fargate-bundles/{env['TRACE_BUNDLE_SHA256']}.zip")
    assert staged["ContentLength"] > 0

    put_container_logs(aws, backend, task_arn, [
        "[trace-runtime] cannot write the result file (read-only file system); printing it to stdout",
        f"the UDF printed its token {TOKEN}",
        RESULT_MARKER,
        result_line(response={"rows": ["t-7"]}),
    ])
    transitions(RELEASE)
    thread.join(timeout=20)
    outcome = box["outcome"]
    assert outcome.exit_reason == "ok", outcome
    assert outcome.response == {"rows": ["t-7"]}
    assert outcome.exit_code == 0
    assert TOKEN not in outcome.logs and f"the UDF printed its token {REDACTED}" in outcome.logs
    assert RESULT_MARKER not in outcome.logs and '"status"' not in outcome.logs


def test_a_handler_error_printed_by_the_wrapper_is_an_error_outcome(
        aws: dict[str, Any], backend: FargateBackend, tmp_path: Path,
        transitions: Callable[[dict[str, Any]], None]) -> None:
    transitions(HOLD)
    before = all_tasks(aws)
    thread, box = run_in_thread(backend, make_invocation(tmp_path))
    task_arn = new_task(aws, before)
    error = {"errorType": "ValueError", "errorMessage": f"bad row, token {TOKEN}", "stackTrace": ["  File x"]}
    put_container_logs(aws, backend, task_arn, [
        RESULT_MARKER, "a fake marker printed by the UDF is not the last one",
        RESULT_MARKER, result_line(status="error", error=error, exit_code=1)])
    transitions(RELEASE)
    thread.join(timeout=20)
    outcome = box["outcome"]
    assert outcome.exit_reason == "error", outcome
    assert outcome.error_type == "ValueError" and outcome.error_message == f"bad row, token {REDACTED}"


def test_timeout_stops_the_task(aws: dict[str, Any], backend: FargateBackend, tmp_path: Path,
                                transitions: Callable[[dict[str, Any]], None]) -> None:
    transitions(HOLD)  # the task runs forever
    calls: list[tuple[str, dict[str, Any]]] = []  # every AWS call the backend makes, in order
    statuses: list[str] = []  # the task's lastStatus in each describe_tasks answer it read

    def record(model: Any, params: dict[str, Any], **_: Any) -> None:
        calls.append((model.name, params))

    def status(parsed: dict[str, Any], **_: Any) -> None:
        statuses.extend(str(task.get("lastStatus")) for task in parsed.get("tasks") or [])

    for client in (backend.ecs, backend.logs):
        client.meta.events.register("before-parameter-build", record)
    backend.ecs.meta.events.register("after-call.ecs.DescribeTasks", status)
    before = all_tasks(aws)
    try:
        outcome = backend.run(make_invocation(tmp_path, timeout_s=0.5))
    finally:
        for client in (backend.ecs, backend.logs):
            client.meta.events.unregister("before-parameter-build", record)
        backend.ecs.meta.events.unregister("after-call.ecs.DescribeTasks", status)
    assert outcome.exit_reason == "timeout", outcome
    assert outcome.error_message == "no answer within 0.5 s", outcome
    # One stop, for the run deadline (not the 30 s start timeout), of a task seen RUNNING; the answer
    # came when the task was STOPPED (not after giving up waiting for that).
    assert [params["reason"] for name, params in calls if name == "StopTask"] == [
        "trace: timeout (0.5 s run, 30 s start)"]
    assert "RUNNING" in statuses and statuses[-1] == "STOPPED", statuses
    # Our own stop: no result line can come, so the logs are read once, without waiting for one.
    assert [name for name, _ in calls if name == "GetLogEvents"] == ["GetLogEvents"], calls
    task_arn = new_task(aws, before)
    recorded = moto_task(aws, task_arn)
    assert recorded.desired_status == "STOPPED"  # moto recorded our stop_task
    assert recorded.stopped_reason.startswith("trace: timeout")


@pytest.fixture
def describe_answer(backend: FargateBackend) -> Iterator[Callable[[dict[str, Any]], None]]:
    """Patch moto's real describe_tasks answer for a STOPPED task with what only AWS produces."""
    patches: dict[str, Any] = {}

    def patch_answer(parsed: dict[str, Any], **_: Any) -> None:
        for task in parsed.get("tasks") or []:
            if task.get("lastStatus") == "STOPPED" and patches:
                task.update(patches.get("task", {}))
                for container in task.get("containers") or []:
                    container.update(patches.get("container", {}))
                    for key in patches.get("drop", ()):
                        container.pop(key, None)

    backend.ecs.meta.events.register("after-call.ecs.DescribeTasks", patch_answer)
    yield patches.update
    backend.ecs.meta.events.unregister("after-call.ecs.DescribeTasks", patch_answer)


def test_out_of_memory_stop_reason_is_oom(aws: dict[str, Any], backend: FargateBackend, tmp_path: Path,
                                          describe_answer: Callable[[dict[str, Any]], None]) -> None:
    describe_answer({"task": {"stopCode": "EssentialContainerExited",
                              "stoppedReason": "Essential container in task exited"},
                     "container": {"exitCode": 137,
                                   "reason": "OutOfMemoryError: Container killed due to memory usage"}})
    # moto's default lifecycle: the task reaches STOPPED after a few describe_tasks.
    outcome = backend.run(make_invocation(tmp_path, memory_mb=256))
    assert outcome.exit_reason == "oom", outcome
    assert outcome.error_type == "OutOfMemory" and "256 MB" in (outcome.error_message or "")
    assert outcome.exit_code == 137


def test_task_failed_to_start_is_a_sandbox_error(aws: dict[str, Any], backend: FargateBackend, tmp_path: Path,
                                                 describe_answer: Callable[[dict[str, Any]], None]) -> None:
    describe_answer({"task": {"stopCode": "TaskFailedToStart",
                              "stoppedReason": "CannotPullContainerError: pull image manifest has been retried"},
                     "drop": ("exitCode",)})
    outcome = backend.run(make_invocation(tmp_path))
    assert outcome.exit_reason == "sandbox_error", outcome
    assert outcome.error_type == "TaskFailedToStart" and "CannotPullContainerError" in (outcome.error_message or "")


def test_an_event_too_large_for_overrides_starts_nothing(aws: dict[str, Any], backend: FargateBackend,
                                                         tmp_path: Path) -> None:
    before = all_tasks(aws)
    invocation = make_invocation(tmp_path)
    invocation.event = {"blob": "x" * 9000}
    outcome = backend.run(invocation)
    assert outcome.exit_reason == "sandbox_error" and outcome.error_type == "EventTooLarge"
    assert all_tasks(aws) == before


def test_reap_orphans_stops_tasks_of_dead_workers(aws: dict[str, Any], backend: FargateBackend,
                                                  transitions: Callable[[dict[str, Any]], None]) -> None:
    transitions(HOLD)
    ecs = aws["client"]("ecs")
    definition = backend.ensure_task_definition("python3.11", Limits())
    dead = subprocess.Popen(["true"])
    dead.wait()
    host = backend.started_by.rpartition("--")[0]
    network = {"awsvpcConfiguration": {"subnets": [aws["subnet"]], "securityGroups": [aws["group"]],
                                       "assignPublicIp": "DISABLED"}}
    started = {}
    for name, started_by in (("orphan", f"{host}--{dead.pid}"), ("live", backend.started_by),
                             ("foreign", "someone-else")):
        answer = ecs.run_task(cluster="trace", taskDefinition=definition, launchType="FARGATE",
                              startedBy=started_by, networkConfiguration=network)
        started[name] = answer["tasks"][0]["taskArn"]
    assert backend.reap_orphans() == 1
    assert moto_task(aws, started["orphan"]).desired_status == "STOPPED"
    assert moto_task(aws, started["orphan"]).stopped_reason == "trace: orphan sandbox (its worker is gone)"
    assert moto_task(aws, started["live"]).desired_status == "RUNNING"
    assert moto_task(aws, started["foreign"]).desired_status == "RUNNING"
    for arn in (started["live"], started["foreign"]):
        ecs.stop_task(cluster="trace", task=arn, reason="test cleanup")


def test_split_result_takes_the_last_marker_and_joins_split_lines() -> None:
    document = result_line(response={"rows": list(range(3))})
    result, rest = split_result(["a", RESULT_MARKER, "{not json", "b", RESULT_MARKER, document[:10], document[10:]])
    assert result == json.loads(document)
    assert rest == ["a", RESULT_MARKER, "{not json", "b"]
    assert split_result(["no marker"]) == (None, ["no marker"])


def _run_stager(env: dict[str, str], task_root: Path) -> subprocess.CompletedProcess[str]:
    # Here the task root is a temp folder, not the container's /tmp/task; the rest is the overrides' env.
    return subprocess.run([sys.executable, "-I", "-c", STAGER], env={
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env, "TRACE_TASK_ROOT": str(task_root),
        "TRACE_RUNTIME_BOOTSTRAP": str(ROOT / "workers" / "runtime" / "bootstrap.py")},
        capture_output=True, text=True, timeout=60)


def test_the_container_command_fetches_the_staged_bundle_and_prints_the_result(
        aws: dict[str, Any], backend: FargateBackend, tmp_path: Path) -> None:
    """The stager and the real wrapper, run here with the overrides the backend built: the bundle comes
    from moto's S3 by the presigned URL, and the result reaches stdout after the marker."""
    invocation = make_invocation(tmp_path)
    url, sha256 = backend.stage_bundle(invocation.bundle_dir)
    overrides = backend.overrides(invocation, url, sha256)
    env = {item["name"]: item["value"] for item in overrides["containerOverrides"][0]["environment"]}
    done = _run_stager(env, tmp_path / "task")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "task" / "trace.py").is_file()
    result, rest = split_result(done.stdout.splitlines())
    outcome = decide(invocation, result, exit_code=done.returncode, oom=False, killed_from_outside=False,
                     logs_text="\n".join(rest), logs_truncated=False, duration_ms=1.0)
    assert outcome.exit_reason == "ok", (outcome, done.stderr)
    assert outcome.response == {"rows": ["t-7"]}

    # A bundle changed in the bucket after staging is refused before anything runs.
    aws["client"]("s3").put_object(Bucket=BUCKET, Key=f"fargate-bundles/{sha256}.zip", Body=b"PK tampered")
    done = _run_stager(env, tmp_path / "task2")
    result, _ = split_result(done.stdout.splitlines())
    assert done.returncode == 1 and isinstance(result, dict)
    assert result["status"] == "init_error" and "SHA-256" in result["error"]["errorMessage"]
    assert not (tmp_path / "task2" / "trace.py").exists()
    aws["client"]("s3").delete_object(Bucket=BUCKET, Key=f"fargate-bundles/{sha256}.zip")
