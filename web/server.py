"""`trace api`: the API under granian (WSGI; each worker process runs requests on a pool of
blocking threads, so a long-poll does not block others)."""

from __future__ import annotations

import os

from tracecore.settings import Settings


def serve(settings: Settings, *, workers: int = 2, threads: int | None = None) -> None:
    """Serve on ``settings``' host and port. Each worker process builds its app from ``TRACE_*``
    itself (web/wsgi.py), so settings reach it through the environment, not this argument.
    ``threads`` per worker default to granian's own ceiling, twice the cores plus one: enough
    for long-polls to wait beside ordinary requests without oversubscribing the interpreter."""
    threads = threads or (os.cpu_count() or 1) * 2 + 1
    from granian import Granian
    from granian.constants import Interfaces
    from granian.log import LogLevels

    # granian (a Rust HTTP server) answers a request ~0.2 ms sooner than gunicorn's gthread
    # worker did here, a quarter of the platform's own share of a manual trigger's latency.
    Granian("web.wsgi:create", factory=True, address=settings.host, port=settings.port,
            interface=Interfaces.WSGI, workers=workers, blocking_threads=threads, backpressure=threads,
            log_level=LogLevels.warning, log_access=False).serve()
