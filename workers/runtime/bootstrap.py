"""The sandbox's entry point: serve the AWS Lambda Runtime API for ONE invocation, run the bundle, report.

Why a Runtime API rather than a bespoke stdin/stdout contract: standard Lambda runtime clients
(awslambdaric, the Node runtime, Rust's lambda_runtime, a `provided` bootstrap) then run unmodified.
Why exactly one invocation: every UDF invocation gets a fresh container (see DESIGN.md, "Execution").

Standard library only, imports nothing from the project: this file is copied into the runtime images.

Why it is lean: the sandbox runs under a CFS quota (0.25 vCPU = 25 ms of CPU per 100 ms period).
Starting the container already spends ~22 ms of that budget inside the container's cgroup and the
interpreter ~8 ms more; every millisecond of CPU beyond the first period's budget costs wall time
at 4x, in whole periods. So the hot path imports only C modules (``_socket``, ``select``, ``_json``,
``_signal``; not http.server, http.client, subprocess, json, signal, threading or typing: ~60 ms of CPU
between them, much of it ``enum`` and ``re``), speaks HTTP/1.1 with a small single-threaded ``poll``
loop, and does not start a second interpreter for Python handlers:

    python3.11  the built-in loop (python_loop.py) runs in a FORK of this process: no interpreter
                start and no imports to pay twice, yet still a process of its own (``os._exit``, a
                crash, signal handlers, a SIGTERM that is ignored and the process-group kill keep
                their meaning), in its own session, with stdin on /dev/null, unbuffered stdio, and
                an ``os.environ`` rebuilt from the contract below before the handler is imported. It
                is a real Runtime API client: it GETs ``next`` and POSTs its answer over loopback.
    nodejs      ``node node_loop.js`` as a child process (the Docker backend runs node_bootstrap.js
                instead: the same contract written in Node, so no Python starts in a Node sandbox).
    provided    the bundle's executable ``bootstrap`` as a child process.

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

The result document (one JSON line): status (ok | error | init_error | timeout | exited), response,
error ({errorMessage, errorType, stackTrace}), duration_ms, exit_code, and peak_memory_bytes (the
sandbox's memory high-water mark from its cgroup, v1 or v2; null where unreadable).
"""

from __future__ import annotations

import _json
import _signal
import _socket
import os
import select
import sys
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

API = "/2018-06-01/runtime"
MAX_RESPONSE_BYTES = 6 * 1024 * 1024  # Lambda's synchronous payload limit
DRAIN_LIMIT_BYTES = 64 * 1024 * 1024  # read (and drop) at most this much of an oversized body
MAX_HEAD_BYTES = 64 * 1024  # request line and headers
RUNTIME_DIR = os.path.dirname(os.path.abspath(__file__))
PYTHON_LOOP = os.path.join(RUNTIME_DIR, "python_loop.py")
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEFAULT_GATEWAY = "unix:///run/trace/gateway.sock"
RESULT_MARKER = "__TRACE_RESULT__"
REGION = "us-east-1"
# The sandbox's memory high-water mark: cgroup v1 (Docker on a v1 host), then v2.
PEAK_MEMORY_FILES = ("/sys/fs/cgroup/memory/memory.max_usage_in_bytes", "/sys/fs/cgroup/memory.peak")


def _log(message: str) -> None:
    """Wrapper diagnostics go to stderr, which the platform captures with the UDF's logs."""
    print(f"[trace-runtime] {message}", file=sys.stderr, flush=True)


def _error(message: str, error_type: str, stack: list[str] | None = None) -> dict[str, Any]:
    """The Lambda error shape, used for every non-ok outcome so the platform parses one form."""
    return {"errorMessage": message, "errorType": error_type, "stackTrace": list(stack or [])}


# ---------------------------------------------------------------- JSON on the C accelerator alone
# The `json` package imports `re` (and with it `enum`): ~8 ms of CPU in the sandbox. Its C core does
# the work either way; these two functions call it directly, with json.loads / json.dumps defaults.

_CONSTANTS = {"-Infinity": float("-inf"), "Infinity": float("inf"), "NaN": float("nan")}
_WHITESPACE = " \t\n\r"


