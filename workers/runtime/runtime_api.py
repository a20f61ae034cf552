"""The AWS Lambda Runtime API (2018-06-01) for exactly one invocation, on the sandbox's loopback.

Split from bootstrap.py (which starts and watches the runtime process) because this is the
protocol half: the invocation's state, a minimal HTTP/1.1 server on ``select.poll`` and the
JSON helpers on the C accelerator. Standard library C modules only on this path: every
millisecond of CPU here costs up to four of wall time under the sandbox's 0.25 vCPU quota.
"""

from __future__ import annotations

import _json
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
REGION = "us-east-1"
MAX_RESPONSE_BYTES = 6 * 1024 * 1024  # Lambda's synchronous payload limit
DRAIN_LIMIT_BYTES = 64 * 1024 * 1024  # read (and drop) at most this much of an oversized body
MAX_HEAD_BYTES = 64 * 1024  # request line and headers


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


# typeshed types the context as a make_scanner; the C scanner only reads the attributes above.
_scan_once = _json.make_scanner(_DecoderSettings())  # type: ignore[arg-type]


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
        self._watched: dict[int, Callable[[], object]] = {}
        self._thread: Any = None
        self._wake: tuple[int, int] | None = None
        self._stopping = False
        self._closed = False

    # -- the loop

    def watch(self, fd: int, callback: Callable[[], object]) -> None:
        """Call ``callback`` from the loop whenever ``fd`` is readable (what it answers is dropped)."""
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
                fd, _ = self._listener._accept()  # type: ignore[attr-defined]  # in _socket, not in typeshed
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
