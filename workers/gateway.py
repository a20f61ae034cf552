"""The task gateway: one tiny HTTP/1.1 server on a unix socket per UDF invocation.

Docker and process sandboxes have no network at all; the only way out is this socket,
mounted at ``/run/trace/gateway.sock``. It serves the task API (``tracecore.taskapi.calls``) and
nothing else: no proxying, no other paths, and only for the one task it was opened for, so a
token that leaked from another sandbox is useless here. The worker opens it around the sandbox
run (``with TaskGateway(...)``) and closes it, socket file included, when the run ends.

Why a thread per connection in the worker and not a separate process: a request is a short
database call made with the worker's own app (pool, settings), and the gateway's life is the
invocation's. The bounds below keep a hostile sandbox from starving the worker: body and
header sizes, an idle timeout per connection, and a cap on concurrent connections.
"""

from __future__ import annotations

import http.client
import http.server
import io
import json
import logging
import os
import selectors
import socket
import socketserver
import stat
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from flask import Flask

from tracecore.execution.tokens import redact_tokens
from tracecore.taskapi import calls as task_api

log = logging.getLogger("workers.gateway")

SOCKET_MODE = 0o666  # the sandbox runs as uid 10001, not as the worker's user
MAX_REQUEST_LINE = 8 * 1024
MAX_HEADER_BYTES = 32 * 1024
CONNECTION_TIMEOUT_S = 30.0
MAX_CONNECTIONS = 32
# A body over the limit is answered 413 at once; up to this much of it is then read and
# dropped so that an ordinary client (which sends the whole body before it reads) sees the 413.
DRAIN_LIMIT = 64 * 1024 * 1024
_UNIX_PATH_MAX = 107  # sun_path is 108 bytes with its NUL
_BUSY_BODY = b'{"error": {"code": "gateway_busy", "message": "too many open connections"}}'
_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
         b"Content-Length: %d\r\n\r\n%s" % (len(_BUSY_BODY), _BUSY_BODY))