class _DecoderSettings:
    """What ``_json.make_scanner`` reads from a decoder: json.JSONDecoder's defaults."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = _CONSTANTS.__getitem__


_scan_once = _json.make_scanner(_DecoderSettings())


def json_loads(data: bytes | bytearray | str) -> Any:
    """``json.loads``: a whole document, surrounding white space allowed; ValueError when it is not JSON."""
    text = data.decode("utf-8", "surrogatepass") if isinstance(data, (bytes, bytearray)) else data
    start = len(text) - len(text.lstrip(_WHITESPACE))
    try:
        value, end = _scan_once(text, start)
    except StopIteration as exc:
        raise ValueError(f"Expecting value: char {exc.value}") from None
    if text[end:].strip(_WHITESPACE):
        raise ValueError(f"Extra data: char {end}")
    return value


def _not_serializable(value: Any) -> Any:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def json_dumps(value: Any, default: Callable[[Any], Any] | None = None) -> str:
    """``json.dumps(value, default=default)`` (ASCII, NaN allowed, circular references refused)."""
    encode = _json.make_encoder({}, default or _not_serializable, _json.encode_basestring_ascii, None, ": ", ", ",
                                False, False, True)
    return "".join(encode(value, 0))


def _uuid4() -> str:
    raw = bytearray(os.urandom(16))
    raw[6] = (raw[6] & 0x0F) | 0x40
    raw[8] = (raw[8] & 0x3F) | 0x80
    text = raw.hex()
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"


# ---------------------------------------------------------------- the invocation


class Invocation:
    """The one invocation and its outcome, as the Runtime API hands it out and records its answer."""

    def __init__(self, request_id: str, event: bytes, deadline_epoch_ms: int, function_name: str) -> None:
        self.request_id = request_id
        self.event = event
        self.deadline_epoch_ms = deadline_epoch_ms
        self.function_arn = f"arn:aws:lambda:{REGION}:000000000000:function:{function_name}"
        self.trace_id = f"Root=1-{int(time.time()):08x}-{os.urandom(12).hex()};Parent={os.urandom(8).hex()};Sampled=0"
        self.handed_out = False
        self.status: str | None = None  # ok | error | init_error, once answered
        self.response: Any = None
        self.error: dict[str, Any] | None = None
        self._answered = False
        self._answered_event: Any = None  # a threading.Event, made only when someone waits from a thread

    def next_headers(self) -> dict[str, str]:
        return {
            "Lambda-Runtime-Aws-Request-Id": self.request_id,
            "Lambda-Runtime-Deadline-Ms": str(self.deadline_epoch_ms),
            "Lambda-Runtime-Invoked-Function-Arn": self.function_arn,
            "Lambda-Runtime-Trace-Id": self.trace_id,
        }

    def record(self, status: str, response: Any = None, error: dict[str, Any] | None = None) -> bool:
        """Keep the FIRST answer only: a second answer to one invocation is a client bug, not an outcome."""
        if self.status is not None:
            return False
        self.status, self.response, self.error = status, response, error
        return True

    def mark_answered(self) -> None:
        self._answered = True
        if self._answered_event is not None:
            self._answered_event.set()

    @property
    def answered(self) -> Any:
        """A threading.Event set once the runtime answered (for callers that serve from a thread)."""
        if self._answered_event is None:
            import threading

            event = threading.Event()
            self._answered_event = event
            if self._answered:
                event.set()
        return self._answered_event


def _normalize_error(body: bytes, header_type: str | None) -> dict[str, Any]:
    """Runtime clients post errors loosely (non-JSON, missing keys, a string stack): make them one shape."""
    try:
        data = json_loads(body) if body else {}
    except (UnicodeDecodeError, ValueError):
        data = {"errorMessage": body.decode("utf-8", "replace")}
    if not isinstance(data, dict):
        data = {"errorMessage": json_dumps(data)}
    stack = data.get("stackTrace") or []
    if isinstance(stack, str):
        stack = stack.splitlines()
    return _error(str(data.get("errorMessage", "")), str(data.get("errorType") or header_type or "Runtime.Unknown"),
                  [s if isinstance(s, str) else json_dumps(s) for s in stack] if isinstance(stack, list) else [])


def _parse_response(body: bytes) -> Any:
    """The handler's result as JSON where it is JSON, else the raw text (a `provided` runtime may send any bytes)."""
    text = body.decode("utf-8", "replace")
    try:
        return json_loads(text)
    except ValueError:
        return text


