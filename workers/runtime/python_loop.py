"""A minimal Python Lambda runtime client: the built-in loop for `python3.11` bundles.

Why our own and not awslambdaric: the runtime images are stdlib only (no C extension to build or ship),
and a Python handler needs nothing more than GET next / call / POST response. Bundles that want the
official client can still vendor awslambdaric and use the `provided` runtime: the wrapper's Runtime API
serves both the same way.

Reads AWS_LAMBDA_RUNTIME_API, _HANDLER (``module.function``; ``pkg/mod.fn`` means ``pkg.mod``) and
LAMBDA_TASK_ROOT. Import failures are posted to ``init/error`` (Runtime.ImportModuleError,
Runtime.HandlerNotFound, Runtime.MalformedHandlerName) and the process exits, as Lambda's does.

Run two ways: forked from the wrapper (bootstrap.py, the usual way: it hands over its JSON functions
with :func:`use_json`), or as a script, ``python3 python_loop.py``. Either way it imports only C
modules up front (raw HTTP/1.1 over ``_socket``, no http.client, no json package unless run as a
script): the sandbox's CPU quota makes every import of the loop a cost of every invocation.
"""

from __future__ import annotations

import _socket
import os
import sys
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

API = "/2018-06-01/runtime"

_loads: Callable[[bytes], Any] | None = None
_dumps: Callable[[Any], str] | None = None


def use_json(loads: Callable[[bytes], Any], dumps: Callable[[Any], str]) -> None:
    """Use these instead of the json package (the wrapper's, on the same C accelerator)."""
    global _loads, _dumps
    _loads, _dumps = loads, dumps


def _json() -> tuple[Callable[[bytes], Any], Callable[[Any], str]]:
    if _loads is None or _dumps is None:
        import json

        use_json(json.loads, json.dumps)
    assert _loads is not None and _dumps is not None
    return _loads, _dumps


class LambdaContext:
    """The subset of Lambda's context object that handlers actually use."""

    def __init__(self, request_id: str, deadline_ms: int, function_arn: str) -> None:
        self.aws_request_id = request_id
        self.invoked_function_arn = function_arn
        self.function_name = os.environ.get("AWS_LAMBDA_FUNCTION_NAME", "")
        self.function_version = os.environ.get("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST")
        self.memory_limit_in_mb = os.environ.get("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "")
        self.log_group_name = os.environ.get("AWS_LAMBDA_LOG_GROUP_NAME", "")
        self.log_stream_name = os.environ.get("AWS_LAMBDA_LOG_STREAM_NAME", "")
        self.identity = None
        self.client_context = None
        self._deadline_ms = deadline_ms

    def get_remaining_time_in_millis(self) -> int:
        """Milliseconds until the platform kills the invocation (never negative)."""
        return max(0, self._deadline_ms - int(time.time() * 1000))


class RuntimeClient:
    """HTTP/1.1 to the wrapper's Runtime API; one connection per call keeps it simple and the wrapper stateless."""

    def __init__(self, address: str) -> None:
        self.address = address
        host, _, port = address.rpartition(":")
        self._target = (host or "127.0.0.1", int(port))

    def call(self, method: str, path: str, body: bytes | None = None,
             headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        """One request; raises OSError when the API is gone (refused, or closed without an answer)."""
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self.address}", "Connection: close"]
        if body is not None or method in ("POST", "PUT"):
            lines.append(f"Content-Length: {len(body or b'')}")
        lines += [f"{key}: {value}" for key, value in (headers or {}).items()]
        sock = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)  # no timeout: `next` blocks by design
        try:
            sock.connect(self._target)
            sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b""))
            received = bytearray()
            end = length = -1
            while True:
                data = sock.recv(1 << 20)
                if not data:
                    break
                received += data
                if end < 0:
                    end = received.find(b"\r\n\r\n")
                    if end >= 0:
                        status, headers_in = _parse_head(bytes(received[:end]))
                        length = int(headers_in.get("content-length", -1))
                if end >= 0 and 0 <= length <= len(received) - end - 4:
                    break
        finally:
            sock.close()
        if end < 0:
            raise ConnectionError(f"the Runtime API closed the connection without an answer to {method} {path}")
        payload = bytes(received[end + 4:])
        return status, headers_in, payload if length < 0 else payload[:length]

    def post_error(self, path: str, error: dict[str, Any]) -> None:
        self.call("POST", path, _json()[1](error).encode(),
                  {"Content-Type": "application/json", "Lambda-Runtime-Function-Error-Type": error["errorType"]})