class _BoundedReader:
    """Stands in for ``rfile`` while the headers are parsed: refuses past a total byte budget.

    ``http.client`` bounds each header line (64 KB) and their number (100), not their sum.
    """

    def __init__(self, raw: io.BufferedIOBase, budget: int) -> None:
        self.raw = raw
        self.remaining = budget

    def readline(self, limit: int = -1) -> bytes:
        want = self.remaining + 1 if limit < 0 else min(limit, self.remaining + 1)
        line = self.raw.readline(want)
        self.remaining -= len(line)
        if self.remaining < 0:
            raise http.client.LineTooLong("header section")
        return line

    def __getattr__(self, name: str) -> Any:
        return getattr(self.raw, name)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "trace-gateway"
    sys_version = ""
    timeout = CONNECTION_TIMEOUT_S  # replaced per server in setup()
    server: _Server
    raw_requestline: bytes  # set by handle_one_request(), before parse_request()

    def setup(self) -> None:
        # typeshed makes timeout a ClassVar; StreamRequestHandler.setup() reads it from the instance.
        self.timeout = self.server.connection_timeout  # type: ignore[misc]
        super().setup()

    def parse_request(self) -> bool:
        if len(self.raw_requestline) > MAX_REQUEST_LINE:
            self.requestline, self.request_version, self.command = "", "", ""
            self.send_error(414)
            return False
        raw = self.rfile
        self.rfile = _BoundedReader(raw, MAX_HEADER_BYTES)  # type: ignore[assignment]
        try:
            parsed = super().parse_request()
        finally:
            self.rfile = raw
        if parsed and self.request_version == "HTTP/0.9":
            self.send_error(505, "HTTP/0.9 is not served")
            return False
        return parsed

    def do_GET(self) -> None:
        self._serve()

    do_POST = do_PUT = do_PATCH = do_DELETE = do_GET  # dispatch answers the 404s and 405s

    def _serve(self) -> None:
        started = time.monotonic()
        path = self.path.split("?", 1)[0]
        server = self.server
        if self.headers.get("Transfer-Encoding"):
            self._reply(411, task_api.error_body("length_required", "send Content-Length; chunked bodies are refused"),
                        close=True)
            return
        try:
            length = int(self.headers.get("Content-Length") or 0)
            if length < 0:
                raise ValueError
        except ValueError:
            self._reply(400, task_api.error_body("bad_content_length", "Content-Length is not a byte count"),
                        close=True)
            return
        if length > server.max_body_bytes:
            too_large = f"the body exceeds {server.max_body_bytes} bytes"
            self._reply(413, task_api.error_body("payload_too_large", too_large), close=True)
            self._drain(length)
            log.warning("gateway %s: %s %s refused: body of %d bytes", server.expected_task_id, self.command, path,
                        length)
            return
        body = self.rfile.read(length) if length else b""
        if len(body) < length:
            self.close_connection = True  # the client went away mid-body
            return
        with server.flask_app.app_context():
            status, payload = task_api.dispatch(self.command, self.path, dict(self.headers.items()), body,
                                                server.secret, expected_task_id=server.expected_task_id)
        self._reply(status, payload)
        code = payload.get("error", {}).get("code") if status >= 400 else None
        log.info("gateway %s: %s %s -> %d%s in %.1f ms", server.expected_task_id, self.command, path, status,
                 f" {code}" if code else "", (time.monotonic() - started) * 1000)

    def _reply(self, status: int, payload: dict[str, Any], *, close: bool = False) -> None:
        data = json.dumps(payload, default=str).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        if close:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        self.wfile.flush()

    def _drain(self, length: int) -> None:
        remaining = min(length, DRAIN_LIMIT)
        try:
            while remaining > 0:
                chunk = self.rfile.read1(min(remaining, 1 << 16))
                if not chunk:
                    break
                remaining -= len(chunk)
        except OSError:
            pass

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own refusals (bad request line, headers too large, no such method) as JSON."""
        short = self.responses.get(code, ("Error", ""))[0]
        if getattr(self, "request_version", "") in ("", "HTTP/0.9"):
            self.request_version = "HTTP/1.1"  # always answer with a status line and headers
        self.log_error("refused with %d: %s", code, message or short)
        self.close_connection = True
        self.send_response(code, short)
        data = json.dumps(task_api.error_body(short.lower().replace(" ", "_").replace("-", "_"),
                                              message or short)).encode()
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD" and code >= 200 and code not in (204, 304):
            self.wfile.write(data)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        """Silenced: ``_serve`` logs each request itself, with the path stripped of any query."""

    def log_message(self, format: str, *args: Any) -> None:
        # Messages built by http.server may quote the raw request line: hide any token in it.
        log.warning("gateway %s: %s", self.server.expected_task_id, redact_tokens(format % args))


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    block_on_close = False  # stop() ends live connections itself, with a bounded wait
    request_queue_size = 64
    timeout = 0  # handle_request() is only called once the listening socket is readable

    def __init__(self, path: Path, flask_app: Flask, expected_task_id: str, secret: bytes, *,
                 max_body_bytes: int, connection_timeout: float, max_connections: int) -> None:
        self.flask_app = flask_app
        self.expected_task_id = expected_task_id
        self.secret = secret
        self.max_body_bytes = max_body_bytes
        self.connection_timeout = connection_timeout
        self.max_connections = max_connections
        self._slots = threading.BoundedSemaphore(max_connections)
        self._active: set[socket.socket] = set()
        self._changed = threading.Condition()
        super().__init__(str(path), _Handler, bind_and_activate=False)
        try:
            _bind(self.socket, path)
            self.server_address = str(path)
            self.server_activate()
        except BaseException:
            self.server_close()
            raise

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            log.warning("gateway %s: refused a connection: %d already open", self.expected_task_id,
                        self.max_connections)
            try:
                request.sendall(_BUSY)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        with self._changed:
            self._active.add(request)
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._changed:
                self._active.discard(request)
                self._changed.notify_all()
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("gateway %s: connection ended with an error", self.expected_task_id, exc_info=True)

    def close_connections(self, wait: float) -> None:
        """End every open connection (their handlers fail fast) and wait a little for them."""
        with self._changed:
            for connection in list(self._active):
                try:
                    connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            self._changed.wait_for(lambda: not self._active, wait)


def _bind(sock: socket.socket, path: Path) -> None:
    """Bind, also when the path is longer than ``sun_path`` allows.

    Work folders live under TRACE_HOME and can exceed 107 bytes; binding through the
    ``/proc/self/fd/<dir>`` link of the folder creates the socket at the same place.
    """
    if len(os.fsencode(path)) <= _UNIX_PATH_MAX:
        sock.bind(str(path))
        return
    directory = os.open(path.parent, os.O_PATH | os.O_DIRECTORY)
    try:
        sock.bind(f"/proc/self/fd/{directory}/{path.name}")
    finally:
        os.close(directory)


class TaskGateway:
    """``with TaskGateway(socket_path, app, task_id, secret):`` serves the task API for one task.

    The socket's folder must exist (the worker creates it, private to the invocation); the
    socket itself is made world-writable so that the sandbox's user can connect, which is
    safe because every request must carry this task's capability token.
    """

    def __init__(self, socket_path: str | os.PathLike[str], flask_app: Flask, expected_task_id: uuid.UUID | str,
                 secret: bytes, *, max_body_bytes: int = task_api.MAX_BODY_BYTES,
                 connection_timeout: float = CONNECTION_TIMEOUT_S, max_connections: int = MAX_CONNECTIONS) -> None:
        if not secret:
            raise ValueError("the gateway needs the key that signs capability tokens")
        self.path = Path(socket_path)
        self.flask_app = flask_app
        self.expected_task_id = str(expected_task_id)
        self.secret = secret
        self.limits: dict[str, Any] = {"max_body_bytes": max_body_bytes, "connection_timeout": connection_timeout,
                       "max_connections": max_connections}
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._wake: tuple[int, int] | None = None
        self._inode: tuple[int, int] | None = None

    @property
    def address(self) -> str:
        """The address a sandbox (or the SDK's ``TRACE_GATEWAY``) uses to reach this gateway."""
        return f"unix://{self.path}"

    def start(self) -> TaskGateway:
        if self._server is not None:
            raise RuntimeError("the gateway is already running")
        _remove_stale_socket(self.path)
        server = _Server(self.path, self.flask_app, self.expected_task_id, self.secret, **self.limits)
        try:
            os.chmod(self.path, SOCKET_MODE)  # just bound, before any sandbox runs: nothing swapped it yet
            info = os.lstat(self.path)
            self._inode = (info.st_dev, info.st_ino)
            self._wake = os.pipe()
        except BaseException:
            server.server_close()
            self._unlink()
            raise
        self._server = server
        self._thread = threading.Thread(target=self._serve, args=(server, self._wake[0]), daemon=True,
                                        name=f"trace-gateway-{self.expected_task_id}")
        self._thread.start()
        log.debug("gateway %s: listening on %s", self.expected_task_id, self.path)
        return self

    def _serve(self, server: _Server, wake: int) -> None:
        """Accept until woken through the pipe: stop() returns at once, with no polling interval."""
        with selectors.DefaultSelector() as selector:
            selector.register(server.socket, selectors.EVENT_READ, "accept")
            selector.register(wake, selectors.EVENT_READ, "stop")
            while True:
                for key, _ in selector.select():
                    if key.data == "stop":
                        return
                    server.handle_request()

    def stop(self, wait: float = 5.0) -> None:
        """Stop accepting, remove the socket file, end open connections. Safe to call twice."""
        server, thread, wake = self._server, self._thread, self._wake
        self._server = self._thread = self._wake = None
        if server is None:
            return
        try:
            if wake is not None:
                os.write(wake[1], b"x")
            if thread is not None:
                thread.join(wait)
            server.server_close()
            self._unlink()
            server.close_connections(wait)
        finally:
            if wake is not None:
                os.close(wake[0])
                os.close(wake[1])
        log.debug("gateway %s: stopped", self.expected_task_id)

    def _unlink(self) -> None:
        """Remove the socket file, but only if it is still ours (lstat: a link the sandbox put in its
        place is never followed, and is not ours)."""
        try:
            info = os.lstat(self.path)
            if self._inode is None or (info.st_dev, info.st_ino) == self._inode:
                os.unlink(self.path)
        except FileNotFoundError:
            pass

    def __enter__(self) -> TaskGateway:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _remove_stale_socket(path: Path) -> None:
    """A socket left by a killed worker at the same path is replaced; any other file is not."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise FileExistsError(f"{path} exists and is not a socket")
    os.unlink(path)
