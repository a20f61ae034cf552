"""workers/tasks.py: the baseline tasks the benchmarks measure against, through a real worker."""

from __future__ import annotations

import time

from celery import Celery, chain

from tests.conftest import Processes
from tracecore.settings import Settings
from workers.app import CLOCK, PING


def test_ping_answers_and_a_chain_of_clocks_runs_in_order(settings: Settings, processes: Processes) -> None:
    celery = Celery("baseline", broker=settings.broker_url, backend=settings.broker_url, set_as_current=False)
    celery.conf.task_default_queue = "trace"
    processes.worker("w1")
    assert celery.send_task(PING).get(timeout=60) == "pong"

    before = time.time()
    last = chain(*[celery.signature(CLOCK, immutable=True) for _ in range(3)]).apply_async()
    last.get(timeout=30)
    stamps: list[float] = []
    node = last
    while node is not None:
        stamps[:0] = node.get(timeout=10)
        node = node.parent
    assert len(stamps) == 6
    # each task starts after the one before it ended, all within this test
    assert before <= stamps[0] and stamps == sorted(stamps) and stamps[-1] <= time.time()