# ---------------------------------------------------------------- the Runtime API server (HTTP/1.1)

_REASONS = {100: "Continue", 200: "OK", 202: "Accepted", 400: "Bad Request", 404: "Not Found",
            413: "Request Entity Too Large", 431: "Request Header Fields Too Large", 501: "Not Implemented"}


class _Request:
    __slots__ = ("body", "chunk_left", "chunk_state", "chunked", "close", "headers", "kept", "method", "path",
                 "remaining", "too_large", "total")

    def __init__(self, method: str, path: str, headers: dict[str, str]) -> None:
        self.method, self.path, self.headers = method, path, headers
        self.body: list[bytes] = []
        self.total = 0  # body bytes seen
        self.kept = True  # False once the body is over MAX_RESPONSE_BYTES (the rest is drained, not kept)
        self.too_large = False  # over DRAIN_LIMIT_BYTES: not read at all, the connection is closed
        self.chunked = headers.get("transfer-encoding", "").lower() == "chunked"
        self.remaining = 0 if self.chunked else int(headers.get("content-length") or 0)
        self.chunk_state = "size"  # size | data | data-end | trailer
        self.chunk_left = 0
        self.close = False  # answer with Connection: close and close (the client asked, HTTP/1.0, unread body)

    def take(self, piece: bytes) -> None:
        self.total += len(piece)
        if self.total > MAX_RESPONSE_BYTES:
            self.kept = False
            self.body.clear()
        elif self.kept:
            self.body.append(piece)

    def payload(self) -> bytes | None:
        """The body; None when it is over the 6 MB limit."""
        return b"".join(self.body) if self.kept and not self.too_large else None


class _Connection:
    __slots__ = ("close_after", "held", "inbuf", "outbuf", "request", "sock")

    def __init__(self, sock: Any) -> None:
        self.sock = sock
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.request: _Request | None = None
        self.close_after = False  # close once outbuf is flushed (Connection: close, HTTP/1.0, errors)
        self.held = False  # a second `next`: never answered, held until the wrapper exits


