"""Caps on long polls (``GET /v1/runs/{id}?wait=``), so that waiting never starves the API.

Why: the API serves WSGI on a fixed pool of blocking threads per process (``web.server``,
``TRACE_API_THREADS``). A long poll holds one thread (and one PostgreSQL connection for its
LISTEN) until the run finishes or the wait runs out, so twelve waits from one reader took every
thread and another org's ``GET /v1/me`` queued for 29 s (issue 11). WSGI cannot give the thread
back while a request waits, so the number of waits held at once is capped instead, per process:

- in total, ``TRACE_RUN_WAIT_MAX_TOTAL`` (default: half the request threads, at least 1), so at
  least half the threads always serve ordinary requests, whoever waits;
- per org, ``TRACE_RUN_WAIT_MAX_PER_ORG`` (default: half the total, at least 1), so one org never
  holds every waiting slot and another org's waits are still held;
- per user, ``TRACE_RUN_WAIT_MAX_PER_PRINCIPAL`` (default 2), so one reader cannot use up its org's.

A wait past any cap is not an error: it answers at once with the run's current state (as
``wait=0`` would) and the headers ``Trace-Wait: refused`` and ``Retry-After: 1``. Clients that
follow a run (``trace run --wait``) simply ask again. A held wait answers ``Trace-Wait: held``.
The slots are counted in this process only (each API worker process has its own threads).
"""

from __future__ import annotations

import os
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from tracecore.settings import Settings


@dataclass(frozen=True)
class WaitCaps:
    total: int
    per_org: int
    per_principal: int

    @classmethod
    def of(cls, settings: Settings) -> WaitCaps:
        threads = settings.api_threads or api_threads_default()
        total = settings.run_wait_max_total or max(1, threads // 2)
        per_org = settings.run_wait_max_per_org or max(1, total // 2)
        return cls(total=total, per_org=per_org, per_principal=max(1, settings.run_wait_max_per_principal))


def api_threads_default() -> int:
    """granian's own ceiling: twice the cores plus one (``web.server``)."""
    return (os.cpu_count() or 1) * 2 + 1


class WaitSlots:
    """The long polls this process holds, by org and by principal."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._total = 0
        self._orgs: Counter[uuid.UUID] = Counter()
        self._principals: Counter[uuid.UUID] = Counter()

    @contextmanager
    def hold(self, caps: WaitCaps, org_id: uuid.UUID, principal_id: uuid.UUID) -> Iterator[bool]:
        """Yields whether a slot was free (and holds it until the block ends); never blocks."""
        with self._lock:
            free = (self._total < caps.total and self._orgs[org_id] < caps.per_org
                    and self._principals[principal_id] < caps.per_principal)
            if free:
                self._total += 1
                self._orgs[org_id] += 1
                self._principals[principal_id] += 1
        try:
            yield free
        finally:
            if free:
                with self._lock:
                    self._total -= 1
                    self._orgs[org_id] -= 1
                    self._principals[principal_id] -= 1

    def held(self, org_id: uuid.UUID | None = None) -> int:
        """Waits held now: in total, or of one org."""
        with self._lock:
            return self._total if org_id is None else self._orgs[org_id]


SLOTS = WaitSlots()
