"""Runtimes: GET /v1/runtimes, each bundle runtime with the vetted libraries its image carries."""

from __future__ import annotations

from marshmallow import Schema, fields

from tracecore import runtimes

from ..auth import current
from . import Blueprint

blp = Blueprint("runtimes", __name__, url_prefix="/v1",
                description="Bundle runtimes and the vetted libraries a bundle may import without vendoring")


class LibraryOut(Schema):
    name = fields.String()
    version = fields.String(metadata={"description": "Pinned: the exact version in the image"})
    reason = fields.String(metadata={"description": "Why it is in the vetted set"})
    dependency = fields.Boolean(metadata={"description": "There because another vetted library needs it"})


class RuntimeOut(Schema):
    name = fields.String(metadata={"description": "The bundle's runtime field"})
    image = fields.String()
    language = fields.String()
    libraries = fields.List(fields.Nested(LibraryOut))
    import_note = fields.String(metadata={"description": "How a handler gets at them; a bundle's vendored copy "
                                                         "always wins over the image's"})



@blp.route("/runtimes")
@blp.response(200, RuntimeOut(many=True), description="Every runtime; nothing else can be imported unless the bundle "
                                            "vendors it, and nothing is installed at run time")
def list_runtimes() -> list[runtimes.Runtime]:
    current()  # any member of any role
    return list(runtimes.runtimes())
