"""The process sandbox backend (bubblewrap + rlimits), run for real on this host.

Every test starts real ``bwrap`` sandboxes running the real wrapper (workers/runtime/) with the
host's python3 or node. bubblewrap is a Debian package: the session fixture installs it with
apt-get when it is missing and we are root; otherwise the session fails (nothing is skipped).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tracecore.dags.spec import Limits
from tracecore.exceptions import PlatformError
from workers.sandbox import REDACTED, Invocation, Outcome
from workers.sandbox.process import PID_DIR, WARNING, ProcessBackend, _start_ticks

pytestmark = pytest.mark.slow

TOKEN = "cap-token-process-sandbox-0123456789"
HOST_SECRET = "host-secret-never-in-the-sandbox-42"


def _ensure_bwrap() -> str:
    path = shutil.which("bwrap")
    if path is None and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        install = ["apt-get", "install", "-y", "-q", "bubblewrap"]
        if subprocess.run(install, env=env, capture_output=True).returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
            subprocess.run(install, env=env, capture_output=True)
        path = shutil.which("bwrap")
    if path is None:
        pytest.fail("bubblewrap is missing and could not be installed: apt-get install bubblewrap")
    return path


@pytest.fixture(scope="session")
def bwrap() -> str:
    return _ensure_bwrap()


@pytest.fixture(scope="module")
def backend(bwrap: str) -> ProcessBackend:
    return ProcessBackend()


def make_bundle(root: Path, files: dict[str, str]) -> Path:
    bundle = root / "bundle"
    bundle.mkdir(mode=0o755)
    for name, text in files.items():
        path = bundle / name
        path.write_text(textwrap.dedent(text))
        path.chmod(0o644)
    return bundle


def invoke(backend: ProcessBackend, tmp_path: Path, source: str, *, runtime: str = "python3.11",
           handler: str = "trace.handler", event: dict[str, Any] | None = None, name: str = "trace.py",
           **limits: Any) -> Outcome:
    bundle = make_bundle(tmp_path, {name: source})
    invocation = Invocation(
        bundle_dir=bundle, runtime=runtime, handler=handler, event=event or {"task": {"id": "t-1"}},
        work_dir=tmp_path / "sandboxes" / "work", limits=Limits(**limits),
        env={"TRACE_CAPABILITY_TOKEN": TOKEN}, secrets=(TOKEN, HOST_SECRET))
    return backend.run(invocation)


def test_construction_warns_that_isolation_is_weaker(bwrap: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="workers.sandbox.process"):
        ProcessBackend()
    warnings = [record for record in caplog.records if record.levelno == logging.WARNING]
    assert [record.getMessage() for record in warnings] == [WARNING]
    assert "weaker isolation than docker" in WARNING


def test_missing_bwrap_is_a_clear_platform_error(bwrap: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no bwrap on this PATH
    with pytest.raises(PlatformError, match=r"install bubblewrap \(apt-get install bubblewrap\)"):
        ProcessBackend()


def test_python_handler_succeeds_as_uid_10001_with_only_the_wrapper_environment(
        backend: ProcessBackend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRACE_TEST_HOST_SECRET", HOST_SECRET)  # in the worker's environment, not the sandbox's
    outcome = invoke(backend, tmp_path, """
        import os

        def handler(event, context):
            status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
            try:
                init_environ = open("/proc/1/environ", "rb").read().decode(errors="replace")
            except OSError as exc:
                init_environ = type(exc).__name__
            print("hello from the sandbox")
            return {"uid": os.getuid(), "gid": os.getgid(), "groups": os.getgroups(), "event": event,
                    "cap_eff": status["CapEff"].strip(), "no_new_privs": status["NoNewPrivs"].strip(),
                    "environ": dict(os.environ), "init_environ": init_environ, "cwd": os.getcwd(),
                    "hostname": os.uname().nodename, "root": sorted(os.listdir("/")),
                    "etc": sorted(os.listdir("/etc"))}
    """, event={"task": {"id": "t-42"}, "config": {"x": 1}})
    assert outcome.exit_reason == "ok", outcome
    answer = outcome.response
    assert (answer["uid"], answer["gid"], answer["groups"]) == (10001, 10001, [])
    assert answer["event"] == {"task": {"id": "t-42"}, "config": {"x": 1}}
    assert answer["cap_eff"] == "0000000000000000" and answer["no_new_privs"] == "1"
    assert answer["environ"]["TRACE_CAPABILITY_TOKEN"] == TOKEN
    assert answer["environ"]["LAMBDA_TASK_ROOT"] == "/var/task" and answer["cwd"] == "/var/task"
    assert answer["environ"]["TRACE_GATEWAY"] == "unix:///run/trace/gateway.sock"
    assert HOST_SECRET not in json.dumps(answer["environ"]) and HOST_SECRET not in answer["init_environ"]
    assert "TRACE_TEST_HOST_SECRET" not in answer["environ"]
    assert answer["hostname"] == "sandbox"
    assert "home" not in answer["root"] and "root" not in answer["root"]
    assert "passwd" not in answer["etc"] and "shadow" not in answer["etc"]
    assert "hello from the sandbox" in outcome.logs
    assert outcome.exit_code == 0 and outcome.duration_ms > 0


def test_node_handler_succeeds(backend: ProcessBackend, tmp_path: Path) -> None:
    outcome = invoke(backend, tmp_path, """
        exports.handler = async (event) => ({ok: true, uid: process.getuid(), got: event.task.id});
    """, runtime="nodejs", handler="index.handler", name="index.js")
    assert outcome.exit_reason == "ok", outcome
    assert outcome.response == {"ok": True, "uid": 10001, "got": "t-1"}


def test_no_network_out_nor_to_the_hosts_loopback(backend: ProcessBackend, tmp_path: Path) -> None:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    port = listener.getsockname()[1]
    try:
        outcome = invoke(backend, tmp_path, """
            import socket

            def attempt(host, port):
                try:
                    socket.create_connection((host, port), timeout=2).close()
                    return "connected"
                except OSError as exc:
                    return f"{type(exc).__name__}: {exc}"

            def handler(event, context):
                return {"outside": attempt("192.0.2.1", 80), "host_loopback": attempt("127.0.0.1", event["port"]),
                        "interfaces": [name for _, name in socket.if_nameindex()]}
        """, event={"port": port})
        listener.settimeout(0.5)
        with pytest.raises(TimeoutError):
            listener.accept()  # nothing ever reached the host's listener
    finally:
        listener.close()
    assert outcome.exit_reason == "ok", outcome
    assert outcome.response["outside"] != "connected"
    assert "unreachable" in outcome.response["outside"].lower()
    assert outcome.response["host_loopback"].startswith("ConnectionRefusedError")
    assert outcome.response["interfaces"] == ["lo"]


def test_the_gateway_socket_in_the_work_dir_is_reachable(backend: ProcessBackend, tmp_path: Path) -> None:
    work = tmp_path / "sandboxes" / "work"
    work.mkdir(parents=True)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(work / "gateway.sock"))
    os.chmod(work / "gateway.sock", 0o777)
    server.listen(1)

    def serve() -> None:
        connection, _ = server.accept()
        connection.sendall(b"gateway says hi")
        connection.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        outcome = invoke(backend, tmp_path, """
            import socket

            def handler(event, context):
                client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                client.connect("/run/trace/gateway.sock")
                return client.recv(100).decode()
        """)
    finally:
        thread.join(timeout=5)
        server.close()
    assert outcome.exit_reason == "ok", outcome
    assert outcome.response == "gateway says hi"


def test_writes_outside_tmp_fail(backend: ProcessBackend, tmp_path: Path) -> None:
    outcome = invoke(backend, tmp_path, """
        def handler(event, context):
            results = {}
            for path in ("/escape", "/usr/escape", "/etc/escape", "/var/task/escape", "/opt/trace/runtime/escape",
                         "/tmp/ok"):
                try:
                    with open(path, "w") as handle:
                        handle.write("x")
                    results[path] = "written"
                except OSError as exc:
                    results[path] = type(exc).__name__
            return results
    """)
    assert outcome.exit_reason == "ok", outcome
    results = outcome.response
    assert results.pop("/tmp/ok") == "written"
    assert all(value != "written" for value in results.values()), results
    assert not (tmp_path / "bundle" / "escape").exists()


def test_infinite_loop_ends_as_the_wrappers_own_timeout(backend: ProcessBackend, tmp_path: Path) -> None:
    """The wrapper's deadline ends the loop and the wrapper reports it, before either backstop has to:
    the backend's outer kill (SIGKILL: exit 137, no result) or the CPU rlimit (its own message)."""
    outcome = invoke(backend, tmp_path, """
        def handler(event, context):
            while True:
                pass
    """, timeout_s=2.0)
    assert outcome.exit_reason == "timeout", outcome
    assert outcome.error_message == "no answer within 2 s", outcome
    assert outcome.exit_code == 1, outcome  # the wrapper exited by itself after writing its verdict


