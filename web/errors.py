"""One error shape for every failure: ``{"error": {"code", "message", "details"}}``."""

from __future__ import annotations

import logging

from flask import Flask, jsonify, request
from flask.typing import ResponseReturnValue
from werkzeug.exceptions import HTTPException

from tracecore.db.engine import db
from tracecore.exceptions import TraceError
from tracecore.infra.strict_json import as_bad_input

log = logging.getLogger(__name__)


def error_response(status: int, code: str, message: str, details: dict | None = None,
                   headers: dict | None = None) -> ResponseReturnValue:
    body: dict = {"code": code, "message": message}
    if details:
        body["details"] = details
    return jsonify({"error": body}), status, headers or {}


def register(app: Flask) -> None:
    @app.errorhandler(TraceError)
    def trace_error(exc: TraceError) -> ResponseReturnValue:
        db.session.rollback()
        if exc.http_status >= 500:
            log.exception("platform error")
        return error_response(exc.http_status, exc.code, exc.message, exc.details)

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> ResponseReturnValue:
        db.session.rollback()
        status = exc.code or 500
        details = {}
        # flask-smorest / webargs put field errors under data["messages"].
        messages = getattr(exc, "data", {}).get("messages") if hasattr(exc, "data") else None
        if messages:
            details["fields"] = messages
            status = 400 if status == 422 else status
        code = "invalid_request" if messages else (exc.name or "error").lower().replace(" ", "_")
        return error_response(status, code, exc.description or exc.name, details)

    @app.errorhandler(Exception)
    def unexpected(exc: Exception) -> ResponseReturnValue:
        db.session.rollback()
        bad = as_bad_input(exc)  # a backstop: bad input that slipped past validation is still a 400
        if bad is not None:
            log.warning("bad input reached %s unvalidated: %r", request.path, exc)
            return error_response(bad.http_status, bad.code, bad.message)
        log.exception("unhandled error")
        return error_response(500, "internal_error", "internal error; see the server log")
