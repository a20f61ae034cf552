"""/v1/task/*: the task API on the public API, for sandboxes that have no gateway socket.

A Fargate sandbox runs on another machine than its worker, so it cannot reach the worker's
unix socket; it reaches this API over a VPC endpoint instead. The routes, checks and answers
are the gateway's own (``tracecore.taskapi.calls.dispatch``), authenticated by the capability
token only: ``web.auth`` lets ``/v1/task/`` through without an API token, and an API token
sent here is refused (it is not a capability).
"""

from __future__ import annotations

from flask import jsonify, request
from flask.typing import ResponseReturnValue

from tracecore.execution import tokens
from tracecore.settings import current_settings
from tracecore.taskapi import calls as task_api

from . import Blueprint

blp = Blueprint("task", __name__, url_prefix="/v1",
                description="The task API, for sandboxes: authenticated by a capability token")

_ERROR = {"description": "`{\"error\": {\"code\", \"message\"}}`"}


@blp.route("/task/<path:rest>", methods=["GET", "POST", "PUT"])
@blp.doc(security=[{"capability": []}],
         summary="A task API call (GET /v1/task/whoami; the data plane adds query, buffer-publish, credentials)",
         responses={"200": {"description": "The call's JSON answer"}, "401": _ERROR, "403": _ERROR,
                    "404": _ERROR, "405": _ERROR, "413": _ERROR})
def task_call(rest: str) -> ResponseReturnValue:
    limit = task_api.MAX_BODY_BYTES
    if request.content_length is not None and request.content_length > limit:
        return _answer(413, task_api.error_body("payload_too_large", f"the body exceeds {limit} bytes"))
    body = request.stream.read(limit + 1)
    if len(body) > limit:  # a chunked body has no Content-Length to check first
        return _answer(413, task_api.error_body("payload_too_large", f"the body exceeds {limit} bytes"))
    secret = tokens.secret_key(current_settings())
    status, payload = task_api.dispatch(request.method, request.path, request.headers, body, secret)
    return _answer(status, payload)


def _answer(status: int, payload: dict) -> ResponseReturnValue:
    response = jsonify(payload)
    response.status_code = status
    response.headers["Cache-Control"] = "no-store"
    return response
