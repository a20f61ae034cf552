"""The Flask app factory: the base app, the REST blueprints, the OpenAPI document."""

from __future__ import annotations

from flask import Flask
from flask_smorest import Api

from scheduler import hooks
from tracecore.appctx import create_base_app
from tracecore.settings import Settings
from workers.app import make_celery

from . import auth, edge, errors
from .api import bundles, chains, dag_runs, dags, datasets, health, orgs, query, runs, runtimes, triggers
from .api import task as task_api_blueprint


def create_app(settings: Settings | None = None) -> Flask:
    app = create_base_app(settings, name="trace-api")
    app.config.update(
        API_TITLE="Trace", API_VERSION="v1", OPENAPI_VERSION="3.1.0", OPENAPI_URL_PREFIX="/v1",
        OPENAPI_JSON_PATH="openapi.json", JSON_SORT_KEYS=False,
        # Refuse oversize bodies before reading them; a bundle upload is the largest request (51 MB).
        MAX_CONTENT_LENGTH=bundles.MAX_REQUEST_BYTES,
        API_SPEC_OPTIONS={"components": {"securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer", "description": "An API token (trc_...)"},
            "capability": {"type": "http", "scheme": "bearer",
                           "description": "A capability token (trc1....), for sandboxes; only under /v1/task/"}}},
            "security": [{"bearer": []}]},
    )
    api = Api(app)
    for module in (health, orgs, dags, runs, dag_runs, bundles, runtimes, datasets, query, triggers, chains,
                   task_api_blueprint):
        api.register_blueprint(module.blp)
    errors.register(app)  # after Api: replaces flask-smorest's own error shape
    edge.register(app)  # strict JSON; the path and query string checked before authentication
    app.before_request(auth.load_principal)
    make_celery(app)
    hooks.connect()  # the API publishes too (the task API): the scheduler reacts to its events
    return app