def test_a_sandbox_that_ignores_the_deadline_is_killed_from_outside(backend: ProcessBackend, tmp_path: Path) -> None:
    """The wrapper itself stuck (SIGSTOPped here): the backend's own wall clock kills the whole sandbox."""
    outcome = invoke(backend, tmp_path, """
        import os, signal

        def handler(event, context):
            os.kill(os.getppid(), signal.SIGSTOP)  # freeze the wrapper: it can no longer time us out
            while True:
                pass
    """, timeout_s=1.0)
    assert outcome.exit_reason == "timeout", outcome
    # Killed from outside: SIGKILL to the sandbox (137) with no result document is a timeout only on
    # that path (otherwise it is `killed`); the message is the deadline's, not the CPU rlimit's.
    assert outcome.exit_code == 137 and outcome.error_message == "no answer within 1 s", outcome
    assert not list((tmp_path / "sandboxes" / PID_DIR).glob("*.json"))


def test_memory_bomb_is_stopped_and_recorded(backend: ProcessBackend, tmp_path: Path) -> None:
    outcome = invoke(backend, tmp_path, """
        def handler(event, context):
            hoard = []
            while True:
                hoard.append(bytearray(16 << 20))
    """, memory_mb=128, timeout_s=20.0)
    assert outcome.exit_reason == "oom", outcome
    assert outcome.error_type == "OutOfMemory" and "128 MB" in (outcome.error_message or "")