class RuntimeAPIServer:
    """The Runtime API (2018-06-01) for the one invocation held by ``invocation``, on loopback.

    Single-threaded: :meth:`poll_once` serves whatever is ready (and runs watched fds' callbacks);
    the wrapper drives it from its main loop. :meth:`start` serves from a thread instead, for callers
    that want a server in the background (tests)."""

    def __init__(self, invocation: Invocation, port: int = 0) -> None:
        self.invocation = invocation
        listener = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
        try:
            listener.setsockopt(_socket.SOL_SOCKET, _socket.SO_REUSEADDR, 1)
            listener.bind(("127.0.0.1", port))
            listener.listen(64)
            listener.setblocking(False)
        except OSError:
            listener.close()
            raise
        self._listener = listener
        self.server_address: tuple[str, int] = listener.getsockname()
        self._poller = select.poll()
        self._poller.register(listener.fileno(), select.POLLIN)
        self._connections: dict[int, _Connection] = {}
        self._watched: dict[int, Callable[[], None]] = {}
        self._thread: Any = None
        self._wake: tuple[int, int] | None = None
        self._stopping = False
        self._closed = False

    # -- the loop

    def watch(self, fd: int, callback: Callable[[], None]) -> None:
        """Call ``callback`` from the loop whenever ``fd`` is readable."""
        self._watched[fd] = callback
        self._poller.register(fd, select.POLLIN)

    def unwatch(self, fd: int) -> None:
        """Forget ``fd`` (before it is closed: its number may come back as a connection's)."""
        if self._watched.pop(fd, None) is not None:
            self._poller.unregister(fd)

    def poll_once(self, timeout_s: float | None) -> bool:
        """Serve what is ready, waiting up to ``timeout_s`` (None: until something is); True if anything was."""
        timeout_ms = None if timeout_s is None else max(0, int(timeout_s * 1000) + (timeout_s > 0))
        events = self._poller.poll(timeout_ms)
        for fd, mask in events:
            if fd == self._listener.fileno():
                self._accept()
            elif fd in self._watched:
                self._watched[fd]()
            else:
                connection = self._connections.get(fd)
                if connection is None:
                    continue
                if mask & select.POLLOUT:
                    self._flush(connection)
                if mask & (select.POLLIN | select.POLLHUP | select.POLLERR) and fd in self._connections:
                    self._read(connection)
        return bool(events)

    def drain(self) -> None:
        """Serve what is already waiting (a request in flight when the runtime exited), without blocking."""
        for _ in range(8):
            if not self.poll_once(0):
                return

    def start(self) -> Any:
        """Serve from a daemon thread until :meth:`stop`."""
        import threading

        read_end, write_end = os.pipe()
        self._wake = (read_end, write_end)
        self.watch(read_end, lambda: os.read(read_end, 512))

        def serve() -> None:
            while not self._stopping:
                self.poll_once(None)

        self._thread = threading.Thread(target=serve, name="runtime-api", daemon=True)
        self._thread.start()
        return self._thread

    def stop(self) -> None:
        """Close every connection (a held `next` sees its connection close) and the listener."""
        if self._thread is not None and self._wake is not None:
            self._stopping = True
            os.write(self._wake[1], b"x")
            self._thread.join(timeout=5)
            for fd in self._wake:
                os.close(fd)
            self._wake = None
        self.close()

    def close(self) -> None:
        """Close the sockets without any shutdown (also right for a forked child's copies)."""
        if self._closed:
            return
        self._closed = True
        for connection in list(self._connections.values()):
            connection.sock.close()
        self._connections.clear()
        self._listener.close()

    # -- connections

    def _accept(self) -> None:
        while True:
            try:
                fd, _ = self._listener._accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # e.g. the peer reset before we accepted
            sock = _socket.socket(fileno=fd)
            sock.setblocking(False)
            self._connections[fd] = _Connection(sock)
            self._poller.register(fd, select.POLLIN)

    def _drop(self, connection: _Connection) -> None:
        fd = connection.sock.fileno()
        self._connections.pop(fd, None)
        try:
            self._poller.unregister(fd)
        except (KeyError, ValueError):
            pass
        connection.sock.close()

    def _read(self, connection: _Connection) -> None:
        try:
            data = connection.sock.recv(1 << 20)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""  # reset by the peer: a runtime stopped mid-request, normal once it answered
        if not data:
            self._drop(connection)
            return
        if connection.close_after:
            return  # a response that closes the connection is pending: ignore anything else it sends
        connection.inbuf += data
        self._process(connection)

    def _flush(self, connection: _Connection) -> None:
        while connection.outbuf:
            try:
                sent = connection.sock.send(connection.outbuf)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self._drop(connection)
                return
            del connection.outbuf[:sent]
        fd = connection.sock.fileno()
        if connection.outbuf:
            self._poller.modify(fd, select.POLLIN | select.POLLOUT)
            return
        if connection.close_after:
            self._drop(connection)
            return
        self._poller.modify(fd, select.POLLIN)

    def _process(self, connection: _Connection) -> None:
        """Parse and answer every complete request in the connection's buffer."""
        buf = connection.inbuf
        while not connection.held and not connection.close_after:
            request = connection.request
            if request is None:
                while buf[:2] == b"\r\n" or buf[:1] == b"\n":  # stray line ends between requests
                    del buf[: 2 if buf[:2] == b"\r\n" else 1]
                end, size = buf.find(b"\r\n\r\n"), 4
                bare = buf.find(b"\n\n")
                if bare >= 0 and (end < 0 or bare < end):
                    end, size = bare, 2
                if end < 0:
                    if len(buf) > MAX_HEAD_BYTES:
                        self._send(connection, 431, {"errorType": "HeaderTooLarge",
                                                     "errorMessage": "headers too large"}, close=True)
                    return
                head = bytes(buf[:end]).decode("latin-1")
                del buf[: end + size]
                request = self._parse_head(connection, head)
                if request is None:
                    return
                connection.request = request
            if not self._read_body(request, buf):
                return
            connection.request = None
            self._dispatch(connection, request)

    def _parse_head(self, connection: _Connection, head: str) -> _Request | None:
        lines = head.replace("\r\n", "\n").split("\n")
        parts = lines[0].split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            self._send(connection, 400, {"errorType": "BadRequest", "errorMessage": f"bad request line {lines[0]!r}"},
                       close=True)
            return None
        method, path, version = parts
        headers: dict[str, str] = {}
        for line in lines[1:]:
            key, colon, value = line.partition(":")
            if colon:
                headers[key.strip().lower()] = value.strip()
        token = headers.get("connection", "").lower()
        request = _Request(method, path, headers)
        request.close = token == "close" or (version == "HTTP/1.0" and token != "keep-alive")
        try:
            length = int(headers.get("content-length") or 0)
        except ValueError:
            self._send(connection, 400, {"errorType": "BadRequest", "errorMessage": "bad Content-Length"}, close=True)
            return None
        if not request.chunked and length > DRAIN_LIMIT_BYTES:
            request.too_large = True
            request.remaining = 0
            request.close = True  # the body is not read: the connection cannot be reused
        elif headers.get("expect", "").lower() == "100-continue" and (length or request.chunked):
            connection.outbuf += b"HTTP/1.1 100 Continue\r\n\r\n"
            self._flush(connection)
        return request

    def _read_body(self, request: _Request, buf: bytearray) -> bool:
        """Move body bytes from ``buf`` into the request; True once the body is complete."""
        if not request.chunked:
            if request.remaining:
                piece = bytes(buf[: request.remaining])
                del buf[: len(piece)]
                request.remaining -= len(piece)
                request.take(piece)
            return request.remaining == 0
        while True:
            if request.chunk_state in ("size", "trailer"):
                end = buf.find(b"\n")
                if end < 0:
                    return False
                line = bytes(buf[:end]).strip()
                del buf[: end + 1]
                if request.chunk_state == "trailer":
                    if not line:
                        return True
                    continue
                try:
                    size = int(line.split(b";")[0].strip() or b"0", 16)
                except ValueError:
                    size = 0
                if size == 0:
                    request.chunk_state = "trailer"
                    continue
                request.chunk_left, request.chunk_state = size, "data"
            elif request.chunk_state == "data":
                if not buf:
                    return False
                piece = bytes(buf[: request.chunk_left])
                del buf[: len(piece)]
                request.chunk_left -= len(piece)
                request.take(piece)
                if request.total > DRAIN_LIMIT_BYTES:
                    request.too_large = True
                    request.close = True
                    return True
                if request.chunk_left == 0:
                    request.chunk_state = "data-end"
            else:  # the line end after a chunk's data
                end = buf.find(b"\n")
                if end < 0:
                    return False
                del buf[: end + 1]
                request.chunk_state = "size"

    def _send(self, connection: _Connection, code: int, payload: Any, headers: dict[str, str] | None = None,
              body: bytes | None = None, close: bool = False) -> None:
        data = body if body is not None else json_dumps(payload).encode()
        lines = [f"HTTP/1.1 {code} {_REASONS.get(code, 'Status')}", "Content-Type: application/json",
                 f"Content-Length: {len(data)}"]
        lines += [f"{key}: {value}" for key, value in (headers or {}).items()]
        if close:
            lines.append("Connection: close")
            connection.close_after = True
        connection.outbuf += ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + data
        self._flush(connection)

    def _fail(self, connection: _Connection, request: _Request, code: int, error_type: str, message: str) -> None:
        self._send(connection, code, {"errorType": error_type, "errorMessage": message},
                   close=request.close)

    def _dispatch(self, connection: _Connection, request: _Request) -> None:
        inv = self.invocation
        close = request.close
        path = request.path
        if request.method == "GET":
            if path != f"{API}/invocation/next":
                self._fail(connection, request, 404, "NotFound", f"no route GET {path}")
                return
            if inv.handed_out:
                # Real Lambda freezes the sandbox here until the next event; ours never comes: hold it until exit.
                connection.held = True
                return
            inv.handed_out = True
            self._send(connection, 200, None, inv.next_headers(), body=inv.event, close=close)
            return
        if request.method != "POST":
            self._fail(connection, request, 501, "NotImplemented", f"unsupported method {request.method}")
            return
        if path == f"{API}/init/error":
            kind = "init_error"
        elif path.startswith(f"{API}/invocation/") and path.endswith(("/response", "/error")):
            kind = "response" if path.endswith("/response") else "error"
            request_id = path[len(f"{API}/invocation/"):].rsplit("/", 1)[0]
            if request_id != inv.request_id:
                self._fail(connection, request, 400, "InvalidRequestID", f"unknown request id {request_id!r}")
                return
        else:
            self._fail(connection, request, 404, "NotFound", f"no route POST {path}")
            return
        body = request.payload()
        try:
            if body is None:
                message = f"{kind} body exceeds the limit of {MAX_RESPONSE_BYTES} bytes"
                inv.record("error", error=_error(message, "result_too_large"))
                self._send(connection, 413, {"errorType": "RequestEntityTooLarge", "errorMessage": message},
                           close=close)
                return
            if kind == "response":
                recorded = inv.record("ok", response=_parse_response(body))
            else:
                error_type = request.headers.get("lambda-runtime-function-error-type")
                recorded = inv.record("error" if kind == "error" else "init_error",
                                      error=_normalize_error(body, error_type))
            if recorded:
                self._send(connection, 202, {"status": "OK"}, close=close)
            else:
                self._fail(connection, request, 400, "InvalidStateTransition", "the invocation was already answered")
        finally:
            inv.mark_answered()


