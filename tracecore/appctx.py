"""The Flask application every Trace process runs inside: settings, database, plugins.

The API adds its blueprints on top (``web.app``); workers and beat use it bare so that
Celery tasks run inside an app context with the same session rules as requests.
"""

from __future__ import annotations

from flask import Flask

from tracecore.db.engine import db, sqlalchemy_url
from tracecore.execution import operators
from tracecore.settings import SETTINGS_KEY, Settings, current_settings


def create_base_app(settings: Settings | None = None, name: str = "trace") -> Flask:
    settings = settings or current_settings()
    if not settings.database_url:
        raise ValueError("settings.database_url is unset: start embedded services or set TRACE_DATABASE_URL")
    app = Flask(name)
    app.config[SETTINGS_KEY] = settings  # read through tracecore.settings.current_settings
    app.config["SQLALCHEMY_DATABASE_URI"] = sqlalchemy_url(settings.database_url)
    app.config["SQLALCHEMY_ENGINE_OPTIONS"] = {"pool_pre_ping": True, "pool_size": 10, "max_overflow": 20}
    db.init_app(app)
    operators.load_plugins(settings.plugins)
    return app
