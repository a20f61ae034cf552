"""Trace SDK for Python UDFs: the task gateway's calls, standard library only.

Why a unix socket: the sandbox has no network at all; the platform mounts the gateway's socket at
/run/trace/gateway.sock (``TRACE_GATEWAY`` overrides it, as ``unix:///path`` or, for development,
``http://host:port``). Why a bearer token: the capability token in ``TRACE_CAPABILITY_TOKEN`` is the
only credential the sandbox has; it scopes every call to this task's inputs and outputs.

The wrapper puts this file's directory on PYTHONPATH, so a handler just does ``import trace_sdk``.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
from typing import Any
from urllib.parse import urlsplit

__all__ = ["GatewayError", "publish", "query", "whoami"]

DEFAULT_GATEWAY = "unix:///run/trace/gateway.sock"
DEFAULT_TIMEOUT_S = 60.0


class GatewayError(Exception):
    """A non-2xx answer from the gateway (or no answer: status 0), with the platform's error code."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


class UnixHTTPConnection(http.client.HTTPConnection):
    """http.client over a unix socket: the Host header is cosmetic, the socket path is the address."""

    def __init__(self, socket_path: str, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        super().__init__("gateway", timeout=timeout)
        self.socket_path = socket_path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.socket_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def _connection(timeout: float) -> http.client.HTTPConnection:
    gateway = os.environ.get("TRACE_GATEWAY") or DEFAULT_GATEWAY
    parts = urlsplit(gateway)
    if parts.scheme == "unix":
        return UnixHTTPConnection(parts.path, timeout)
    if parts.scheme == "http" and parts.hostname:
        return http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=timeout)
    if parts.scheme == "https" and parts.hostname:  # Fargate: the public /v1/task/ route over TLS
        return http.client.HTTPSConnection(parts.hostname, parts.port or 443, timeout=timeout)
    if not parts.scheme and gateway.startswith("/"):
        return UnixHTTPConnection(gateway, timeout)
    raise GatewayError(0, "bad_gateway_address", f"unsupported TRACE_GATEWAY {gateway!r}")


def _call(method: str, path: str, payload: Any = None, timeout: float = DEFAULT_TIMEOUT_S) -> Any:
    """One JSON request; returns the decoded body or raises GatewayError."""
    token = os.environ.get("TRACE_CAPABILITY_TOKEN")
    if not token:
        raise GatewayError(0, "missing_token", "TRACE_CAPABILITY_TOKEN is not set")
    headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
    body = None
    if payload is not None:
        body = json.dumps(payload).encode()
        headers["Content-Type"] = "application/json"
    connection = _connection(timeout)
    try:
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        status, raw = response.status, response.read()
    except OSError as exc:
        raise GatewayError(0, "gateway_unreachable", str(exc)) from exc
    finally:
        connection.close()
    try:
        data = json.loads(raw) if raw else None
    except ValueError:
        data = None
    if 200 <= status < 300:
        if data is None and raw:
            raise GatewayError(status, "bad_response", "the gateway answered non-JSON")
        return data
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict):
        raise GatewayError(status, str(error.get("code") or f"http_{status}"), str(error.get("message") or ""))
    raise GatewayError(status, f"http_{status}", raw.decode("utf-8", "replace")[:500])


def whoami() -> dict[str, Any]:
    """What the token grants: task, attempt, org, pinned inputs, output prefix (useful for debugging a UDF)."""
    return _call("GET", "/v1/task/whoami") or {}


def query(sql: str, limit: int | None = None) -> list[dict[str, Any]]:
    """Run a read-only SQL query over the datasets the token may read; returns the rows."""
    answer = _call("POST", "/v1/task/query", {"sql": sql, "limit": limit}) or {}
    return list(answer.get("rows") or [])


def publish(rows: list[dict[str, Any]], dataset: str | None = None) -> dict[str, Any]:
    """Publish rows to the task's output dataset (or ``dataset``); idempotent and fenced by the platform."""
    return _call("POST", "/v1/task/buffer-publish", {"rows": list(rows), "dataset": dataset}) or {}
