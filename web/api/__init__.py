"""REST blueprints, one per noun, each a :class:`Blueprint` of this package."""

from __future__ import annotations

from typing import Any

import flask
import flask_smorest
from marshmallow import Schema
from webargs import core
from webargs.flaskparser import FlaskParser, is_json_request
from werkzeug.exceptions import UnsupportedMediaType

from tracecore.infra import strict_json
from tracecore.taskapi.calls import PayloadTooLarge

# Bounds of request fields, matching the columns they are compared with or stored in.
INT32_MAX = 2**31 - 1  # PostgreSQL integer: versions, counts
NAME_MAX = 128  # job, DAG and dataset names (String(64) / String(128) columns)
ORG_NAME_MAX = 64
EMAIL_MAX = 254
SEARCH_MAX = 256
# A JSON body of the API (bundles are multipart; DAG files and the task API have their own bounds).
JSON_BODY_MAX = 1024 * 1024


class JsonBodyParser(FlaskParser):
    """Arguments from a JSON body. A body of another type is refused (415) rather than read as
    "no arguments": a form post to ``/v1/jobs/{name}/runs`` would otherwise start a run with
    its fields silently dropped. An empty body still means "all defaults"."""

    def load_json(self, req: flask.Request, schema: Schema) -> Any:
        if not is_json_request(req) and req.get_data(cache=True):
            raise UnsupportedMediaType(
                f"the request body must be JSON (Content-Type: application/json), not {req.mimetype or 'untyped'}")
        return super().load_json(req, schema)

    def _raw_load_json(self, req: flask.Request) -> Any:
        """The body through ``tracecore.infra.strict_json``: depth, NaN, huge integers, NUL and lone
        surrogates answer 400 with their own code instead of reaching a handler (or a 500)."""
        if not is_json_request(req):
            return core.missing
        if (req.content_length or 0) > JSON_BODY_MAX:
            raise PayloadTooLarge(f"a JSON body is at most {JSON_BODY_MAX} bytes", details={"limit": JSON_BODY_MAX})
        data = req.get_data(cache=True)
        if len(data) > JSON_BODY_MAX:  # a chunked body has no Content-Length to check first
            raise PayloadTooLarge(f"a JSON body is at most {JSON_BODY_MAX} bytes", details={"limit": JSON_BODY_MAX})
        return strict_json.loads(data) if data else core.missing


class Blueprint(flask_smorest.Blueprint):
    ARGUMENTS_PARSER = JsonBodyParser()

    def arguments(self, schema: type[Schema] | Schema, *args: Any, **kwargs: Any) -> Any:
        """As flask-smorest's, with a schema class made an instance once here: webargs would
        build one per request (copying its fields), a tenth of a trigger's framework time."""
        return super().arguments(schema() if isinstance(schema, type) else schema, *args, **kwargs)
