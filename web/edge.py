"""The API's edge: what any request must be before a handler sees it.

- JSON bodies are decoded by ``tracecore.infra.strict_json`` whoever asks for them (webargs through
  ``web.api.JsonBodyParser``, ``request.get_json`` through the app's JSON provider): depth,
  NaN/Infinity, huge integers, NUL and lone surrogates are a 400 with their own code.
- The path and the query string may not carry NUL or lone surrogates (PostgreSQL text cannot
  hold NUL; a surrogate cannot be encoded), nor be absurdly long: 400 ``invalid_string`` /
  ``too_long`` before routing reaches a handler or a query.
"""

from __future__ import annotations

from typing import Any

from flask import Flask, request
from flask.json.provider import DefaultJSONProvider

from tracecore.exceptions import UserError
from tracecore.infra import strict_json

# No path parameter names anything longer (names are at most 128 characters, ids are UUIDs,
# emails 254); the query string carries a few short parameters.
MAX_PATH_CHARS = 2048
MAX_QUERY_CHARS = 4096


class StrictJSONProvider(DefaultJSONProvider):
    """``request.get_json()`` and ``flask.json.loads`` decode strictly, like every other body."""

    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        return strict_json.loads(s)


def check_request() -> None:
    """``before_request``: refuse a path or query string that no handler could use."""
    if len(request.path) > MAX_PATH_CHARS:
        raise UserError(f"the path is longer than {MAX_PATH_CHARS} characters", code="too_long",
                        details={"limit": MAX_PATH_CHARS})
    strict_json.check_text(request.path, "the path")
    if not request.query_string:
        return
    if len(request.query_string) > MAX_QUERY_CHARS:
        raise UserError(f"the query string is longer than {MAX_QUERY_CHARS} bytes", code="too_long",
                        details={"limit": MAX_QUERY_CHARS})
    for key, value in request.args.items(multi=True):
        strict_json.check_text(key, "the query string")
        strict_json.check_text(value, "the query string")


def register(app: Flask) -> None:
    app.json = StrictJSONProvider(app)
    app.before_request_funcs.setdefault(None, []).insert(0, check_request)  # before authentication
