"""The sandbox's entry point: serve the AWS Lambda Runtime API for ONE invocation, run the bundle, report.

Why a Runtime API rather than a bespoke stdin/stdout contract: standard Lambda runtime clients
(awslambdaric, the Node runtime, Rust's lambda_runtime, a `provided` bootstrap) then run unmodified.
Why exactly one invocation: every UDF invocation gets a fresh container (see DESIGN.md, "Execution").

Standard library only, imports nothing from the project: this file is copied into the runtime images.

Environment contract (set by the platform):
    TRACE_RUNTIME           python3.11 | nodejs | provided
    _HANDLER                e.g. ``trace.handler`` (ignored by most ``provided`` bootstraps)
    TRACE_EVENT             the event JSON inline; wins over TRACE_EVENT_FILE
    TRACE_EVENT_FILE        path of the event JSON (default /run/trace/event.json)
    TRACE_TIMEOUT_S         deadline in seconds (default 60)
    TRACE_FUNCTION_NAME     default ``trace-udf``
    TRACE_MEMORY_MB         default 512
    TRACE_REQUEST_ID        default a fresh uuid4
    TRACE_RESULT_FILE       where the one result line goes (default /run/trace/result.json)
    TRACE_TASK_ROOT         the unpacked bundle (default /var/task; tests point it elsewhere)
    TRACE_RUNTIME_API_PORT  fixed port for the Runtime API (default: a free one)
    TRACE_CAPABILITY_TOKEN  passed to the runtime process (the only credential)
    TRACE_GATEWAY           passed to the runtime process (default unix:///run/trace/gateway.sock)
    PATH                    passed to the runtime process (default the Debian one)
Everything else in this process's environment stays here.
"""

from __future__ import annotations

import datetime
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

API = "/2018-06-01/runtime"
MAX_RESPONSE_BYTES = 6 * 1024 * 1024  # Lambda's synchronous payload limit
DRAIN_LIMIT_BYTES = 64 * 1024 * 1024  # read (and drop) at most this much of an oversized body
RUNTIME_DIR = os.path.dirname(os.path.abspath(__file__))
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEFAULT_GATEWAY = "unix:///run/trace/gateway.sock"
RESULT_MARKER = "__TRACE_RESULT__"
REGION = "us-east-1"


def _log(message: str) -> None:
    """Wrapper diagnostics go to stderr, which the platform captures with the UDF's logs."""
    print(f"[trace-runtime] {message}", file=sys.stderr, flush=True)


def _error(message: str, error_type: str, stack: list[str] | None = None) -> dict[str, Any]:
    """The Lambda error shape, used for every non-ok outcome so the platform parses one form."""
    return {"errorMessage": message, "errorType": error_type, "stackTrace": list(stack or [])}


class Invocation:
    """The one invocation and its outcome, shared by the HTTP threads and the main thread."""

    def __init__(self, request_id: str, event: bytes, deadline_epoch_ms: int, function_name: str) -> None:
        self.request_id = request_id
        self.event = event
        self.deadline_epoch_ms = deadline_epoch_ms
        self.function_arn = f"arn:aws:lambda:{REGION}:000000000000:function:{function_name}"
        self.trace_id = f"Root=1-{int(time.time()):08x}-{secrets.token_hex(12)};Parent={secrets.token_hex(8)};Sampled=0"
        self.lock = threading.Lock()
        self.handed_out = False
        self.status: str | None = None  # ok | error | init_error, once answered
        self.response: Any = None
        self.error: dict[str, Any] | None = None
        self.answered = threading.Event()  # the runtime answered (or reported init error)
        self.closing = threading.Event()  # the wrapper is exiting: release blocked `next` calls

    def record(self, status: str, response: Any = None, error: dict[str, Any] | None = None) -> bool:
        """Keep the FIRST answer only: a second answer to one invocation is a client bug, not an outcome."""
        with self.lock:
            if self.status is not None:
                return False
            self.status, self.response, self.error = status, response, error
            return True


def _normalize_error(body: bytes, header_type: str | None) -> dict[str, Any]:
    """Runtime clients post errors loosely (non-JSON, missing keys, a string stack): make them one shape."""
    try:
        data = json.loads(body.decode("utf-8")) if body else {}
    except (UnicodeDecodeError, ValueError):
        data = {"errorMessage": body.decode("utf-8", "replace")}
    if not isinstance(data, dict):
        data = {"errorMessage": json.dumps(data)}
    stack = data.get("stackTrace") or []
    if isinstance(stack, str):
        stack = stack.splitlines()
    return _error(str(data.get("errorMessage", "")), str(data.get("errorType") or header_type or "Runtime.Unknown"),
                  [s if isinstance(s, str) else json.dumps(s) for s in stack] if isinstance(stack, list) else [])


