"""The Docker sandbox against hostile bundles and real Lambda runtime clients.

Every test drives ``DockerBackend().run(Invocation(...))`` directly (no database): it writes a
bundle folder under ``tmp_path`` (files 0o644, dirs 0o755, so uid 10001 can read them), runs
it, and asserts both the recorded :class:`Outcome` and that the host is unaffected: the
invocation's container is gone afterwards (found by a per-test label), nothing reached a
host listener, the host can still spawn processes, the worker can run the next invocation.

Real clients: awslambdaric vendored with ``pip install --target`` (runtime ``provided``), the
built-in Node loop (async and callback handlers), and two ``provided`` bootstraps that speak
raw HTTP/1.1 to the Runtime API: a std-only Rust program built here with cargo, and bash over
``/dev/tcp``. Builds are cached under /tmp for the session (keyed by version / source hash).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import select
import shutil
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any

import docker
import pytest

from tracecore.dags.spec import Limits
from workers.sandbox import LOG_CAP_BYTES, REDACTED, Invocation, Outcome
from workers.sandbox.docker import LABEL, DockerBackend

pytestmark = pytest.mark.slow

FIXTURES = Path(__file__).resolve().parents[3] / "fixtures" / "bundles"
CACHE = Path("/tmp/trace-test-cache")
AWSLAMBDARIC_VERSION = "4.2.2"
TEST_LABEL = "org.trace.test"
FAST = Limits(timeout_s=5.0)
_HOME_CARGO = Path.home() / ".cargo" / "bin" / "cargo"
CARGO = shutil.which("cargo") or (str(_HOME_CARGO) if os.access(_HOME_CARGO, os.X_OK) else None)
RUST_ID = "rust-cargo" if CARGO else "rust-no-cargo-bash-fallback"


# --- helpers ------------------------------------------------------------------------------------------------


def write_bundle(root: Path, files: dict[str, str], executable: tuple[str, ...] = ()) -> Path:
    """A bundle folder: each file 0o644 (0o755 if listed in ``executable``), each dir 0o755."""
    root.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(content).lstrip("\n"))
    normalize_modes(root, executable)
    return root


def normalize_modes(root: Path, executable: tuple[str, ...] = ()) -> None:
    """0o755 dirs, 0o644 files (0o755 for executables and files that are already executable)."""
    os.chmod(root, 0o755)
    for path in root.rglob("*"):
        if path.is_symlink():
            continue
        if path.is_dir():
            os.chmod(path, 0o755)
        else:
            runnable = path.relative_to(root).as_posix() in executable or os.access(path, os.X_OK)
            os.chmod(path, 0o755 if runnable else 0o644)


class Sandbox:
    """Runs invocations with a unique label and checks that their containers are gone."""

    def __init__(self, backend: DockerBackend, tmp_path: Path) -> None:
        self.backend = backend
        self.tmp_path = tmp_path
        self.labels: list[str] = []

    def run(self, bundle: Path, *, runtime: str = "python3.11", handler: str = "trace.handler",
            event: dict[str, Any] | None = None, limits: Limits = FAST, env: dict[str, str] | None = None,
            secrets: tuple[str, ...] = ()) -> tuple[Outcome, float]:
        """Run once; answers the outcome and the wall time of ``run()``, after checking the container is gone."""
        label = str(uuid.uuid4())
        self.labels.append(label)
        invocation = Invocation(bundle_dir=bundle, runtime=runtime, handler=handler, event=event or {},
                                work_dir=self.tmp_path / f"work-{label}", limits=limits, env=env or {},
                                labels={TEST_LABEL: label}, secrets=secrets)
        started = time.monotonic()
        outcome = self.backend.run(invocation)
        wall = time.monotonic() - started
        self.assert_gone(label)
        return outcome, wall

    def assert_gone(self, label: str) -> None:
        # run() answers before its container is removed (in the background): wait for that removal.
        assert self.backend.drain(timeout=30), "a background removal is still running after 30 s"
        client = self.backend.client
        left = [c.name for c in client.containers.list(all=True, filters={"label": LABEL})
                if c.labels.get(TEST_LABEL) == label]
        assert left == [], f"sandbox containers left behind: {left}"
        assert client.containers.list(all=True, filters={"label": f"{TEST_LABEL}={label}"}) == []


def assert_ok(outcome: Outcome) -> None:
    assert outcome.exit_reason == "ok", (outcome.exit_reason, outcome.error_type, outcome.error_message,
                                         outcome.stack_trace, outcome.logs[-3000:])


def host_can_spawn() -> None:
    done = subprocess.run(["/bin/sh", "-c", "echo alive"], capture_output=True, text=True, timeout=10, check=True)
    assert done.stdout == "alive\n"




ECHO = """
    def handler(event, context):
        print("hello from the sandbox")
        return {"echo": event, "remaining_ms": context.get_remaining_time_in_millis(),
                "request_id": context.aws_request_id}
