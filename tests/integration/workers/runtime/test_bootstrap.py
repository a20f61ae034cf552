"""The in-sandbox wrapper (workers/runtime/), run for real as a subprocess on this host.

No Docker here: TRACE_TASK_ROOT points the wrapper at an unpacked bundle in a temp dir, and the
event is inline. What the image adds (read-only root, no network, uid 10001) is the sandbox
backend's business and is tested there; this file proves the Runtime API contract, the result
document, the environment boundary, and that an unmodified standard client (awslambdaric) works.
"""

from __future__ import annotations

import http.client
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

RUNTIME_DIR = Path(__file__).resolve().parents[4] / "workers" / "runtime"
FIXTURES = Path(__file__).resolve().parent / "fixtures"
NODE = shutil.which("node") or "/usr/bin/node"
TOKEN = "cap-token-for-tests"
RESULT_KEYS = {"status", "response", "error", "duration_ms", "exit_code", "peak_memory_bytes"}


def load_module(path: Path) -> ModuleType:
    """Load a file by path: workers/runtime/ is copied into sandboxes, not imported as a package."""
    spec = importlib.util.spec_from_file_location(f"_trace_test_{path.stem}", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclass
class Outcome:
    result: dict[str, Any]
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture(scope="session")
def bin_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A PATH entry whose `python3` is this interpreter, so bundle scripts and their C extensions agree."""
    path = tmp_path_factory.mktemp("bin")
    (path / "python3").symlink_to(os.path.realpath(sys.executable))
    return path


def write_bundle(root: Path, files: dict[str, str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        target = root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(textwrap.dedent(text))
        if name == "bootstrap":
            target.chmod(0o755)
    return root


@pytest.fixture(scope="session")
def node_snapshot(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """node_bootstrap.js as a startup snapshot, as the node image bakes it (there with the image's node)."""
    blob = tmp_path_factory.mktemp("node-snapshot") / "node_bootstrap.blob"
    build = [NODE, "--snapshot-blob", str(blob), "--build-snapshot", str(RUNTIME_DIR / "node_bootstrap.js")]
    done = subprocess.run(build, cwd=blob.parent, capture_output=True, text=True, timeout=120, check=False)
    if done.returncode != 0 or not blob.is_file():
        pytest.fail(f"node could not build the snapshot ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return blob


def wrapper_command(wrapper: str, request: pytest.FixtureRequest) -> list[str]:
    if wrapper == "node_bootstrap.blob":
        return [NODE, "--snapshot-blob", str(request.getfixturevalue("node_snapshot"))]
    return [NODE if wrapper.endswith(".js") else sys.executable, str(RUNTIME_DIR / wrapper)]


@pytest.fixture
def run_wrapper(tmp_path: Path, bin_dir: Path, request: pytest.FixtureRequest) -> Callable[..., Outcome]:
    """Run a wrapper (bootstrap.py; for nodejs also node_bootstrap.js, as a script or from its snapshot
    ``node_bootstrap.blob``) over a bundle and return its result document (and how it exited)."""

    def run(bundle: Path | dict[str, str], runtime: str = "python3.11", handler: str = "trace.handler",
            event: Any = None, timeout_s: float = 10, env: dict[str, str] | None = None,
            wrapper: str = "bootstrap.py") -> Outcome:
        root = bundle if isinstance(bundle, Path) else write_bundle(tmp_path / "task", bundle)
        result_file = tmp_path / "result.json"
        wrapper_env = {
            "PATH": f"{bin_dir}:/usr/local/bin:/usr/bin:/bin",
            "SECRET_SHOULD_NOT_LEAK": "hunter2",
            "TRACE_RUNTIME": runtime,
            "_HANDLER": handler,
            "TRACE_TASK_ROOT": str(root),
            "TRACE_EVENT": json.dumps(event if event is not None else {"task": {"id": "t1"}, "params": {"seed": 7}}),
            "TRACE_RESULT_FILE": str(result_file),
            "TRACE_TIMEOUT_S": str(timeout_s),
            "TRACE_FUNCTION_NAME": "udf-test",
            "TRACE_MEMORY_MB": "256",
            "TRACE_CAPABILITY_TOKEN": TOKEN,
            **(env or {}),
        }
        proc = subprocess.run(wrapper_command(wrapper, request), env=wrapper_env,
                              capture_output=True, text=True, timeout=timeout_s + 30, check=False)
        result = json.loads(result_file.read_text()) if result_file.exists() else {}
        return Outcome(result, proc.returncode, proc.stdout, proc.stderr)

    return run


# ---------------------------------------------------------------- Python handlers


def test_python_handler_returns_dict(run_wrapper: Callable[..., Outcome]) -> None:
    event = {"task": {"id": "t9"}, "rows": [1, 2, 3], "text": "héllo"}
    out = run_wrapper({"trace.py": """
        import trace_sdk  # importable without vendoring: the wrapper puts the runtime dir on PYTHONPATH
        def handler(event, context):
            return {"rows": [{"n": n * 2} for n in event["rows"]], "echo": event, "sdk": trace_sdk.__name__}
    """}, event=event)
    assert set(out.result) == RESULT_KEYS, out.stderr
    assert out.result["status"] == "ok", out
    assert out.result["response"] == {"rows": [{"n": 2}, {"n": 4}, {"n": 6}], "echo": event, "sdk": "trace_sdk"}
    assert out.result["error"] is None
    assert out.result["duration_ms"] > 0
    assert out.returncode == 0


def test_python_handler_raises(run_wrapper: Callable[..., Outcome]) -> None:
    out = run_wrapper({"trace.py": """
        def helper(x):
            raise ValueError(f"bad value {x}")
        def handler(event, context):
            return helper(42)
    """})
    assert out.result["status"] == "error", out
    error = out.result["error"]
    assert error["errorType"] == "ValueError"
    assert error["errorMessage"] == "bad value 42"
    assert any("trace.py" in line for line in error["stackTrace"]), error
    assert not any("python_loop.py" in line for line in error["stackTrace"]), error
    assert out.returncode == 1


@pytest.mark.parametrize(("files", "handler", "error_type"), [
    ({"trace.py": "import not_a_module_anywhere\n"}, "trace.handler", "Runtime.ImportModuleError"),
    ({"pkg/__init__.py": "", "pkg/mod.py": "def other(e, c):\n    return 1\n"}, "pkg/mod.handler",
     "Runtime.HandlerNotFound"),
    ({"trace.py": ""}, "trace", "Runtime.MalformedHandlerName"),
], ids=["import-error", "missing-handler", "malformed-name"])
def test_python_init_errors(run_wrapper: Callable[..., Outcome], files: dict[str, str], handler: str,
                            error_type: str) -> None:
    out = run_wrapper(files, handler=handler)
    assert out.result["status"] == "init_error", out
    assert out.result["error"]["errorType"] == error_type
    assert out.returncode == 1
    if error_type == "Runtime.ImportModuleError":
        assert "not_a_module_anywhere" in out.result["error"]["errorMessage"]


def test_dotted_module_path(run_wrapper: Callable[..., Outcome]) -> None:
    """`pkg/mod.handler` means module pkg.mod (and every `trace.handler` test shows the bundle beats stdlib `trace`)."""
    nested = run_wrapper({"pkg/__init__.py": "", "pkg/mod.py": "def handler(e, c):\n    return 'deep'\n"},
                         handler="pkg/mod.handler")
    assert nested.result["status"] == "ok" and nested.result["response"] == "deep", nested


def test_infinite_loop_times_out(run_wrapper: Callable[..., Outcome]) -> None:
    out = run_wrapper({"trace.py": "def handler(e, c):\n    while True:\n        pass\n"}, timeout_s=1)
    assert out.result["status"] == "timeout", out
    # The wrapper's own deadline, the one it was given (not its 60 s default), ended the loop.
    assert out.result["error"] == {"errorType": "Sandbox.Timedout", "errorMessage": "Task timed out after 1.00 seconds",
                                   "stackTrace": []}, out.result["error"]
    assert out.returncode == 1


def test_os_exit_is_exited(run_wrapper: Callable[..., Outcome]) -> None:
    out = run_wrapper({"trace.py": "import os\ndef handler(e, c):\n    os._exit(3)\n"})
    assert out.result["status"] == "exited", out
    assert out.result["exit_code"] == 3
    assert out.result["error"]["errorType"] == "Runtime.ExitError"


def test_context_and_environment(run_wrapper: Callable[..., Outcome], tmp_path: Path) -> None:
    out = run_wrapper({"trace.py": """
        import os
        def handler(event, context):
            return {"remaining": context.get_remaining_time_in_millis(), "request_id": context.aws_request_id,
                    "name": context.function_name, "memory": context.memory_limit_in_mb,
                    "arn": context.invoked_function_arn, "group": context.log_group_name,
                    "stream": context.log_stream_name, "env": dict(os.environ)}
    """}, timeout_s=20, env={"TRACE_REQUEST_ID": "req-123"})
    assert out.result["status"] == "ok", out
    response = out.result["response"]
    assert 0 < response["remaining"] <= 20_000
    assert response["request_id"] == "req-123"
    assert response["name"] == "udf-test" and response["memory"] == "256"
    assert response["arn"] == "arn:aws:lambda:us-east-1:000000000000:function:udf-test"
    assert response["group"] == "/aws/lambda/udf-test" and response["stream"].endswith("req-123")
    env = response["env"]
    task_root = str(tmp_path / "task")
    assert env["_HANDLER"] == "trace.handler"
    assert env["LAMBDA_TASK_ROOT"] == task_root
    assert env["AWS_LAMBDA_RUNTIME_API"].startswith("127.0.0.1:")
    assert env["AWS_LAMBDA_FUNCTION_NAME"] == "udf-test"
    assert env["AWS_LAMBDA_FUNCTION_MEMORY_SIZE"] == "256"
    assert env["AWS_LAMBDA_FUNCTION_VERSION"] == "$LATEST"
    assert env["AWS_REGION"] == env["AWS_DEFAULT_REGION"] == "us-east-1"
    assert (env["TZ"], env["LANG"], env["HOME"]) == ("UTC", "C.UTF-8", "/tmp")
    assert env["PYTHONPATH"].split(":") == [task_root, str(RUNTIME_DIR)]
    assert env["TRACE_CAPABILITY_TOKEN"] == TOKEN
    assert "SECRET_SHOULD_NOT_LEAK" not in env
    assert not any(key in env for key in ("TRACE_EVENT", "TRACE_RESULT_FILE", "TRACE_TASK_ROOT", "TRACE_RUNTIME"))


def test_response_over_6mb_is_result_too_large(run_wrapper: Callable[..., Outcome]) -> None:
    out = run_wrapper({"trace.py": "def handler(e, c):\n    return 'x' * (7 * 1024 * 1024)\n"})
    assert out.result["status"] == "error", out
    assert out.result["error"]["errorType"] == "result_too_large"


def test_unwritable_result_file_goes_to_stdout(run_wrapper: Callable[..., Outcome], tmp_path: Path) -> None:
    out = run_wrapper({"trace.py": "def handler(e, c):\n    print('user log line')\n    return [1]\n"},
                      env={"TRACE_RESULT_FILE": str(tmp_path / "missing-dir" / "result.json")})
    lines = out.stdout.splitlines()
    assert "user log line" in lines
    marker = lines.index("__TRACE_RESULT__")
    result = json.loads(lines[marker + 1])
    assert result["status"] == "ok" and result["response"] == [1]
    assert out.returncode == 0


# ---------------------------------------------------------------- Node handlers

# bootstrap.py runs node_loop.js as a Runtime API client in a child process (process and fargate backends);
# node_bootstrap.js runs it in its own process (the Docker backend's `nodejs` sandboxes, from a snapshot).
NODE_WRAPPERS = pytest.mark.parametrize("wrapper", ["bootstrap.py", "node_bootstrap.js", "node_bootstrap.blob"])


@NODE_WRAPPERS
def test_node_async_handler(run_wrapper: Callable[..., Outcome], wrapper: str) -> None:
    out = run_wrapper({"index.js": """
        const sdk = require('trace_sdk');
        exports.handler = async (event, context) => {
          await new Promise((resolve) => setTimeout(resolve, 5));
          return { echo: event, id: context.awsRequestId, name: context.functionName,
                   remaining: context.getRemainingTimeInMillis(), sdk: typeof sdk.query,
                   waits: context.callbackWaitsForEmptyEventLoop, leaked: process.env.SECRET_SHOULD_NOT_LEAK || null };
        };
    """}, runtime="nodejs", handler="index.handler", event={"a": [1, 2]}, env={"TRACE_REQUEST_ID": "n-1"},
                      wrapper=wrapper)
    assert out.result["status"] == "ok", out
    assert out.result["response"] == {"echo": {"a": [1, 2]}, "id": "n-1", "name": "udf-test", "sdk": "function",
                                      "waits": True, "leaked": None, "remaining": out.result["response"]["remaining"]}
    assert out.result["response"]["remaining"] > 0


@NODE_WRAPPERS
def test_node_callback_handler(run_wrapper: Callable[..., Outcome], wrapper: str) -> None:
    out = run_wrapper({"lib/app.js": """
        exports.handler = function (event, context, callback) {
          setTimeout(() => callback(null, { doubled: event.n * 2 }), 5);
        };
    """}, runtime="nodejs", handler="lib/app.handler", event={"n": 21}, wrapper=wrapper)
    assert out.result["status"] == "ok", out
    assert out.result["response"] == {"doubled": 42}


@NODE_WRAPPERS
def test_node_errors(run_wrapper: Callable[..., Outcome], wrapper: str) -> None:
    thrown = run_wrapper({"index.js": "exports.handler = async () => { throw new TypeError('nope'); };\n"},
                         runtime="nodejs", handler="index.handler", wrapper=wrapper)
    assert thrown.result["status"] == "error", thrown
    assert thrown.result["error"]["errorType"] == "TypeError"
    assert any("index.js" in line for line in thrown.result["error"]["stackTrace"])
    missing = run_wrapper({"index.js": "exports.other = async () => 1;\n"}, runtime="nodejs", handler="index.handler",
                          wrapper=wrapper)
    assert missing.result["status"] == "init_error"
    assert missing.result["error"]["errorType"] == "Runtime.HandlerNotFound"


@NODE_WRAPPERS
def test_node_esm_handler(run_wrapper: Callable[..., Outcome], wrapper: str) -> None:
    out = run_wrapper({"index.mjs": "export const handler = async (event) => ({ esm: event.x });\n"},
                      runtime="nodejs", handler="index.handler", event={"x": "yes"}, wrapper=wrapper)
    assert out.result["status"] == "ok", out
    assert out.result["response"] == {"esm": "yes"}


def test_node_in_process_environment_is_the_child_processes(run_wrapper: Callable[..., Outcome],
                                                              tmp_path: Path) -> None:
    """node_bootstrap.js rebuilds process.env before the handler loads: exactly what bootstrap.py gives its node
    child, but AWS_LAMBDA_RUNTIME_API (no HTTP Runtime API listens; see node_bootstrap.js)."""
    files = {"index.js": "exports.handler = async () => ({ env: process.env, cwd: process.cwd() });\n"}
    seen = {}
    for wrapper in ("bootstrap.py", "node_bootstrap.js", "node_bootstrap.blob"):
        out = run_wrapper(files, runtime="nodejs", handler="index.handler", env={"TRACE_REQUEST_ID": "n-2"},
                          wrapper=wrapper)
        assert out.result["status"] == "ok", out
        assert out.result["response"]["cwd"] == str(tmp_path / "task")
        seen[wrapper] = {k: v for k, v in out.result["response"]["env"].items() if k != "_X_AMZN_TRACE_ID"}
    child = seen["bootstrap.py"]
    assert child.pop("AWS_LAMBDA_RUNTIME_API").startswith("127.0.0.1:")
    assert seen["node_bootstrap.js"] == seen["node_bootstrap.blob"] == child
    assert child["TRACE_CAPABILITY_TOKEN"] == TOKEN and "SECRET_SHOULD_NOT_LEAK" not in child
    # The task root, the SDK, then the image's vetted node_modules (beside the runtime dir): the bundle's own win.
    assert child["NODE_PATH"].split(":") == [str(tmp_path / "task"), str(RUNTIME_DIR),
                                             str(RUNTIME_DIR.parent / "node_modules")]


@NODE_WRAPPERS
@pytest.mark.parametrize("source", [
    "exports.handler = () => { for (;;) {} };\n",  # blocks the event loop: V8 is interrupted at the deadline
    "exports.handler = async () => { for (;;) {} };\n",
    "exports.handler = () => new Promise(() => { setInterval(() => {}, 1000); });\n",  # never answers
    "for (;;) {}\nexports.handler = () => 1;\n",  # the module's top level never ends
], ids=["sync-loop", "async-loop", "pending", "top-level-loop"])
def test_node_timeouts(run_wrapper: Callable[..., Outcome], wrapper: str, source: str) -> None:
    out = run_wrapper({"index.js": source}, runtime="nodejs", handler="index.handler", timeout_s=1, wrapper=wrapper)
    assert out.result["status"] == "timeout", out
    # The wrapper's own deadline, the one it was given (not its 60 s default), ended the handler.
    assert out.result["error"] == {"errorType": "Sandbox.Timedout", "errorMessage": "Task timed out after 1.00 seconds",
                                   "stackTrace": []}, out.result["error"]
    assert out.returncode == 1


@NODE_WRAPPERS
def test_node_exits_escapes_and_oversized_answers(run_wrapper: Callable[..., Outcome], wrapper: str) -> None:
    def run(source: str) -> Outcome:
        return run_wrapper({"index.js": source}, runtime="nodejs", handler="index.handler", wrapper=wrapper)

    exited = run("exports.handler = () => { process.exit(3); };\n")
    assert exited.result["status"] == "exited" and exited.result["exit_code"] == 3, exited
    assert exited.result["error"]["errorType"] == "Runtime.ExitError"
    assert exited.returncode == 1
    forgotten = run("exports.handler = (event, context, callback) => {};\n")  # nothing pending, no answer
    assert forgotten.result["status"] == "exited" and forgotten.result["exit_code"] == 0, forgotten
    late = run("exports.handler = () => new Promise(() => { setTimeout(() => { throw new RangeError('late'); }); });\n")
    assert late.result["status"] == "error", late
    assert (late.result["error"]["errorType"], late.result["error"]["errorMessage"]) == ("RangeError", "late")
    large = run("exports.handler = async () => 'x'.repeat(7 * 1024 * 1024);\n")
    assert large.result["status"] == "error", large.result["status"]
    assert large.result["error"]["errorType"] == "result_too_large"


NODE_SLEEPER = {"index.js": """
    exports.handler = () => new Promise(() => {
      require('fs').writeFileSync(require('path').join(process.env.LAMBDA_TASK_ROOT, '..', 'started'),
                                  String(process.pid));
      setTimeout(() => {}, 60000);
    });
"""}


@pytest.mark.parametrize(("runtime", "wrapper", "files", "handler"), [
    ("python3.11", "bootstrap.py", {"trace.py": """
        import os, time
        def handler(event, context):
            open(os.path.join(os.environ["LAMBDA_TASK_ROOT"], "..", "started"), "w").write(str(os.getpid()))
            time.sleep(60)
    """}, "trace.handler"),
    ("nodejs", "node_bootstrap.js", NODE_SLEEPER, "index.handler"),
    ("nodejs", "node_bootstrap.blob", NODE_SLEEPER, "index.handler"),
], ids=["python", "node", "node-snapshot"])
def test_sigterm_ends_the_invocation(tmp_path: Path, bin_dir: Path, request: pytest.FixtureRequest, runtime: str,
                                     wrapper: str, files: dict[str, str], handler: str) -> None:
    """The platform stopping the wrapper (docker stop): it answers `terminated` at once, its runtime is gone."""
    root = write_bundle(tmp_path / "task", files)
    result_file = tmp_path / "result.json"
    env = {"PATH": f"{bin_dir}:/usr/local/bin:/usr/bin:/bin", "TRACE_RUNTIME": runtime, "_HANDLER": handler,
           "TRACE_TASK_ROOT": str(root), "TRACE_EVENT": "{}", "TRACE_RESULT_FILE": str(result_file),
           "TRACE_TIMEOUT_S": "30"}
    proc = subprocess.Popen(wrapper_command(wrapper, request), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while not (tmp_path / "started").exists():
            assert time.monotonic() < deadline and proc.poll() is None, "the handler never started"
            time.sleep(0.02)
        runtime_pid = int((tmp_path / "started").read_text())
        proc.terminate()
        assert proc.wait() == 1  # its own deadline (30 s) would also end it, but as `timeout`: see below
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    result = json.loads(result_file.read_text())  # ended by the signal, not by the deadline (Sandbox.Timedout)
    assert result["status"] == "error" and result["error"]["errorType"] == "Sandbox.Terminated", result
    with pytest.raises(ProcessLookupError):
        os.kill(runtime_pid, 0)  # the runtime process went with it (its own process for python: reaped)


def test_python_runtime_process_is_a_fresh_one(run_wrapper: Callable[..., Outcome]) -> None:
    """The forked loop looks like `python3 python_loop.py` started anew: unbuffered stdio, its own session,
    stdin on /dev/null, the bundle first on sys.path, and the bundle's modules named like ours importable."""
    out = run_wrapper({"trace.py": """
        import os, sys
        import bootstrap, python_loop  # the bundle's, not the wrapper's
        def handler(event, context):
            return {"mine": [bootstrap.MINE, python_loop.MINE], "path0": sys.path[0],
                    "unbuffered": sys.stdout.write_through and sys.stderr.write_through,
                    "session_leader": os.getsid(0) == os.getpid(), "stdin": os.readlink("/proc/self/fd/0"),
                    "main": sys.modules["__main__"].__name__, "argv": sys.argv}
    """, "bootstrap.py": "MINE = 'b'\n", "python_loop.py": "MINE = 'p'\n"})
    assert out.result["status"] == "ok", out
    answer = out.result["response"]
    assert answer["mine"] == ["b", "p"] and answer["unbuffered"] and answer["session_leader"]
    assert answer["path0"].endswith("task") and answer["stdin"] == "/dev/null"
    assert answer["main"] == "python_loop" and answer["argv"] == [str(RUNTIME_DIR / "python_loop.py")]
    peak = out.result["peak_memory_bytes"]
    assert peak is None or (isinstance(peak, int) and peak > 0)


# ---------------------------------------------------------------- provided runtimes


def fixture_bundle(name: str, tmp_path: Path) -> Path:
    """A copy of a bundle under fixtures/, with its bootstrap executable (as unzipping would make it)."""
    root = Path(shutil.copytree(FIXTURES / name, tmp_path / name))
    (root / "bootstrap").chmod(0o755)
    return root


def test_provided_bash_bootstrap(run_wrapper: Callable[..., Outcome], tmp_path: Path) -> None:
    """A custom runtime with no HTTP client at all: raw HTTP over bash's /dev/tcp."""
    out = run_wrapper(fixture_bundle("bash_bundle", tmp_path), runtime="provided", event={"k": "v"})
    assert out.result["status"] == "ok", out
    assert out.result["response"] == {"via": "bash", "event": {"k": "v"}}


def test_provided_probe_of_runtime_api(run_wrapper: Callable[..., Outcome], tmp_path: Path) -> None:
    """Wrong request id -> 400 JSON, unknown path -> 404, and the `next` headers, seen by a raw client."""
    out = run_wrapper(fixture_bundle("probe_bundle", tmp_path), runtime="provided", event={"p": 1}, timeout_s=15)
    assert out.result["status"] == "ok", out
    report = out.result["response"]
    assert report["next"] == 200 and report["event"] == {"p": 1}
    assert report["arn"].endswith(":function:udf-test")
    assert 0 < report["deadline_left"] <= 15_000
    assert report["trace"].startswith("Root=1-")
    assert report["wrong"][0] == 400 and "errorType" in report["wrong"][1]
    assert report["unknown"] == 404


def test_provided_bootstrap_not_executable(run_wrapper: Callable[..., Outcome], tmp_path: Path) -> None:
    root = tmp_path / "noexec"
    root.mkdir()
    (root / "bootstrap").write_text("#!/bin/sh\nexit 0\n")  # mode 0644: the zip lost its exec bit
    out = run_wrapper(root, runtime="provided")
    assert out.result["status"] == "init_error", out
    assert out.result["error"]["errorType"] == "Runtime.InvalidEntrypoint"


def test_second_next_blocks_after_answer() -> None:
    """Between invocations real Lambda freezes the caller of `next`; ours blocks until the wrapper exits."""
    bootstrap = load_module(RUNTIME_DIR / "bootstrap.py")
    invocation = bootstrap.Invocation("rid-1", b'{"e": 1}', int(time.time() * 1000) + 5000, "fn")
    server = bootstrap.RuntimeAPIServer(invocation)
    server.start()
    port = server.server_address[1]

    def call(method: str, path: str, body: bytes | None = None, timeout: float = 5) -> tuple[int, bytes]:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        try:
            connection.request(method, path, body=body)
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    try:
        assert call("GET", "/2018-06-01/runtime/invocation/next") == (200, b'{"e": 1}')
        assert call("POST", "/2018-06-01/runtime/invocation/rid-1/response", b'{"ok": true}')[0] == 202
        assert invocation.answered.wait(timeout=5) and invocation.status == "ok" and invocation.response == {"ok": True}
        assert call("POST", "/2018-06-01/runtime/invocation/rid-1/error", b"{}")[0] == 400  # already answered
        with pytest.raises(TimeoutError):
            call("GET", "/2018-06-01/runtime/invocation/next", timeout=0.5)
    finally:
        server.stop()


def _read_response(stream: Any) -> tuple[int, dict[str, str], bytes]:
    status = int(stream.readline().split()[1])
    headers = {}
    while (line := stream.readline().decode("latin-1").strip()):
        key, _, value = line.partition(":")
        headers[key.lower()] = value.strip()
    return status, headers, stream.read(int(headers.get("content-length", 0)))


def test_runtime_api_speaks_http_1_1() -> None:
    """The hand-written server with a raw client: pipelined keep-alive requests, Expect: 100-continue with a
    chunked body, and HTTP/1.0 (closed after the answer)."""
    bootstrap = load_module(RUNTIME_DIR / "bootstrap.py")
    invocation = bootstrap.Invocation("rid-2", b'{"e": 2}', int(time.time() * 1000) + 5000, "fn")
    server = bootstrap.RuntimeAPIServer(invocation)
    server.start()
    address = ("127.0.0.1", server.server_address[1])
    api = "/2018-06-01/runtime"
    try:
        with socket.create_connection(address, timeout=5) as sock, sock.makefile("rb") as stream:
            sock.sendall(f"GET {api}/nope HTTP/1.1\r\nHost: x\r\n\r\n"
                         f"GET {api}/invocation/next HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            assert _read_response(stream)[0] == 404
            status, headers, body = _read_response(stream)
            assert (status, body, headers["lambda-runtime-aws-request-id"]) == (200, b'{"e": 2}', "rid-2")
        with socket.create_connection(address, timeout=5) as sock, sock.makefile("rb") as stream:
            sock.sendall(f"POST {api}/invocation/rid-2/response HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                         "Transfer-Encoding: chunked\r\n\r\n".encode())
            assert stream.readline() == b"HTTP/1.1 100 Continue\r\n" and stream.readline() == b"\r\n"
            sock.sendall(b'5\r\n{"ok"\r\n6;ext=1\r\n: true\r\n1\r\n}\r\n0\r\n\r\n')
            assert _read_response(stream)[0] == 202
        assert invocation.answered.wait(timeout=5) and invocation.response == {"ok": True}
        with socket.create_connection(address, timeout=5) as sock, sock.makefile("rb") as stream:
            sock.sendall(f"GET {api}/nope HTTP/1.0\r\n\r\n".encode())
            assert _read_response(stream)[0] == 404
            assert stream.read() == b""  # closed by the server
    finally:
        server.stop()


# ---------------------------------------------------------------- awslambdaric, unmodified


@pytest.fixture(scope="session")
def awslambdaric_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bundle with awslambdaric vendored by pip, built once per session. No pip, no test: FAIL, never skip."""
    root = tmp_path_factory.mktemp("awslambdaric-bundle")
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                           "--no-input", "--target", str(root), "awslambdaric"],
                          capture_output=True, text=True, timeout=600, check=False)
    if proc.returncode != 0:
        pytest.fail(f"pip could not install awslambdaric into the test bundle:\n{proc.stdout}\n{proc.stderr}")
    return write_bundle(root, {
        "bootstrap": "#!/bin/sh\nexec python3 -m awslambdaric trace.handler\n",
        "trace.py": """
            import os
            def handler(event, context):
                if event.get("fail"):
                    raise ValueError("ric says no")
                return {"ric": True, "echo": event, "remaining": context.get_remaining_time_in_millis(),
                        "request_id": context.aws_request_id, "leaked": os.environ.get("SECRET_SHOULD_NOT_LEAK")}
        """,
    })


def test_awslambdaric_runs_unmodified(run_wrapper: Callable[..., Outcome], awslambdaric_bundle: Path) -> None:
    out = run_wrapper(awslambdaric_bundle, runtime="provided", event={"x": 1}, env={"TRACE_REQUEST_ID": "ric-1"})
    assert out.result["status"] == "ok", out
    response = out.result["response"]
    assert response["ric"] is True and response["echo"] == {"x": 1} and response["request_id"] == "ric-1"
    assert response["remaining"] > 0 and response["leaked"] is None
    failed = run_wrapper(awslambdaric_bundle, runtime="provided", event={"fail": True})
    assert failed.result["status"] == "error", failed
    assert failed.result["error"]["errorType"] == "ValueError"
    assert failed.result["error"]["errorMessage"] == "ric says no"


# ---------------------------------------------------------------- SDKs over a unix-socket gateway


@pytest.fixture
def gateway() -> Iterator[Any]:
    """The stand-in gateway (fixtures/gateway_stub.py) on a short-path unix socket (108-byte cap)."""
    folder = tempfile.mkdtemp(prefix="gw-", dir="/tmp")
    stub = load_module(FIXTURES / "gateway_stub.py").GatewayStub(f"{folder}/gateway.sock", TOKEN).start()
    try:
        yield stub
    finally:
        stub.stop()
        shutil.rmtree(folder, ignore_errors=True)


def test_python_sdk(gateway: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    sdk = load_module(RUNTIME_DIR / "trace_sdk.py")
    monkeypatch.setenv("TRACE_GATEWAY", gateway.url)
    monkeypatch.setenv("TRACE_CAPABILITY_TOKEN", TOKEN)
    assert sdk.whoami() == {"task_id": "t1", "org_id": "o1", "fence": 3}
    assert sdk.query("select n from x", limit=1) == [{"n": 1}]
    assert sdk.publish([{"a": 1}, {"a": 2}], dataset="out") == {"accepted": 2, "dataset": "out"}
    assert gateway.requests[1] == {"method": "POST", "path": "/v1/task/query",
                                   "body": {"sql": "select n from x", "limit": 1}}
    with pytest.raises(sdk.GatewayError) as rejected:
        sdk.query("boom")
    error = rejected.value
    assert (error.status, error.code, error.message) == (400, "query_rejected", "only SELECT")
    monkeypatch.setenv("TRACE_CAPABILITY_TOKEN", "forged")
    with pytest.raises(sdk.GatewayError) as unauthorized:
        sdk.whoami()
    assert (unauthorized.value.status, unauthorized.value.code) == (401, "unauthorized")


def test_node_sdk(gateway: Any) -> None:
    env = {"PATH": "/usr/bin:/bin", "NODE_PATH": str(RUNTIME_DIR), "TRACE_GATEWAY": gateway.url,
           "TRACE_CAPABILITY_TOKEN": TOKEN}
    proc = subprocess.run([NODE, str(FIXTURES / "node_sdk_check.js")], env=env, capture_output=True, text=True,
                          timeout=30, check=False)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {
        "who": {"task_id": "t1", "org_id": "o1", "fence": 3},
        "rows": [{"n": 1}],
        "pub": {"accepted": 1, "dataset": "out"},
        "err": {"name": "GatewayError", "status": 400, "code": "query_rejected", "isGatewayError": True},
    }
