"""The task API: the only platform calls a sandbox can make, authenticated by its capability token.

It is plain functions over (method, path, headers, body) rather than Flask views because two
transports carry it: the worker's per-invocation unix-socket gateway (``workers.gateway``,
for Docker and process sandboxes, which have no network) and the public API's ``/v1/task/``
blueprint (``web.api.task``, for Fargate sandboxes, which reach the API over a VPC endpoint).
Both must answer identically, so both call :func:`dispatch`. Handlers need an app context
(the database); each transport provides one per request.

Routes register with :func:`register`. This module ships ``GET /v1/task/whoami``; the data
plane adds ``query``, ``buffer-publish`` and ``credentials`` the same way. A route that names
objects by path (``/v1/task/objects/<key>``) registers with :func:`register_prefix`: its
handler gets the rest of the path, the query string and the raw body. Modules holding routes
are listed in ``ROUTE_MODULES`` and imported on the first request, so that both transports
serve the same routes without importing each module themselves.
"""

from __future__ import annotations

import importlib
import logging
import threading
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from flask import has_app_context

from tracecore.db.engine import db, execute_one
from tracecore.exceptions import NotFound, PermissionDenied, StaleFence, TraceError, Unauthenticated, UserError
from tracecore.execution import lease
from tracecore.execution.tokens import Capability, verify
from tracecore.infra import strict_json
from tracecore.taskapi import sql

log = logging.getLogger(__name__)

PATH_PREFIX = "/v1/task/"
# Bigger bodies are refused before they are read (413); batches of rows travel as artifacts
# in the object store, not through this API.
MAX_BODY_BYTES = 8 * 1024 * 1024



class MethodNotAllowed(UserError):
    code = "method_not_allowed"
    http_status = 405


class PayloadTooLarge(UserError):
    code = "payload_too_large"
    http_status = 413


Handler = Callable[[Capability, dict[str, Any]], tuple[int, dict[str, Any]]]
HANDLERS: dict[tuple[str, str], Handler] = {}


def register(method: str, path: str) -> Callable[[Handler], Handler]:
    """Add a route. Only ``/v1/task/...`` paths: the gateway must never grow a way out of that tree."""
    method = method.upper()
    if not path.startswith(PATH_PREFIX) or "?" in path or path.rstrip("/") != path:
        raise ValueError(f"task API paths live under {PATH_PREFIX} (no query, no trailing slash): {path!r}")

    def decorate(handler: Handler) -> Handler:
        existing = HANDLERS.get((method, path))
        if existing is not None and existing.__qualname__ != handler.__qualname__:
            raise ValueError(f"{method} {path} is already handled by {existing.__module__}.{existing.__qualname__}")
        HANDLERS[(method, path)] = handler
        return handler

    return decorate


@dataclass(frozen=True)
class RawRequest:
    """What a prefix route's handler gets: the path after its prefix (as sent), the query, the raw body."""

    method: str
    rest: str
    query: str
    body: bytes


RawHandler = Callable[[Capability, RawRequest], tuple[int, dict[str, Any]]]
PREFIX_HANDLERS: dict[tuple[str, str], RawHandler] = {}


def register_prefix(method: str, prefix: str) -> Callable[[RawHandler], RawHandler]:
    """Add a route for every path under ``prefix`` (a folder of ``/v1/task/``, ending in ``/``).

    Exact routes win over prefix routes. The body is not parsed (an object's bytes are not JSON)
    but is bounded like every other body.
    """
    method = method.upper()
    if not prefix.startswith(PATH_PREFIX) or prefix == PATH_PREFIX or not prefix.endswith("/") or "?" in prefix:
        raise ValueError(f"prefix routes are folders under {PATH_PREFIX} (ending in '/', no query): {prefix!r}")

    def decorate(handler: RawHandler) -> RawHandler:
        existing = PREFIX_HANDLERS.get((method, prefix))
        if existing is not None and existing.__qualname__ != handler.__qualname__:
            raise ValueError(f"{method} {prefix} is already handled by {existing.__module__}.{existing.__qualname__}")
        PREFIX_HANDLERS[(method, prefix)] = handler
        return handler

    return decorate


