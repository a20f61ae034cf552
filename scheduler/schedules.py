"""The database-backed beat scheduler: job schedules are rows (``tracecore.dags.triggers``).

We write a small ``celery.beat.Scheduler`` subclass instead of using
``sqlalchemy-celery-beat``: that library keeps its own tables and session (not our
Flask-SQLAlchemy models and org-scoped jobs), and it sends Celery messages per entry,
with no per-tick unique key, so two beats (or a restarted one) can double a run. Here
each tick is an ``INSERT ... ON CONFLICT DO NOTHING`` into ``scheduled_ticks`` committed
with its run, which is what makes "exactly one run per (job, scheduled_for)" hold.

The platform's own periodic tasks (the lease reaper) stay ordinary beat entries
(``beat_schedule``), kept in memory: losing their last run time on restart is harmless.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from celery.beat import Scheduler
from flask import Flask

from scheduler import composite, reactive
from tracecore.dags import triggers
from tracecore.db.engine import db
from workers.app import enqueue

log = logging.getLogger(__name__)


class DatabaseScheduler(Scheduler):
    """Beat entries from ``beat_schedule`` plus, on every tick, the due job schedules and, every
    ``sweep_interval``, the sweep of data, refresh, idle and composite triggers."""

    flask_app: Flask
    poll_interval: float = 0.5
    sweep_interval: float = 2.0
    _last_sweep: float = 0.0

    def tick(self, *args: Any, **kwargs: Any) -> float:
        self.fire_job_schedules()
        if time.monotonic() - self._last_sweep >= self.sweep_interval:
            self._last_sweep = time.monotonic()
            self.sweep_triggers()
        interval = super().tick(*args, **kwargs)
        return min(interval, self.poll_interval)

    def sweep_triggers(self) -> None:
        """The durable path of data and composite triggers; each sweep commits job by job."""
        with self.flask_app.app_context():
            task_ids: list = []
            for sweep in (reactive.sweep, composite.sweep):
                try:
                    task_ids += sweep()
                except Exception:
                    log.exception("trigger sweep failed; retrying at the next sweep")
                finally:
                    db.session.remove()
            for task_id in task_ids:
                enqueue(self.flask_app, task_id)

    def fire_job_schedules(self) -> None:
        with self.flask_app.app_context():
            try:
                task_ids = triggers.fire_due()
            except Exception:
                db.session.rollback()
                log.exception("firing job schedules failed; retrying at the next tick")
                return
            finally:
                db.session.remove()
            for task_id in task_ids:
                enqueue(self.flask_app, task_id)  # a lost message is re-sent by the reaper


def scheduler_for(flask_app: Flask, poll_interval: float, sweep_interval: float = 2.0) -> type[DatabaseScheduler]:
    return type("BoundDatabaseScheduler", (DatabaseScheduler,),
                {"flask_app": flask_app, "poll_interval": poll_interval, "sweep_interval": sweep_interval})
