"""`trace api`: the API under gunicorn (threads, so a long-poll does not block others)."""

from __future__ import annotations

import gc
from typing import Any

from gunicorn.app.base import BaseApplication

from tracecore.settings import Settings


class _Gunicorn(BaseApplication):  # type: ignore[misc]
    def __init__(self, settings: Settings, options: dict[str, Any]) -> None:
        self._settings = settings
        self._options = options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self._options.items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        from .app import create_app

        app = create_app(self._settings)
        # The app's hundreds of thousands of long-lived objects (Flask, SQLAlchemy, marshmallow,
        # the OpenAPI spec) leave the collector's generations: a full collection then walks only
        # what requests allocate, instead of pausing a request for milliseconds now and then.
        gc.freeze()
        return app


def serve(settings: Settings, *, workers: int = 2, threads: int = 8) -> None:
    _Gunicorn(settings, {
        "bind": f"{settings.host}:{settings.port}", "workers": workers, "threads": threads,
        "worker_class": "gthread", "accesslog": None, "errorlog": "-", "loglevel": "warning",
        "graceful_timeout": 10, "timeout": 60, "proc_name": "trace-api",
    }).run()