def _parse_response(body: bytes) -> Any:
    """The handler's result as JSON where it is JSON, else the raw text (a `provided` runtime may send any bytes)."""
    text = body.decode("utf-8", "replace")
    try:
        return json.loads(text)
    except ValueError:
        return text


class RuntimeAPIHandler(BaseHTTPRequestHandler):
    """The Runtime API (2018-06-01) routes, for the one invocation held by ``server.invocation``."""

    protocol_version = "HTTP/1.1"  # keep-alive: curl-based clients (awslambdaric) reuse connections
    server: RuntimeAPIServer

    def log_message(self, format: str, *args: Any) -> None:
        """Silence per-request access logs: the runtime's stdout/stderr belong to the UDF."""

    def _send(self, code: int, payload: Any, headers: dict[str, str] | None = None, body: bytes | None = None) -> None:
        data = body if body is not None else json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def _fail(self, code: int, error_type: str, message: str) -> None:
        self._send(code, {"errorType": error_type, "errorMessage": message})

    def _read_body(self) -> bytes | None:
        """The request body (Content-Length or chunked); None if it is over the 6 MB limit (it is drained)."""
        chunks: list[bytes] = []
        total = 0
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                piece = self.rfile.read(size)
                self.rfile.readline()
                total += len(piece)
                if total > DRAIN_LIMIT_BYTES:
                    self.close_connection = True
                    return None
                if total <= MAX_RESPONSE_BYTES:
                    chunks.append(piece)
        else:
            remaining = int(self.headers.get("Content-Length") or 0)
            if remaining > DRAIN_LIMIT_BYTES:
                self.close_connection = True
                return None
            total = remaining
            while remaining > 0:
                piece = self.rfile.read(min(remaining, 1 << 20))
                if not piece:
                    break
                remaining -= len(piece)
                if total <= MAX_RESPONSE_BYTES:
                    chunks.append(piece)
        return None if total > MAX_RESPONSE_BYTES else b"".join(chunks)

    def do_GET(self) -> None:
        inv = self.server.invocation
        if self.path != f"{API}/invocation/next":
            self._fail(404, "NotFound", f"no route GET {self.path}")
            return
        with inv.lock:
            first = not inv.handed_out
            inv.handed_out = True
        if not first:
            # Real Lambda freezes the sandbox here until the next event; ours never comes: block until exit.
            inv.closing.wait()
            self.close_connection = True
            return
        headers = {
            "Lambda-Runtime-Aws-Request-Id": inv.request_id,
            "Lambda-Runtime-Deadline-Ms": str(inv.deadline_epoch_ms),
            "Lambda-Runtime-Invoked-Function-Arn": inv.function_arn,
            "Lambda-Runtime-Trace-Id": inv.trace_id,
        }
        self._send(200, None, headers, body=inv.event)

    def do_POST(self) -> None:
        inv = self.server.invocation
        path = self.path
        if path == f"{API}/init/error":
            kind = "init_error"
        elif path.startswith(f"{API}/invocation/") and path.endswith(("/response", "/error")):
            kind = "response" if path.endswith("/response") else "error"
            request_id = path[len(f"{API}/invocation/"):].rsplit("/", 1)[0]
            if request_id != inv.request_id:
                self._read_body()
                self._fail(400, "InvalidRequestID", f"unknown request id {request_id!r}")
                return
        else:
            self._read_body()
            self._fail(404, "NotFound", f"no route POST {path}")
            return
        body = self._read_body()
        try:
            if body is None:
                message = f"{kind} body exceeds the limit of {MAX_RESPONSE_BYTES} bytes"
                inv.record("error", error=_error(message, "result_too_large"))
                self._fail(413, "RequestEntityTooLarge", message)
                return
            header_type = self.headers.get("Lambda-Runtime-Function-Error-Type")
            if kind == "response":
                recorded = inv.record("ok", response=_parse_response(body))
            else:
                recorded = inv.record("error" if kind == "error" else "init_error",
                                      error=_normalize_error(body, header_type))
            if recorded:
                self._send(202, {"status": "OK"})
            else:
                self._fail(400, "InvalidStateTransition", "the invocation was already answered")
        finally:
            inv.answered.set()


