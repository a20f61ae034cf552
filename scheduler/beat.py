"""`trace beat`: Celery beat. For now its schedule holds the platform's own periodic
tasks (the lease reaper); the triggers issue moves job schedules into the database."""

from __future__ import annotations

from tracecore.settings import Settings


def run(settings: Settings) -> None:
    from workers.app import create_worker_app

    celery = create_worker_app()
    schedule_file = settings.home_path / "beat-schedule"
    settings.home_path.mkdir(parents=True, exist_ok=True)
    celery.Beat(loglevel="WARNING", schedule=str(schedule_file), quiet=True).run()
