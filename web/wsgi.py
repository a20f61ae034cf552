"""The API's WSGI application for a server process: settings from ``TRACE_*`` (a running
``trace up`` fills in the embedded services' URLs)."""

from __future__ import annotations

import gc

from flask import Flask

from tracecore.infra import embedded
from tracecore.settings import Settings, configure

from .app import create_app


def create() -> Flask:
    app = create_app(configure(embedded.attach(Settings.from_env())))
    # The app's hundreds of thousands of long-lived objects (Flask, SQLAlchemy, marshmallow,
    # the OpenAPI spec) leave the collector's generations: a full collection then walks only
    # what requests allocate, instead of pausing a request for milliseconds now and then.
    gc.freeze()
    return app