"""


# --- hostile bundles ----------------------------------------------------------------------------------------

NETWORK = """
    import errno
    import socket


    def attempt(host, port):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.settimeout(2)
        try:
            sock.connect((host, port))
        except OSError as exc:
            name = errno.errorcode.get(exc.errno, "") if exc.errno else ""
            return {"connected": False, "type": type(exc).__name__, "errno": exc.errno, "name": name}
        finally:
            sock.close()
        return {"connected": True}


    def handler(event, context):
        results = {f"{host}:{port}": attempt(host, port) for host, port in event["targets"]}
        try:
            socket.getaddrinfo("example.com", 80)
            dns = "resolved"
        except OSError as exc:
            dns = type(exc).__name__
        with open("/proc/net/dev") as handle:
            interfaces = sorted(line.split(":")[0].strip() for line in handle.readlines()[2:])
        return {"results": results, "dns": dns, "interfaces": interfaces}
"""


def bridge_gateway(client: docker.DockerClient) -> str | None:
    try:
        configs = client.networks.get("bridge").attrs.get("IPAM", {}).get("Config") or []
    except docker.errors.NotFound:
        return None
    return next((c["Gateway"] for c in configs if c.get("Gateway")), None)


def test_connections_out_fail(sandbox: Sandbox, tmp_path: Path) -> None:
    """TEST-NET-1, a host loopback listener and the bridge gateway on that port: every connect fails."""
    listeners = [socket.create_server(("127.0.0.1", 0))]
    port = listeners[0].getsockname()[1]
    gateway = bridge_gateway(sandbox.backend.client)
    if gateway:
        try:
            listeners.append(socket.create_server((gateway, port)))
        except OSError:
            pass  # the gateway port may be taken; the attempt below still must fail
    targets = [("192.0.2.1", 80), ("127.0.0.1", port), ("127.0.0.1", 5432), ("127.0.0.1", 6379)]
    if gateway:
        targets += [(gateway, port), (gateway, 5432), (gateway, 6379)]
    try:
        bundle = write_bundle(tmp_path / "bundle", {"trace.py": NETWORK})
        outcome, _ = sandbox.run(bundle, event={"targets": targets})
        assert_ok(outcome)
        results = outcome.response["results"]
        assert set(results) == {f"{h}:{p}" for h, p in targets}
        allowed = {errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ECONNREFUSED}
        for target, result in results.items():
            assert result["connected"] is False, target
            assert result["errno"] in allowed, (target, result)
        # No interface but loopback: nothing is routed, the sandbox's 127.0.0.1 is its own.
        assert results["192.0.2.1:80"]["name"] == "ENETUNREACH"
        assert results[f"127.0.0.1:{port}"]["name"] == "ECONNREFUSED"
        if gateway:
            assert results[f"{gateway}:{port}"]["name"] == "ENETUNREACH"
        assert outcome.response["interfaces"] == ["lo"]
        assert outcome.response["dns"] == "gaierror"
        for listener in listeners:  # the host side saw nothing at all
            readable, _, _ = select.select([listener], [], [], 0)
            assert readable == [], f"the host listener {listener.getsockname()} got a connection"
            listener.setblocking(False)
            with pytest.raises(BlockingIOError):
                listener.accept()
    finally:
        for listener in listeners:
            listener.close()


FORK_COUNT = """
    import os
    import signal
    import time


    def handler(event, context):
        children, error = [], None
        try:
            while len(children) < 1000:
                pid = os.fork()
                if pid == 0:
                    try:
                        time.sleep(30)
                    finally:
                        os._exit(0)
                children.append(pid)
        except OSError as exc:  # BlockingIOError (EAGAIN) at the pids limit
            error = {"type": type(exc).__name__, "errno": exc.errno}
        for pid in children:  # free the pids so the answer can be posted
            os.kill(pid, signal.SIGKILL)
        for pid in children:
            os.waitpid(pid, 0)
        return {"forks": len(children), "error": error}
