"""`trace beat`: Celery beat with the database-backed scheduler (``scheduler.schedules``).

Job schedules are rows; the platform's periodic tasks (the lease reaper) are beat entries.
Several beats may run at once: each tick's run is made at most once (a unique key).
"""

from __future__ import annotations

from tracecore.appctx import create_base_app
from tracecore.infra import embedded
from tracecore.settings import Settings, configure
from workers.app import make_celery

from .schedules import scheduler_for


def run(settings: Settings) -> None:
    settings = configure(embedded.attach(settings))
    flask_app = create_base_app(settings, name="trace-beat")
    celery = make_celery(flask_app)
    settings.home_path.mkdir(parents=True, exist_ok=True)
    scheduler_cls = scheduler_for(flask_app, settings.beat_poll_interval, settings.trigger_sweep_interval)
    # Celery types these as str and int; it resolves a class as well as a dotted name (symbol_by_name),
    # and the interval is seconds in float arithmetic.
    celery.Beat(loglevel="WARNING", quiet=True, scheduler_cls=scheduler_cls,  # type: ignore[arg-type]
                max_interval=settings.beat_poll_interval).run()  # type: ignore[arg-type]