# ---------------------------------------------------------------- the runtime process


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
        "AWS_LAMBDA_LOG_STREAM_NAME": f"{time.strftime('%Y/%m/%d', time.gmtime())}/[$LATEST]{request_id}",
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


def runtime_command(runtime: str, task_root: str) -> list[str] | None:
    """The runtime process for a runtime name (None: the forked Python loop); raises ValueError with the
    Lambda error type as its first arg."""
    if runtime == "python3.11":
        return None
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
    json_loads(raw)
    return raw


class Child:
    """The runtime process: its pid, a pidfd to wait on where the kernel has them, its exit code once reaped."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        try:
            self.fd: int | None = os.pidfd_open(pid)
        except (AttributeError, OSError):
            self.fd = None

    def poll(self) -> int | None:
        """The exit code (negative: killed by that signal) if it ended; reaps it."""
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                return self.returncode
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
                self.close()
        return self.returncode

    def wait(self, timeout: float) -> int | None:
        deadline = time.monotonic() + timeout
        while self.poll() is None:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            if self.fd is not None:
                waiter = select.poll()
                waiter.register(self.fd, select.POLLIN)
                waiter.poll(int(left * 1000) + 1)
            else:
                time.sleep(min(0.005, left))
        return self.returncode

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def terminate(child: Child) -> None:
    """SIGTERM then SIGKILL after 1 s, to the child's whole process group (a bootstrap script's children too)."""
    for sig, grace in ((_signal.SIGTERM, 1.0), (_signal.SIGKILL, 5.0)):
        try:
            os.killpg(child.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        if child.returncode is None:
            try:
                os.kill(child.pid, sig)  # also before it made its own session (a kill right after the fork)
            except (ProcessLookupError, PermissionError):
                pass
        if child.wait(grace) is not None:
            break


def _signal_name(number: int) -> str:
    """SIGKILL for 9 (the `signal` module would cost its enum import on every start)."""
    for name in dir(_signal):
        if name.startswith("SIG") and not name.startswith(("SIG_", "SIGRT")) and getattr(_signal, name) == number:
            return name
    return str(number)


def _flush_stdio() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):
            pass


def _detach_child(cwd: str) -> None:
    """In a fresh child: its own session (so the process-group kill reaches everything it starts), stdin
    on /dev/null, the task root as working directory."""
    os.setsid()
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.chdir(cwd)


def spawn(command: list[str], env: dict[str, str], cwd: str) -> int:
    """fork + exec ``command`` (PATH looked up in ``env``) in its own session; OSError if it cannot start."""
    read_end, write_end = os.pipe()  # close-on-exec: EOF tells the exec worked
    _flush_stdio()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_end)
            _detach_child(cwd)
            for name in ("SIGPIPE", "SIGXFSZ"):  # what Python ignores, a runtime gets back (as subprocess does)
                if hasattr(_signal, name):
                    _signal.signal(getattr(_signal, name), _signal.SIG_DFL)
            os.execvpe(command[0], command, env)
        except BaseException as exc:
            try:
                os.write(write_end, f"{getattr(exc, 'errno', None) or 0}:{exc}".encode(errors="replace"))
            finally:
                os._exit(127)
    os.close(write_end)
    chunks = []
    while True:
        data = os.read(read_end, 4096)
        if not data:
            break
        chunks.append(data)
    os.close(read_end)
    if chunks:
        os.waitpid(pid, 0)
        number, _, message = b"".join(chunks).decode(errors="replace").partition(":")
        raise OSError(int(number or 0), message)
    return pid


_kept_streams: list[Any] = []  # the replaced stdio objects: never finalized, so fds 1 and 2 stay open


def _unbuffered_stdio() -> None:
    """What PYTHONUNBUFFERED gives a fresh interpreter: unbuffered binary layer, write-through text layer."""
    import io

    for name, fd in (("stdout", 1), ("stderr", 2)):
        old = getattr(sys, name)
        if old is None:
            continue
        stream = io.TextIOWrapper(io.FileIO(fd, "w", closefd=False), encoding=old.encoding, errors=old.errors,
                                  newline="\n", line_buffering=False, write_through=True)
        stream.mode = "w"
        _kept_streams.append(old)
        setattr(sys, name, stream)
        setattr(sys, f"__{name}__", stream)


def _python_child(env: dict[str, str], task_root: str) -> int:
    """The forked runtime process: become what ``python3 python_loop.py`` with ``env`` would be, then loop."""
    _detach_child(task_root)
    os.environ.clear()
    os.environ.update(env)
    time.tzset()
    sys.argv = [PYTHON_LOOP]
    sys.dont_write_bytecode = True
    _unbuffered_stdio()
    if RUNTIME_DIR not in sys.path:
        sys.path.insert(0, RUNTIME_DIR)
    import python_loop

    python_loop.use_json(json_loads, json_dumps)
    # The search path of `python3 python_loop.py` under PYTHONPATH=<task root>:<runtime dir>; and our own
    # modules out of sys.modules, so a bundle's module named like one of them is importable.
    sys.path[:] = [task_root, RUNTIME_DIR, *(entry for entry in sys.path if entry not in ("", task_root, RUNTIME_DIR))]
    for name in ("bootstrap", "python_loop"):
        sys.modules.pop(name, None)
    sys.modules["__main__"] = python_loop
    return python_loop.main()


def _exit_code(exc: SystemExit) -> int:
    """The process exit code a fresh interpreter gives ``sys.exit(value)``."""
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code & 0xFF
    print(exc.code, file=sys.stderr)
    return 1


def _finish_child(code: int) -> None:
    """Exit like an interpreter would (non-daemon threads joined, atexit run, stdio flushed), never
    unwinding into the wrapper's frames."""
    try:
        threading = sys.modules.get("threading")
        if threading is not None:
            threading._shutdown()  # type: ignore[attr-defined]
        import atexit

        atexit._run_exitfuncs()
    except BaseException:  # nothing may stop the exit
        pass
    _flush_stdio()
    os._exit(code)