def test_fork_bomb_stops_at_the_pids_limit(backend: ProcessBackend, tmp_path: Path) -> None:
    outcome = invoke(backend, tmp_path, """
        import os, signal, time

        def handler(event, context):
            children, stopped_by = [], None
            try:
                for _ in range(500):
                    pid = os.fork()
                    if pid == 0:
                        time.sleep(30)
                        os._exit(0)
                    children.append(pid)
            except OSError as exc:
                stopped_by = type(exc).__name__
            for pid in children:  # free the slots, or the wrapper could not start a thread to take the answer
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            return {"children": len(children), "stopped_by": stopped_by}
    """, pids=32, timeout_s=20.0)
    assert outcome.exit_reason == "ok", outcome
    assert outcome.response["stopped_by"] == "BlockingIOError"
    assert outcome.response["children"] < 32


def test_huge_stdout_is_capped(backend: ProcessBackend, tmp_path: Path) -> None:
    outcome = invoke(backend, tmp_path, """
        import sys

        def handler(event, context):
            block = "y" * (1 << 20)
            for _ in range(100):
                sys.stdout.write(block)
            sys.stdout.flush()
            return "done"
    """, timeout_s=30.0)
    assert outcome.exit_reason == "ok", outcome
    assert outcome.logs_truncated
    assert len(outcome.logs) < (1 << 20) + 200
    assert "output truncated by Trace" in outcome.logs


def test_the_token_is_redacted_from_logs_and_errors(backend: ProcessBackend, tmp_path: Path) -> None:
    outcome = invoke(backend, tmp_path, """
        import os, sys

        def handler(event, context):
            token = os.environ["TRACE_CAPABILITY_TOKEN"]
            print("stdout:", token)
            print("stderr:", token, file=sys.stderr)
            raise RuntimeError(f"leaking {token}")
    """)
    assert outcome.exit_reason == "error", outcome
    assert outcome.error_type == "RuntimeError"
    everything = json.dumps([outcome.logs, outcome.error_message, outcome.stack_trace])
    assert TOKEN not in everything
    assert f"stdout: {REDACTED}" in outcome.logs and f"stderr: {REDACTED}" in outcome.logs
    assert outcome.error_message == f"leaking {REDACTED}"


@pytest.fixture
def stray_group() -> Iterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen(["sleep", "60"], start_new_session=True)
    yield process
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def test_reap_orphans_kills_groups_of_dead_workers_only(backend: ProcessBackend, tmp_path: Path,
                                                         stray_group: subprocess.Popen[bytes]) -> None:
    dead_worker = subprocess.Popen(["true"])
    dead_worker.wait()
    mine = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        folder = tmp_path / "sandboxes" / PID_DIR
        folder.mkdir(parents=True)
        host = socket.gethostname()
        for process, worker_pid in ((stray_group, dead_worker.pid), (mine, os.getpid())):
            (folder / f"{process.pid}.json").write_text(json.dumps(
                {"pid": process.pid, "start_ticks": _start_ticks(process.pid), "worker_host": host,
                 "worker_pid": worker_pid, "started": time.time()}))
        (folder / "999999999.json").write_text(json.dumps(
            {"pid": 999999999, "start_ticks": 1, "worker_host": host, "worker_pid": dead_worker.pid,
             "started": time.time()}))
        reaper = ProcessBackend(state_dir=tmp_path / "sandboxes")
        assert reaper.reap_orphans() == 1
        assert stray_group.wait(timeout=5) == -signal.SIGKILL
        assert mine.poll() is None  # its worker (this test) is alive
        assert sorted(path.name for path in folder.glob("*.json")) == [f"{mine.pid}.json"]
    finally:
        mine.kill()
        mine.wait()