class RuntimeAPIServer(ThreadingHTTPServer):
    """Loopback-only HTTP server; handler threads are daemons so a blocked `next` never holds up exit."""

    daemon_threads = True

    def __init__(self, invocation: Invocation, port: int = 0) -> None:
        self.invocation = invocation
        super().__init__(("127.0.0.1", port), RuntimeAPIHandler)

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        thread.start()
        return thread

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A runtime stopped mid-request (normal once it answered) resets its connection: no traceback in the
        UDF's logs for that; anything else is still reported."""
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)

    def stop(self) -> None:
        self.invocation.closing.set()
        self.shutdown()
        self.server_close()


def child_environment(runtime: str, handler: str, task_root: str, port: int, env: dict[str, str]) -> dict[str, str]:
    """The Lambda environment for the runtime process, built from scratch so nothing else leaks in."""
    name = env.get("TRACE_FUNCTION_NAME") or "trace-udf"
    request_id = env.get("TRACE_REQUEST_ID") or ""
    search_path = f"{task_root}:{RUNTIME_DIR}"  # the SDK importable without vendoring it
    child = {
        "_HANDLER": handler,
        "LAMBDA_TASK_ROOT": task_root,
        "LAMBDA_RUNTIME_DIR": RUNTIME_DIR,
        "AWS_LAMBDA_RUNTIME_API": f"127.0.0.1:{port}",
        "AWS_LAMBDA_FUNCTION_NAME": name,
        "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": env.get("TRACE_MEMORY_MB") or "512",
        "AWS_LAMBDA_FUNCTION_VERSION": "$LATEST",
        "AWS_LAMBDA_LOG_GROUP_NAME": f"/aws/lambda/{name}",
        "AWS_LAMBDA_LOG_STREAM_NAME": f"{datetime.datetime.now(datetime.UTC):%Y/%m/%d}/[$LATEST]{request_id}",
        "AWS_REGION": REGION,
        "AWS_DEFAULT_REGION": REGION,
        "TZ": "UTC",
        "LANG": "C.UTF-8",
        "PATH": env.get("PATH") or DEFAULT_PATH,
        "HOME": "/tmp",
        "TRACE_GATEWAY": env.get("TRACE_GATEWAY") or DEFAULT_GATEWAY,
        "PYTHONPATH": search_path,
        "NODE_PATH": search_path,
    }
    if runtime == "python3.11":
        child["PYTHONUNBUFFERED"] = "1"  # logs reach the platform in order, even if the process is killed
        child["PYTHONDONTWRITEBYTECODE"] = "1"  # the task root is read-only
    if "TRACE_CAPABILITY_TOKEN" in env:
        child["TRACE_CAPABILITY_TOKEN"] = env["TRACE_CAPABILITY_TOKEN"]
    return child


def runtime_command(runtime: str, task_root: str) -> list[str]:
    """The runtime process for a runtime name; raises ValueError with the Lambda error type as its first arg."""
    if runtime == "python3.11":
        return [sys.executable, os.path.join(RUNTIME_DIR, "python_loop.py")]
    if runtime == "nodejs":
        return ["node", os.path.join(RUNTIME_DIR, "node_loop.js")]
    if runtime == "provided":
        path = os.path.join(task_root, "bootstrap")
        if not os.path.isfile(path) or not os.access(path, os.X_OK):
            raise ValueError("Runtime.InvalidEntrypoint", f"{path} is missing or not executable")
        return [path]
    raise ValueError("Runtime.InvalidRuntime", f"unknown runtime {runtime!r} (python3.11 | nodejs | provided)")


def load_event(env: dict[str, str]) -> bytes:
    """The event bytes, checked to be JSON so a platform bug shows up as one clear error."""
    if env.get("TRACE_EVENT") is not None:
        raw = env["TRACE_EVENT"].encode()
    else:
        with open(env.get("TRACE_EVENT_FILE") or "/run/trace/event.json", "rb") as handle:
            raw = handle.read()
    json.loads(raw)
    return raw