def _prefix_route(path: str) -> str | None:
    """The longest registered prefix that ``path`` lies under, if any."""
    matches = [prefix for (_, prefix) in PREFIX_HANDLERS if path.startswith(prefix)]
    return max(matches, key=len) if matches else None


# Modules whose import registers task API routes; imported once, on the first request.
ROUTE_MODULES: list[str] = ["tracecore.infra.credentials", "tracecore.query.saved", "tracecore.data.publish"]
_loaded_routes: set[str] = set()
_routes_lock = threading.Lock()


def load_routes() -> None:
    """Import every module of ``ROUTE_MODULES`` not imported yet (their decorators register the routes)."""
    if _loaded_routes.issuperset(ROUTE_MODULES):
        return
    with _routes_lock:
        for name in ROUTE_MODULES:
            if name not in _loaded_routes:
                importlib.import_module(name)
                _loaded_routes.add(name)


def error_body(code: str, message: str, details: dict[str, Any] | None = None) -> dict[str, Any]:
    """The platform's one error shape (DESIGN.md, REST conventions)."""
    body: dict[str, Any] = {"code": code, "message": message}
    if details:
        body["details"] = details
    return {"error": body}


class Headers(Protocol):
    """What is read of a request's headers: a plain dict (the gateway) or werkzeug's Headers (the API)."""

    def get(self, key: str, /) -> str | None: ...

    def items(self) -> Iterable[tuple[str, str]]: ...


def bearer_token(headers: Headers) -> str | None:
    """The token of ``Authorization: Bearer <token>``, whatever the header's case."""
    value = headers.get("Authorization")
    if value is None:
        value = next((v for k, v in headers.items() if k.lower() == "authorization"), None)
    if not value:
        return None
    scheme, _, token = value.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def authenticate(headers: Headers, secret: bytes) -> Capability:
    token = bearer_token(headers)
    if token is None:
        raise Unauthenticated("send Authorization: Bearer <capability token>", code="missing_token")
    return authenticate_token(token, secret)


def authenticate_token(token: str, secret: bytes) -> Capability:
    """The token's capability, only while its attempt is live; else :class:`Unauthenticated`.

    A signature and an expiry are not enough: a token copied out of a stored result or log must
    not outlive its attempt. So the task's current fence must be the token's, the task running
    under an unexpired lease, and the attempt of that fence still open. A token whose attempt
    ended answers 401 ``token_attempt_ended`` (``details.reason``: ``fence_moved``,
    ``attempt_closed``, ``lease_expired`` or ``unknown_task``). Every task API call, over either
    transport and the Celery publish, comes through here; the worker's own writes do not (they
    hold the lease itself and are fenced by their statements).
    """
    capability = verify(token, secret)
    try:
        params = {"task_id": uuid.UUID(capability.task_id), "org_id": uuid.UUID(capability.org_id),
                  "run_id": uuid.UUID(capability.run_id), "fence": capability.fence}
    except ValueError:
        raise Unauthenticated("the token's claims name no task", code="invalid_token") from None
    row = execute_one(sql.ATTEMPT_LIVE, params, durable=False)
    reason = _ended_because(row, capability.fence)
    if reason is not None:
        raise Unauthenticated("the capability token's attempt has ended; a token works only while its attempt "
                              "holds the task", code="token_attempt_ended", details={"reason": reason})
    return capability


def _ended_because(row: dict[str, Any] | None, fence: int) -> str | None:
    if row is None:
        return "unknown_task"
    if row["task_fence"] != fence:
        return "fence_moved"
    if row["attempt_state"] != "running" or row["task_state"] != "running":
        return "attempt_closed"
    if not row["lease_live"]:
        return "lease_expired"
    return None