"""

FORK_BOMB = """
    import os


    def handler(event, context):
        while True:
            try:
                os.fork()
            except OSError:
                pass
"""


def test_forks_stop_at_the_pids_limit(sandbox: Sandbox, tmp_path: Path) -> None:
    """Counting forks until EAGAIN: fewer than the limit succeed (the wrapper's own threads count too)."""
    bundle = write_bundle(tmp_path / "bundle", {"trace.py": FORK_COUNT})
    outcome, _ = sandbox.run(bundle, limits=Limits(pids=32, timeout_s=5.0))
    assert_ok(outcome)
    assert outcome.response["error"] == {"type": "BlockingIOError", "errno": errno.EAGAIN}
    assert 0 < outcome.response["forks"] < 32
    host_can_spawn()


def test_fork_bomb_is_contained(sandbox: Sandbox, tmp_path: Path) -> None:
    bundle = write_bundle(tmp_path / "bundle", {"trace.py": FORK_BOMB})
    outcome, _ = sandbox.run(bundle, limits=Limits(pids=32, timeout_s=5.0))
    assert outcome.exit_reason in ("timeout", "error"), (outcome.exit_reason, outcome.error_message)
    host_can_spawn()


MEMORY_BOMB = """
    def handler(event, context):
        hog = []
        while True:
            hog.append(bytearray(16 << 20))
"""


def test_memory_bomb_ends_as_oom(sandbox: Sandbox, tmp_path: Path) -> None:
    bundle = write_bundle(tmp_path / "bundle", {"trace.py": MEMORY_BOMB})
    outcome, _ = sandbox.run(bundle, limits=Limits(memory_mb=64, timeout_s=10.0))
    assert outcome.exit_reason == "oom", (outcome.exit_reason, outcome.error_message, outcome.logs[-2000:])
    assert outcome.error_type == "OutOfMemory"
    assert "64 MB" in (outcome.error_message or "")
    host_can_spawn()


READ_ONLY = """
    import os


    def attempt(path):
        try:
            with open(path, "w") as handle:
                handle.write("written")
        except OSError as exc:
            return {"ok": False, "type": type(exc).__name__, "errno": exc.errno, "strerror": exc.strerror}
        with open(path) as handle:
            return {"ok": True, "content": handle.read()}


    def handler(event, context):
        return {path: attempt(path) for path in event["paths"]}
"""


def test_root_is_read_only_and_tmp_is_writable(sandbox: Sandbox, tmp_path: Path) -> None:
    bundle = write_bundle(tmp_path / "bundle", {"trace.py": READ_ONLY})
    paths = ["/evil", "/etc/evil", "/var/task/evil", "/tmp/fine"]
    outcome, _ = sandbox.run(bundle, event={"paths": paths})
    assert_ok(outcome)
    results = outcome.response
    for path in ("/evil", "/etc/evil", "/var/task/evil"):
        assert results[path]["ok"] is False, path
        assert results[path]["type"] in ("OSError", "PermissionError"), results[path]
    assert results["/evil"]["errno"] == errno.EROFS
    assert results["/evil"]["strerror"] == "Read-only file system"
    assert results["/var/task/evil"]["errno"] == errno.EROFS  # the bundle is mounted read-only
    assert results["/tmp/fine"] == {"ok": True, "content": "written"}
    assert not (bundle / "evil").exists()


INFINITE_LOOP = """
    def handler(event, context):
        while True:
            pass
"""

STUBBORN_LOOP = """
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)


    def handler(event, context):
        while True:
            pass
"""


# A handler that ignores SIGTERM is ended by the wrapper's SIGKILL after its grace (bootstrap.terminate).
@pytest.mark.parametrize("source", [INFINITE_LOOP, STUBBORN_LOOP], ids=["loop", "loop-ignoring-sigterm"])
def test_infinite_loop_ends_as_timeout(sandbox: Sandbox, tmp_path: Path, source: str) -> None:
    bundle = write_bundle(tmp_path / "bundle", {"trace.py": source})
    outcome, _ = sandbox.run(bundle, limits=Limits(timeout_s=3.0))
    # The deadline's own verdict (not the CPU limit's, not an OOM kill), and run() returned: the
    # container is gone (checked by run()).
    assert outcome.exit_reason == "timeout", (outcome.exit_reason, outcome.error_message, outcome.logs[-2000:])
    assert outcome.error_message == "no answer within 3 s"


FLOOD = """
    import sys


    def handler(event, context):
        block = (b"y" * 1023 + b"\\n") * 1024  # 1 MiB
        for _ in range(event["mib"]):
            sys.stdout.buffer.write(block)
        sys.stdout.buffer.flush()
        return {"written": event["mib"] << 20}
"""


def test_stdout_flood_is_truncated_and_the_worker_stays_healthy(sandbox: Sandbox, tmp_path: Path) -> None:
    bundle = write_bundle(tmp_path / "bundle", {"trace.py": FLOOD})
    outcome, _ = sandbox.run(bundle, event={"mib": 100}, limits=Limits(timeout_s=30.0))
    assert_ok(outcome)
    assert outcome.response == {"written": 100 << 20}
    assert outcome.logs_truncated is True
    assert "output truncated by Trace" in outcome.logs
    assert LOG_CAP_BYTES <= len(outcome.logs.encode()) <= LOG_CAP_BYTES + 200
    dropped = int(outcome.logs.rsplit("output truncated by Trace: ", 1)[1].split(" ")[0])
    assert dropped >= (100 << 20) - LOG_CAP_BYTES
    # The same worker runs the next invocation normally.
    echo = write_bundle(tmp_path / "echo", {"trace.py": ECHO})
    again, _ = sandbox.run(echo, event={"n": 1})
    assert_ok(again)
    assert again.response["echo"] == {"n": 1}
    assert again.logs == "hello from the sandbox\n"
    assert again.logs_truncated is False


ENVIRON = """
    import os


    def read(path):
        try:
            with open(path, "rb") as handle:
                return handle.read().decode("utf-8", "replace")
        except OSError as exc:
            return f"{type(exc).__name__}: {exc}"


    def handler(event, context):
        return {"pid1": read("/proc/1/environ"), "self": read("/proc/self/environ"),
                "parent": read(f"/proc/{os.getppid()}/environ"), "os_environ": dict(os.environ)}
"""


def test_proc_environ_holds_no_platform_secret(sandbox: Sandbox, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    secret_key = f"host-secret-{uuid.uuid4().hex}"
    db_password = uuid.uuid4().hex
    monkeypatch.setenv("TRACE_SECRET_KEY", secret_key)
    monkeypatch.setenv("TRACE_DATABASE_URL", f"postgresql://trace:{db_password}@db.internal:5432/trace")
    token = f"tok.{uuid.uuid4().hex}.{uuid.uuid4().hex}"
    bundle = write_bundle(tmp_path / "bundle", {"trace.py": ENVIRON})
    outcome, _ = sandbox.run(bundle, env={"TRACE_CAPABILITY_TOKEN": token}, secrets=(token,))
    assert_ok(outcome)
    seen = json.dumps(outcome.response)
    for leaked in (secret_key, db_password, "TRACE_SECRET_KEY", "TRACE_DATABASE_URL"):
        assert leaked not in seen
    assert not outcome.response["pid1"].startswith(("PermissionError", "OSError"))  # it was really read
    assert "TRACE_RUNTIME=python3.11" in outcome.response["pid1"]
    assert outcome.response["os_environ"]["TRACE_CAPABILITY_TOKEN"] == token  # the one credential it gets
    assert f"TRACE_CAPABILITY_TOKEN={token}" in outcome.response["self"]


LEAKY = """
    import os
    import sys


    def handler(event, context):
        token = os.environ["TRACE_CAPABILITY_TOKEN"]
        print("stdout token:", token, flush=True)
        print("stderr token:", token, file=sys.stderr, flush=True)
        sys.stdout.write("padding " * event.get("pad", 0))
        raise RuntimeError(f"leaking {token} in an exception")
"""


def test_token_never_appears_in_logs(sandbox: Sandbox, tmp_path: Path) -> None:
    token = f"tok.{uuid.uuid4().hex}.{uuid.uuid4().hex}"
    bundle = write_bundle(tmp_path / "bundle", {"trace.py": LEAKY})
    outcome, _ = sandbox.run(bundle, env={"TRACE_CAPABILITY_TOKEN": token}, secrets=(token,))
    assert outcome.exit_reason == "error"
    assert outcome.error_type == "RuntimeError"
    for field in (outcome.logs, outcome.error_message or "", outcome.stack_trace or ""):
        assert token not in field
    assert REDACTED in outcome.logs
    assert f"stdout token: {REDACTED}" in outcome.logs
    assert f"stderr token: {REDACTED}" in outcome.logs
    assert outcome.error_message == f"leaking {REDACTED} in an exception"
    assert "RuntimeError" in outcome.logs  # the traceback was printed, redacted
    assert outcome.stack_trace and "trace.py" in outcome.stack_trace


INTERLEAVED = """
    import sys


    def handler(event, context):
        for i in range(event["n"]):
            sys.stdout.write(f"o{i} ")
            sys.stderr.write(f"e{i} ")
"""


def test_stdout_and_stderr_are_one_stream_in_write_order(sandbox: Sandbox, tmp_path: Path) -> None:
    # Two pipes let the engine reorder writes across them; the runtime gives the handler one.
    n = 300
    bundle = write_bundle(tmp_path / "bundle", {"trace.py": INTERLEAVED})
    outcome, _ = sandbox.run(bundle, event={"n": n})
    assert_ok(outcome)
    expected = "".join(f"o{i} e{i} " for i in range(n))
    assert expected in outcome.logs


STRADDLE = """
    import os
    import sys


    def handler(event, context):
        token = os.environ["TRACE_CAPABILITY_TOKEN"]
        out = sys.stdout.buffer
        out.write(b"p" * event["before"])
        out.write(token.encode())
        out.write(b"q" * 4096)
        out.flush()
        return "done"
"""


def test_token_cut_by_the_log_cap_is_not_leaked(sandbox: Sandbox, tmp_path: Path) -> None:
    """A token printed right across the 1 MB cap: its kept half is redacted too."""
    token = f"tok.{uuid.uuid4().hex}.{uuid.uuid4().hex}"
    bundle = write_bundle(tmp_path / "bundle", {"trace.py": STRADDLE})
    outcome, _ = sandbox.run(bundle, event={"before": LOG_CAP_BYTES - len(token) // 2},
                             env={"TRACE_CAPABILITY_TOKEN": token}, secrets=(token,))
    assert_ok(outcome)
    assert outcome.logs_truncated
    assert token[: len(token) // 2] not in outcome.logs
    assert token[:8] not in outcome.logs


IDENTITY = """
    import os


    def status(pid):
        with open(f"/proc/{pid}/status") as handle:
            return dict(line.rstrip("\\n").split(":\\t", 1) for line in handle if ":\\t" in line)


    def handler(event, context):
        mine, wrapper = status("self"), status(1)
        try:
            os.setuid(0)
            setuid = "allowed"
        except OSError as exc:
            setuid = type(exc).__name__
        keys = ("Uid", "Gid", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs", "Seccomp")
        return {"self": {k: mine.get(k) for k in keys}, "pid1": {k: wrapper.get(k) for k in keys},
                "uid": os.getuid(), "euid": os.geteuid(), "gid": os.getgid(), "groups": os.getgroups(),
                "setuid": setuid}
"""


def test_runs_as_10001_without_capabilities(sandbox: Sandbox, tmp_path: Path) -> None:
    bundle = write_bundle(tmp_path / "bundle", {"trace.py": IDENTITY})
    outcome, _ = sandbox.run(bundle)
    assert_ok(outcome)
    answer = outcome.response
    assert (answer["uid"], answer["euid"], answer["gid"]) == (10001, 10001, 10001)
    assert answer["setuid"] == "PermissionError"
    for process in ("self", "pid1"):
        status = answer[process]
        assert status["Uid"].split() == ["10001"] * 4, process
        assert status["Gid"].split() == ["10001"] * 4, process
        for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
            assert int(status[cap], 16) == 0, (process, cap, status[cap])
        assert status["NoNewPrivs"] == "1", process


# --- real clients -------------------------------------------------------------------------------------------


def test_builtin_python_loop_context_and_event(sandbox: Sandbox, tmp_path: Path) -> None:
    bundle = write_bundle(tmp_path / "bundle", {"trace.py": ECHO})
    event = {"task": {"id": "t1", "attempt": 1}, "config": {"nested": [1, 2.5, None, "ü"]}}
    outcome, _ = sandbox.run(bundle, event=event)
    assert_ok(outcome)
    assert outcome.response["echo"] == event
    assert 0 < outcome.response["remaining_ms"] <= 5000
    assert outcome.logs == "hello from the sandbox\n"


ALLOCATE = """
    def handler(event, context):
        hold = bytearray(event["mb"] << 20)  # zero-filled: every page touched
        return {"held": len(hold)}
"""

NODE_ALLOCATE = """
    exports.handler = async (event) => {
      const hold = Buffer.alloc(event.mb << 20, 1);
      return { held: hold.length };
    };
"""


@pytest.mark.parametrize("runtime, files", [("python3.11", {"trace.py": ALLOCATE}),
                                             ("nodejs", {"trace.js": NODE_ALLOCATE})], ids=["python", "node"])
def test_peak_memory_is_reported(sandbox: Sandbox, tmp_path: Path, runtime: str, files: dict[str, str]) -> None:
    """The wrapper reads the sandbox's cgroup high-water mark: a handler holding 50 MB shows a peak above it."""
    bundle = write_bundle(tmp_path / "bundle", files)
    # cgroup v1 charges page cache to the cgroup that first reads a page: a throwaway run loads
    # the runtime's files, so neither measured run is charged for them (else order decides).
    assert_ok(sandbox.run(bundle, runtime=runtime, event={"mb": 1})[0])
    small, _ = sandbox.run(bundle, runtime=runtime, event={"mb": 1})
    large, _ = sandbox.run(bundle, runtime=runtime, event={"mb": 50})
    for outcome in (small, large):
        assert_ok(outcome)
        assert isinstance(outcome.peak_memory_bytes, int), outcome.peak_memory_bytes
    assert large.response == {"held": 50 << 20}
    assert large.peak_memory_bytes > 50 << 20
    assert large.peak_memory_bytes < 512 << 20  # the sandbox's, not the host's
    # cgroup v1 counts page cache too, so only the order is stable across loads.
    assert small.peak_memory_bytes < large.peak_memory_bytes


@pytest.fixture(scope="session")
def awslambdaric_dir() -> Path:
    """``pip install --target`` of awslambdaric, cached under /tmp by version; pip failing fails the test."""
    target = CACHE / f"awslambdaric-{AWSLAMBDARIC_VERSION}-py{sys.version_info[0]}{sys.version_info[1]}"
    if (target / ".complete").exists():
        return target
    building = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    shutil.rmtree(building, ignore_errors=True)
    building.parent.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--no-input", "--no-compile",
         "--target", str(building), f"awslambdaric=={AWSLAMBDARIC_VERSION}"],
        capture_output=True, text=True, timeout=600, check=False)
    if done.returncode != 0:
        pytest.fail(f"pip install awslambdaric failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    (building / ".complete").write_text(AWSLAMBDARIC_VERSION)
    shutil.rmtree(target, ignore_errors=True)
    building.rename(target)
    return target


AWSLAMBDARIC_BOOTSTRAP = """
    #!/bin/sh
    # The official Python runtime interface client, vendored in the bundle, as the entry point.
    export PYTHONPATH="/var/task${PYTHONPATH:+:$PYTHONPATH}"
    exec python3 -m awslambdaric trace.handler
"""

AWSLAMBDARIC_HANDLER = """
    import awslambdaric


    def handler(event, context):
        if event.get("fail"):
            raise ValueError("asked to fail")
        return {"echo": event, "remaining_ms": context.get_remaining_time_in_millis(),
                "request_id": context.aws_request_id, "function": context.function_name,
                "client": awslambdaric.__file__}
"""


def test_awslambdaric_bundle(sandbox: Sandbox, tmp_path: Path, awslambdaric_dir: Path) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(awslambdaric_dir, bundle)
    write_bundle(bundle, {"trace.py": AWSLAMBDARIC_HANDLER, "bootstrap": AWSLAMBDARIC_BOOTSTRAP},
                 executable=("bootstrap",))
    event = {"rows": [{"block": 1, "hash": "0xabc"}], "unicode": "π"}
    outcome, _ = sandbox.run(bundle, runtime="provided", event=event)
    assert_ok(outcome)
    assert outcome.response["echo"] == event
    assert outcome.response["remaining_ms"] > 0
    assert outcome.response["function"] == "trace-udf"
    assert outcome.response["client"].startswith("/var/task/awslambdaric/")
    # A raised exception comes back through the Runtime API's error route.
    failed, _ = sandbox.run(bundle, runtime="provided", event={"fail": True})
    assert failed.exit_reason == "error", (failed.exit_reason, failed.error_message, failed.logs[-2000:])
    assert failed.error_type == "ValueError"
    assert failed.error_message == "asked to fail"
    assert "trace.py" in (failed.stack_trace or "")


NODE_ASYNC = """
    exports.handler = async (event, context) => {
      await new Promise((resolve) => setTimeout(resolve, 10));
      console.log('node async handler');
      return { echo: event, remaining_ms: context.getRemainingTimeInMillis(), node: process.version, kind: 'async' };
    };
"""

NODE_CALLBACK = """
    exports.handler = (event, context, callback) => {
      setTimeout(() => {
        console.log('node callback handler');
        if (event.fail) return callback(new Error('callback failure'));
        callback(null, { echo: event, remaining_ms: context.getRemainingTimeInMillis(), node: process.version,
                         kind: 'callback' });
      }, 10);
    };
"""


@pytest.mark.parametrize("kind, source", [("async", NODE_ASYNC), ("callback", NODE_CALLBACK)])
def test_node_handler(sandbox: Sandbox, tmp_path: Path, kind: str, source: str) -> None:
    bundle = write_bundle(tmp_path / "bundle", {"trace.js": source})
    event = {"block": 123, "list": [1, "two", None], "nested": {"ok": True}}
    outcome, _ = sandbox.run(bundle, runtime="nodejs", event=event)
    assert_ok(outcome)
    answer = outcome.response
    assert answer["echo"] == event
    assert answer["kind"] == kind
    assert 0 < answer["remaining_ms"] <= 5000
    assert answer["node"].startswith("v18.")
    assert f"node {kind} handler" in outcome.logs


def test_node_callback_error(sandbox: Sandbox, tmp_path: Path) -> None:
    bundle = write_bundle(tmp_path / "bundle", {"trace.js": NODE_CALLBACK})
    outcome, _ = sandbox.run(bundle, runtime="nodejs", event={"fail": True})
    assert outcome.exit_reason == "error"
    assert outcome.error_type == "Error"
    assert outcome.error_message == "callback failure"
    assert "trace.js" in (outcome.stack_trace or "")


NODE_CHILDREN = """
    const { fork } = require('child_process');
    const { Worker } = require('worker_threads');

    exports.handler = async () => {
      const forked = await new Promise((resolve, reject) => {
        const child = fork(`${__dirname}/child.js`, ['arg']);
        child.on('message', resolve);
        child.on('error', reject);
      });
      const worker = await new Promise((resolve, reject) => {
        const thread = new Worker('require("worker_threads").parentPort.postMessage(40 + 2)', { eval: true });
        thread.on('message', resolve);
        thread.on('error', reject);
      });
      return { forked, worker, fromSnapshot: process.argv.length === 1 };
    };
"""


def test_node_handler_forks_and_starts_workers(sandbox: Sandbox, tmp_path: Path) -> None:
    """The sandbox's node starts from the image's snapshot of the wrapper; what the handler starts is plain node
    running what it was given (the snapshot's flag is not inherited)."""
    bundle = write_bundle(tmp_path / "bundle", {"trace.js": NODE_CHILDREN, "child.js": """
        process.send({ argv: process.argv.slice(2), gateway: process.env.TRACE_GATEWAY });
        process.exit(0);
    """})
    outcome, _ = sandbox.run(bundle, runtime="nodejs", limits=Limits(timeout_s=30.0))
    assert_ok(outcome)
    assert outcome.response == {"forked": {"argv": ["arg"], "gateway": "unix:///run/trace/gateway.sock"},
                                "worker": 42, "fromSnapshot": True}


@pytest.fixture(scope="session")
def rust_bootstrap() -> Path | None:
    """The std-only Rust bootstrap built with cargo (offline) into a cache keyed by its sources; None without cargo."""
    if CARGO is None:
        return None
    crate = FIXTURES / "rust_bootstrap"
    digest = hashlib.sha256()
    for path in sorted(p for p in crate.rglob("*") if p.is_file() and "target" not in p.parts):
        digest.update(path.relative_to(crate).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    build = CACHE / f"rust-bootstrap-{digest.hexdigest()[:16]}"
    binary = build / "target" / "release" / "bootstrap"
    if binary.is_file():
        return binary
    shutil.rmtree(build, ignore_errors=True)
    shutil.copytree(crate, build, ignore=shutil.ignore_patterns("target"))
    done = subprocess.run([CARGO, "build", "--release", "--offline"], cwd=build, capture_output=True, text=True,
                          timeout=600, check=False, env={**os.environ, "CARGO_TARGET_DIR": str(build / "target")})
    if done.returncode != 0 or not binary.is_file():
        pytest.fail(f"cargo build failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return binary


@pytest.mark.parametrize("client", [RUST_ID, "bash-dev-tcp"])
def test_provided_bootstrap_raw_http(sandbox: Sandbox, tmp_path: Path, rust_bootstrap: Path | None,
                                     client: str) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    if client == "rust-cargo":
        assert rust_bootstrap is not None
        shutil.copy(rust_bootstrap, bundle / "bootstrap")
        expected_client = "rust-std"
    else:  # bash over /dev/tcp, also the fallback when cargo is missing
        shutil.copy(FIXTURES / "shell_bootstrap" / "bootstrap", bundle / "bootstrap")
        expected_client = "bash-dev-tcp"
    normalize_modes(bundle, executable=("bootstrap",))
    event = {"block": 19_000_000, "tx": ["0x01", "0x02"], "meta": {"chain": "eth", "final": True}}
    outcome, _ = sandbox.run(bundle, runtime="provided", handler="ignored.by_bootstrap", event=event)
    assert_ok(outcome)
    answer = outcome.response
    assert answer["client"] == expected_client
    assert answer["echo"] == event
    assert answer["request_id"]
    assert 0 < answer["remaining_ms"] <= 5000
    assert answer["handler"] == "ignored.by_bootstrap"
    assert f"bootstrap: got request {answer['request_id']}" in outcome.logs