def _parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[1].isdigit():
        raise ConnectionError(f"not an HTTP response: {lines[0][:80]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        key, _, value = line.partition(":")
        headers[key.strip().lower()] = value.strip()
    return int(parts[1]), headers


def error_document(exc: BaseException, error_type: str | None = None, skip_frames: int = 0) -> dict[str, Any]:
    """Lambda's error shape: the message, the type, and the stack as formatted lines (user frames only)."""
    import traceback

    tb = exc.__traceback__
    for _ in range(skip_frames):
        if tb is not None:
            tb = tb.tb_next
    return {
        "errorMessage": str(exc),
        "errorType": error_type or type(exc).__name__,
        "stackTrace": traceback.format_list(traceback.extract_tb(tb)),
    }


def load_handler(spec: str, task_root: str) -> Callable[..., Any]:
    """Import the handler; raises _InitError carrying the Lambda error document on failure."""
    # The bundle comes first: a user module named like ours (bootstrap) or like the stdlib's (trace) must win.
    sys.path[:] = [task_root] + [entry for entry in sys.path if entry != task_root]
    module_path, dot, function_name = spec.rpartition(".")
    if not dot or not module_path or not function_name:
        raise _InitError({"errorMessage": f"Bad handler '{spec}': not enough values to unpack",
                          "errorType": "Runtime.MalformedHandlerName", "stackTrace": []})
    module_name = module_path.replace("/", ".")
    try:
        __import__(module_name)  # importlib.import_module without importing importlib
        module = sys.modules[module_name]
    except Exception as exc:
        document = error_document(exc, "Runtime.ImportModuleError", skip_frames=1)
        document["errorMessage"] = f"Unable to import module '{module_name}': {type(exc).__name__}: {exc}"
        raise _InitError(document) from exc
    handler = getattr(module, function_name, None)
    if not callable(handler):
        raise _InitError({"errorMessage": f"Handler '{function_name}' missing on module '{module_name}'",
                          "errorType": "Runtime.HandlerNotFound", "stackTrace": []})
    return handler


class _InitError(Exception):
    """A failed init, with the document to post to init/error."""

    def __init__(self, document: dict[str, Any]) -> None:
        super().__init__(document["errorMessage"])
        self.document = document


def invoke(client: RuntimeClient, handler: Callable[..., Any]) -> bool:
    """One turn of the loop; False when the Runtime API is gone (the wrapper is done with us)."""
    loads, dumps = _json()
    try:
        status, headers, body = client.call("GET", f"{API}/invocation/next")
    except OSError:
        return False
    if status != 200:
        print(f"[python_loop] next answered {status}: {body[:200]!r}", file=sys.stderr, flush=True)
        return False
    request_id = headers.get("lambda-runtime-aws-request-id", "")
    base = f"{API}/invocation/{request_id}"
    if headers.get("lambda-runtime-trace-id"):
        os.environ["_X_AMZN_TRACE_ID"] = headers["lambda-runtime-trace-id"]
    context = LambdaContext(request_id, int(headers.get("lambda-runtime-deadline-ms") or 0),
                            headers.get("lambda-runtime-invoked-function-arn", ""))
    try:
        event = loads(body) if body else None
        result = handler(event, context)
    except Exception as exc:
        import traceback

        traceback.print_exc()
        client.post_error(f"{base}/error", error_document(exc, skip_frames=1))
        return True
    try:
        payload = dumps(result).encode()
    except (TypeError, ValueError) as exc:
        client.post_error(f"{base}/error", {"errorMessage": f"Unable to marshal response: {exc}",
                                            "errorType": "Runtime.MarshalError", "stackTrace": []})
        return True
    status, _, answer = client.call("POST", f"{base}/response", payload, {"Content-Type": "application/json"})
    if status != 202:
        print(f"[python_loop] response answered {status}: {answer[:200]!r}", file=sys.stderr, flush=True)
    return True


def main() -> int:
    """Init, then loop until the Runtime API goes away (the wrapper terminates us first, normally)."""
    client = RuntimeClient(os.environ["AWS_LAMBDA_RUNTIME_API"])
    try:
        handler = load_handler(os.environ.get("_HANDLER", ""), os.environ.get("LAMBDA_TASK_ROOT", "/var/task"))
    except _InitError as failure:
        print(f"[python_loop] init failed: {failure.document['errorMessage']}", file=sys.stderr, flush=True)
        client.post_error(f"{API}/init/error", failure.document)
        return 1
    while invoke(client, handler):
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