def fork_python_loop(env: dict[str, str], task_root: str, server: RuntimeAPIServer) -> int:
    """Fork the Python runtime process (see the module docstring); the child never returns."""
    _flush_stdio()
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        server.close()
        code = _python_child(env, task_root)
    except SystemExit as exc:
        code = _exit_code(exc)
    except BaseException:
        try:
            import traceback

            traceback.print_exc()
        except BaseException:
            pass
        code = 1
    finally:
        _finish_child(code)
    return 0  # not reached


def peak_memory_bytes() -> int | None:
    """The sandbox's memory high-water mark (its cgroup's, so the runtime and everything it started); None
    when there is no cgroup file to read."""
    for path in PEAK_MEMORY_FILES:
        try:
            with open(path, "rb") as handle:
                return int(handle.read().strip())
        except (OSError, ValueError):
            continue
    return None


def write_result(result: dict[str, Any], env: dict[str, str]) -> None:
    """One JSON line to the result file; stdout after a marker line if the file cannot be written."""
    line = json_dumps(result, default=str) + "\n"
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
                "duration_ms": round((ended - started) * 1000, 3), "exit_code": exit_code,
                "peak_memory_bytes": peak_memory_bytes()}

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

    request_id = env.get("TRACE_REQUEST_ID") or _uuid4()
    env = {**env, "TRACE_REQUEST_ID": request_id}
    invocation = Invocation(request_id, event, int((time.time() + timeout_s) * 1000),
                            env.get("TRACE_FUNCTION_NAME") or "trace-udf")
    server = RuntimeAPIServer(invocation, int(env.get("TRACE_RUNTIME_API_PORT") or 0))
    child_env = child_environment(runtime, env.get("_HANDLER", ""), task_root, server.server_address[1], env)
    try:
        if command is None:
            pid = fork_python_loop(child_env, task_root, server)
        else:
            pid = spawn(command, child_env, task_root)
    except OSError as exc:
        server.stop()
        what = command[0] if command else "the python loop"
        return result("init_error", _error(f"cannot start {what}: {exc}", "Runtime.InvalidEntrypoint"))
    child = Child(pid)

    # SIGTERM (the platform stopping us) ends the wait; the wakeup fd makes poll() return at once.
    terminated: list[bool] = []
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_read, False)
    os.set_blocking(wake_write, False)
    previous_wakeup = _signal.set_wakeup_fd(wake_write, warn_on_full_buffer=False)
    previous_handler = _signal.signal(_signal.SIGTERM, lambda *_: terminated.append(True))
    server.watch(wake_read, lambda: os.read(wake_read, 512))
    if child.fd is not None:
        pidfd = child.fd

        def child_exited() -> None:
            server.unwatch(pidfd)  # poll() closes the pidfd once it reaped the child
            child.poll()

        server.watch(pidfd, child_exited)
    try:
        while invocation.status is None and not terminated:
            if child.returncode is not None or (child.fd is None and child.poll() is not None):
                server.drain()  # an answer it sent just before exiting
                break
            left = deadline - time.monotonic()
            if left <= 0:
                break
            server.poll_once(left if child.fd is not None else min(left, 0.02))
        outcome_at.append(time.monotonic())
        exit_code = child.poll()  # read before we stop it: only a code of its own making is reported
        terminate(child)
        server.stop()
    finally:
        _signal.signal(_signal.SIGTERM, previous_handler)
        _signal.set_wakeup_fd(previous_wakeup)
        os.close(wake_read)
        os.close(wake_write)
        child.close()
    status, response, error = invocation.status, invocation.response, invocation.error
    if status is not None:
        return result(status, error, response, exit_code)
    if exit_code is not None:
        how = f"exit status {exit_code}" if exit_code >= 0 else f"signal {_signal_name(-exit_code)}"
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
                   "duration_ms": 0.0, "exit_code": None, "peak_memory_bytes": peak_memory_bytes()}
    write_result(outcome, env)
    return 0 if outcome["status"] == "ok" else 1


def exit_now(code: int) -> None:
    """Exit without the interpreter's finalization (~5 ms of the sandbox's CPU, tearing down every module):
    once the result is written and the runtime stopped, nothing is left to clean up. The Docker backend's
    command ends with this; run as a script, the wrapper exits the ordinary way."""
    _flush_stdio()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