def terminate(child: subprocess.Popen[bytes]) -> None:
    """SIGTERM then SIGKILL after 1 s, to the child's whole process group (a bootstrap script's children too)."""
    for sig, grace in ((signal.SIGTERM, 1.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(child.pid, sig)
        except ProcessLookupError:
            pass
        try:
            child.wait(timeout=grace)
            break
        except subprocess.TimeoutExpired:
            continue


def write_result(result: dict[str, Any], env: dict[str, str]) -> None:
    """One JSON line to the result file; stdout after a marker line if the file cannot be written."""
    line = json.dumps(result, default=str) + "\n"
    try:
        with open(env.get("TRACE_RESULT_FILE") or "/run/trace/result.json", "w", encoding="utf-8") as handle:
            handle.write(line)
    except OSError as exc:
        _log(f"cannot write the result file ({exc}); printing it to stdout")
        sys.stdout.write(f"{RESULT_MARKER}\n{line}")
        sys.stdout.flush()


def run(env: dict[str, str]) -> dict[str, Any]:
    """Run one invocation end to end and return the result document."""
    started = time.monotonic()
    timeout_s = float(env.get("TRACE_TIMEOUT_S") or 60)
    deadline = started + timeout_s

    outcome_at: list[float] = []  # when the outcome was known: clean-up (the kill grace) is not the UDF's time

    def result(status: str, error: dict[str, Any] | None = None, response: Any = None,
               exit_code: int | None = None) -> dict[str, Any]:
        ended = outcome_at[0] if outcome_at else time.monotonic()
        return {"status": status, "response": response, "error": error,
                "duration_ms": round((ended - started) * 1000, 3), "exit_code": exit_code}

    runtime = env.get("TRACE_RUNTIME") or "python3.11"
    task_root = env.get("TRACE_TASK_ROOT") or "/var/task"
    try:
        event = load_event(env)
    except (OSError, ValueError) as exc:
        return result("error", _error(f"cannot read the event: {exc}", "Trace.InvalidEvent"))
    try:
        command = runtime_command(runtime, task_root)
    except ValueError as exc:
        return result("init_error", _error(exc.args[1], exc.args[0]))

    request_id = env.get("TRACE_REQUEST_ID") or str(uuid.uuid4())
    env = {**env, "TRACE_REQUEST_ID": request_id}
    invocation = Invocation(request_id, event, int((time.time() + timeout_s) * 1000),
                            env.get("TRACE_FUNCTION_NAME") or "trace-udf")
    server = RuntimeAPIServer(invocation, int(env.get("TRACE_RUNTIME_API_PORT") or 0))
    server.start()
    child_env = child_environment(runtime, env.get("_HANDLER", ""), task_root, server.server_address[1], env)
    try:
        child = subprocess.Popen(command, env=child_env, cwd=task_root, stdin=subprocess.DEVNULL,
                                 start_new_session=True)
    except OSError as exc:
        server.stop()
        return result("init_error", _error(f"cannot start {command[0]}: {exc}", "Runtime.InvalidEntrypoint"))

    def watch_child() -> None:
        child.wait()
        invocation.answered.set()

    threading.Thread(target=watch_child, daemon=True).start()
    signal.signal(signal.SIGTERM, lambda *_: invocation.answered.set())
    invocation.answered.wait(timeout=max(0.0, deadline - time.monotonic()))
    outcome_at.append(time.monotonic())
    exit_code = child.poll()  # read before we stop it: only a code of its own making is reported
    terminate(child)
    server.stop()
    with invocation.lock:
        status, response, error = invocation.status, invocation.response, invocation.error
    if status is not None:
        return result(status, error, response, exit_code)
    if exit_code is not None:
        how = f"exit status {exit_code}" if exit_code >= 0 else f"signal {signal.Signals(-exit_code).name}"
        return result("exited", _error(f"Runtime exited without answering: {how}", "Runtime.ExitError"),
                      exit_code=exit_code)
    if time.monotonic() >= deadline:
        return result("timeout", _error(f"Task timed out after {timeout_s:.2f} seconds", "Sandbox.Timedout"))
    return result("error", _error("the wrapper was terminated", "Sandbox.Terminated"))


def main() -> int:
    """Entry point: exit 0 only for an ok outcome, so `docker wait` alone tells success."""
    env = dict(os.environ)
    try:
        outcome = run(env)
    except Exception as exc:  # the platform must always get a result line
        outcome = {"status": "error", "response": None, "error": _error(repr(exc), "Trace.WrapperError"),
                   "duration_ms": 0.0, "exit_code": None}
    write_result(outcome, env)
    return 0 if outcome["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
