"""A stand-in task gateway on a unix socket, for the SDK tests: checks the bearer token, answers like the platform.

Loaded by path from tests/unit/test_runtime.py (this folder is fixture material, not a package).
"""

from __future__ import annotations

import json
import socketserver
import threading
from http.server import BaseHTTPRequestHandler
from typing import Any


class _UnixHTTPServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


class GatewayStub:
    """Serves /v1/task/{whoami,query,buffer-publish}; records every request it saw."""

    def __init__(self, socket_path: str, token: str) -> None:
        self.url = f"unix://{socket_path}"
        self.requests: list[dict[str, Any]] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _answer(self, status: int, payload: Any) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _route(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                stub.requests.append({"method": self.command, "path": self.path, "body": body})
                if self.headers.get("Authorization") != f"Bearer {token}":
                    self._answer(401, {"error": {"code": "unauthorized", "message": "bad capability token"}})
                elif self.path == "/v1/task/whoami":
                    self._answer(200, {"task_id": "t1", "org_id": "o1", "fence": 3})
                elif self.path == "/v1/task/query" and "boom" in body["sql"]:
                    self._answer(400, {"error": {"code": "query_rejected", "message": "only SELECT"}})
                elif self.path == "/v1/task/query":
                    self._answer(200, {"rows": [{"n": 1}, {"n": 2}][: body["limit"] or 2]})
                elif self.path == "/v1/task/buffer-publish":
                    self._answer(200, {"accepted": len(body["rows"]), "dataset": body["dataset"]})
                else:
                    self._answer(404, {"error": {"code": "not_found", "message": self.path}})

            do_GET = do_POST = _route

        self._server = _UnixHTTPServer(socket_path, Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)

    def start(self) -> GatewayStub:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
