"""Start a Celery worker on the ``trace`` queue and the org queues beside it (the app comes from the
composition root, ``scheduler/worker.py``)."""

from __future__ import annotations

import os

from celery import Celery

from tracecore.settings import Settings

from . import messages


def run(celery: Celery, settings: Settings, *, concurrency: int | None = None, pool: str = "prefork",
        name: str | None = None) -> None:
    # Every queue in one BRPOP, taken in turn (kombu's round-robin order): docs/reliability.md, Fairness.
    queues = ",".join(messages.queue_names(str(celery.conf.task_default_queue), settings.broker_org_queues))
    argv = ["worker", "--loglevel=WARNING", f"--concurrency={concurrency or settings.worker_concurrency}",
            f"--pool={pool}", f"--queues={queues}", f"--hostname={name or f'trace-{os.getpid()}@%h'}",
            # Gossip, mingle and events cost start-up time and broker traffic; the
            # lease, not Celery's view of its peers, is what keeps work exclusive.
            "--without-gossip", "--without-mingle", "--without-heartbeat"]
    celery.worker_main(argv)
