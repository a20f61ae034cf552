"""Start a Celery worker on the ``trace`` queue (the app comes from the composition root,
``scheduler/worker.py``)."""

from __future__ import annotations

import os

from celery import Celery

from tracecore.settings import Settings


def run(celery: Celery, settings: Settings, *, concurrency: int | None = None, pool: str = "prefork",
        name: str | None = None) -> None:
    argv = ["worker", "--loglevel=WARNING", f"--concurrency={concurrency or settings.worker_concurrency}",
            f"--pool={pool}", "--queues=trace", f"--hostname={name or f'trace-{os.getpid()}@%h'}",
            # Gossip, mingle and events cost start-up time and broker traffic; the
            # lease, not Celery's view of its peers, is what keeps work exclusive.
            "--without-gossip", "--without-mingle", "--without-heartbeat"]
    celery.worker_main(argv)