def dispatch(method: str, path: str, headers: Headers, body_bytes: bytes, secret: bytes, *,
             expected_task_id: uuid.UUID | str | None = None) -> tuple[int, dict[str, Any]]:
    """Answer one task API request as (HTTP status, JSON body); never raises for a client's fault.

    Order of checks: unknown paths are 404 whoever asks (the route list is public and a 404
    leaks nothing); then the token (401); then the task it is for (403 ``wrong_task``: a
    gateway serves one task only); then the method (405); then the body (400).
    """
    method, (path, _, query) = method.upper(), path.partition("?")
    try:
        load_routes()
        allowed = sorted(m for (m, p) in HANDLERS if p == path) if path.startswith(PATH_PREFIX) else []
        prefix = None if allowed else _prefix_route(path)
        if prefix is not None:
            allowed = sorted(m for (m, p) in PREFIX_HANDLERS if p == prefix)
        if not allowed:
            raise NotFound(f"no task API route {path}")
        capability = authenticate(headers, secret)
        if expected_task_id is not None and capability.task_id != str(expected_task_id):
            raise PermissionDenied("this gateway serves another task; the token is not valid here", code="wrong_task")
        if prefix is not None:
            raw_handler = PREFIX_HANDLERS.get((method, prefix))
            if raw_handler is None:
                raise MethodNotAllowed(f"{prefix}... answers {', '.join(allowed)}", details={"allowed": allowed})
            if len(body_bytes) > MAX_BODY_BYTES:
                raise PayloadTooLarge(f"the body exceeds {MAX_BODY_BYTES} bytes")
            return raw_handler(capability, RawRequest(method, path[len(prefix):], query, body_bytes))
        handler = HANDLERS.get((method, path))
        if handler is None:
            raise MethodNotAllowed(f"{path} answers {', '.join(allowed)}", details={"allowed": allowed})
        return handler(capability, _json_body(body_bytes))
    except TraceError as exc:
        _rollback()
        if exc.http_status >= 500:
            log.error("task API %s %s failed: %s", method, path, exc.message)
        return exc.http_status, {"error": exc.to_dict()}
    except Exception as exc:  # a bug must answer the sandbox, not kill the transport's thread
        _rollback()
        bad = strict_json.as_bad_input(exc)  # bad input past validation is still the caller's 400
        if bad is not None:
            log.warning("task API %s %s: bad input reached a handler: %r", method, path, exc)
            return bad.http_status, {"error": bad.to_dict()}
        log.exception("task API %s %s: unhandled error", method, path)
        return 500, error_body("internal_error", "internal error; see the worker's log")


def _json_body(body_bytes: bytes) -> dict[str, Any]:
    if len(body_bytes) > MAX_BODY_BYTES:
        raise PayloadTooLarge(f"the body exceeds {MAX_BODY_BYTES} bytes")
    if not body_bytes.strip():
        return {}
    body = strict_json.loads(body_bytes)  # depth, NaN, huge integers, NUL, surrogates: 400
    if not isinstance(body, dict):
        raise UserError("the body must be a JSON object", code="invalid_json")
    return body


def _rollback() -> None:
    if has_app_context():
        db.session.rollback()


def fence_current(capability: Capability) -> bool:
    """Whether the token's fence still holds a live lease on its task.

    Uses the same check as every fenced write (``lease.assert_current``), so a UDF sees
    exactly what its writes would meet. Like any refused write, a stale fence records its
    attempt as ``fenced``.
    """
    try:
        lease.assert_current(uuid.UUID(capability.task_id), capability.fence)
    except StaleFence:
        return False
    db.session.rollback()  # end the transaction: releases the share lock assert_current took
    return True


@register("GET", "/v1/task/whoami")
def whoami(capability: Capability, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """What the token grants (its claims, never the token itself) and whether it still counts."""
    return 200, {**capability.to_claims(), "fence_current": fence_current(capability)}
