"""`trace api`: the API under granian (WSGI; each worker process runs requests on a pool of
blocking threads; long polls are capped to part of them, ``web.long_polls``)."""

from __future__ import annotations

from tracecore.settings import Settings

from .long_polls import api_threads_default


def serve(settings: Settings, *, workers: int = 2, threads: int | None = None) -> None:
    """Serve on ``settings``' host and port. Each worker process builds its app from ``TRACE_*``
    itself (web/wsgi.py), so settings reach it through the environment, not this argument.
    ``threads`` per worker (``TRACE_API_THREADS``) default to granian's own ceiling, twice the
    cores plus one; long polls may hold only part of them (``web.long_polls``), so ordinary
    requests of every org always find a thread."""
    threads = threads or settings.api_threads or api_threads_default()
    from granian import Granian
    from granian.constants import Interfaces
    from granian.log import LogLevels

    # granian (a Rust HTTP server) answers a request ~0.2 ms sooner than gunicorn's gthread
    # worker did here, a quarter of the platform's own share of a manual trigger's latency.
    Granian("web.wsgi:create", factory=True, address=settings.host, port=settings.port,
            interface=Interfaces.WSGI, workers=workers, blocking_threads=threads, backpressure=threads,
            log_level=LogLevels.warning, log_access=False).serve()
