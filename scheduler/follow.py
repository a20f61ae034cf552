"""The chain follower process's composition root (`trace follow`).

The follower (``workers/chain/follower.py``) commits chain updates and announces them as domain
events; this module, a layer above it, connects the scheduler's receivers so each update fires
the reactive jobs downstream at once (the beat's sweep is the net). It also applies
``TRACE_CHAINS`` before following.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

from tracecore.appctx import create_base_app
from tracecore.chain.registration import register_declared
from tracecore.db.engine import db
from tracecore.infra import embedded
from tracecore.settings import Settings, configure
from workers.app import make_celery
from workers.chain import follower

from . import hooks


def run(settings: Settings, stop: threading.Event | None = None) -> None:
    settings = configure(embedded.attach(settings))
    flask_app = create_base_app(settings, name="trace-follow")
    make_celery(flask_app)
    hooks.connect()
    with flask_app.app_context():
        if settings.chains.strip():
            register_declared(settings.chains)
            db.session.commit()
    stop = stop or threading.Event()

    def request_stop(signum: int, frame: Any) -> None:
        stop.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, request_stop)
        signal.signal(signal.SIGINT, request_stop)
    logging.getLogger(__name__).info("following chains as %s", follower.owner_name())
    follower.run(flask_app, stop)
