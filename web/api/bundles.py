"""Bundles: POST /v1/bundles (multipart upload), GET /v1/bundles, GET /v1/bundles/{bundle_id}."""

from __future__ import annotations

from flask import request
from flask.typing import ResponseReturnValue
from marshmallow import Schema, fields
from werkzeug.exceptions import RequestEntityTooLarge

from tracecore.db.engine import db
from tracecore.exceptions import UserError, ValidationError
from tracecore.execution import bundles
from tracecore.infra.storage import object_store
from tracecore.settings import current_settings
from tracecore.tenancy import audit
from tracecore.tenancy.orgs import Role

from ..auth import current
from . import Blueprint

blp = Blueprint("bundles", __name__, url_prefix="/v1", description="UDF bundles: Lambda-style zips")

# The request may carry the zip plus a little multipart framing and the two text fields.
MAX_REQUEST_BYTES = bundles.MAX_ZIPPED + 1024 * 1024

UPLOAD_BODY_DOC = {
    "required": True,
    "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["file", "runtime", "handler"],
        "properties": {
            "file": {"type": "string", "format": "binary", "description": "The zip, at most 50 MB"},
            "runtime": {"type": "string", "enum": list(bundles.RUNTIMES)},
            "handler": {"type": "string", "description": "module.function, e.g. trace.handler; for `provided` "
                                                         "it is handed to the bootstrap"},
        }}}},
}


class BundleTooLarge(UserError):
    """The request body is over the limit; refused before it is read."""

    code = "bundle_too_large"
    http_status = 413


class BundleOut(Schema):
    id = fields.UUID()
    sha256 = fields.String()
    size = fields.Integer()
    runtime = fields.String()
    handler = fields.String()
    entries = fields.Integer()
    unzipped_size = fields.Integer()
    created_by = fields.UUID(allow_none=True)
    created_at = fields.DateTime()


def _form() -> tuple[bytes, str, str]:
    """The three fields; each missing one is a ``missing_field`` naming it."""
    try:
        upload = request.files.get("file")
        runtime = request.form.get("runtime", "").strip()
        handler = request.form.get("handler", "").strip()
    except RequestEntityTooLarge:
        raise BundleTooLarge(f"a bundle upload is at most {MAX_REQUEST_BYTES} bytes",
                             details={"path": "file", "limit": bundles.MAX_ZIPPED}) from None
    for name, value in (("file", upload), ("runtime", runtime), ("handler", handler)):
        if not value:
            raise ValidationError(f"the multipart form needs a {name!r} field", path=name, code="missing_field")
    assert upload is not None
    # Read at most one byte past the limit: a longer stream is refused without holding it all.
    data = upload.stream.read(bundles.MAX_ZIPPED + 1)
    return data, runtime, handler


@blp.route("/bundles", methods=["POST"])
@blp.doc(requestBody=UPLOAD_BODY_DOC)
@blp.response(201, BundleOut, description="A new bundle")
@blp.alt_response(200, schema=BundleOut, description="The same bytes, runtime and handler were uploaded before: "
                                                     "the existing bundle")
def upload_bundle() -> tuple[bundles.Bundle, int]:
    """Upload a zip. 201 with the new bundle; 200 with the existing one when the same bytes were
    already uploaded with the same runtime and handler (bundles are content-addressed, so an
    upload is idempotent). Invalid archives answer 400 with a precise code; a body over the
    limit answers 413 ``bundle_too_large``."""
    principal = current(Role.writer)
    data, runtime, handler = _form()
    bundle = bundles.save_bundle(principal.org_id, data, runtime, handler, user_id=principal.user_id,
                                 store=object_store(current_settings()))
    audit.record(org_id=principal.org_id, actor_id=principal.user_id, action="bundle.upload", object_type="bundle",
                 object_id=bundle.id, sha256=bundle.sha256, runtime=runtime, handler=handler, new=bundle.is_new)
    db.session.commit()
    return bundle, 201 if bundle.is_new else 200


@blp.route("/bundles")
@blp.response(200, BundleOut(many=True))
def list_bundles() -> ResponseReturnValue:
    principal = current()
    return bundles.list_bundles(principal.org_id)


@blp.route("/bundles/<bundle_id>")
@blp.response(200, BundleOut)
def get_bundle(bundle_id: str) -> bundles.Bundle:
    principal = current()
    return bundles.get_bundle(principal.org_id, bundle_id)
