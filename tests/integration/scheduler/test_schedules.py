"""Time triggers through real beat processes: one run per (job, scheduled_for), whatever beats do.

Schedules are ``every: 1s``; a test asserts the recorded ticks and runs, never timings.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

from flask.testing import FlaskClient
from sqlalchemy import text

from tests.conftest import Processes, Tenant, wait_for
from tracecore.db.engine import db

TICKING = "- name: ticker\n  runtime: platform\n  operator: noop\n  activation: scheduled\n  schedule: {schedule}\n"


def put_dag(client: FlaskClient, tenant: Tenant, schedule: str = "{every: 1s}") -> None:
    response = client.put("/v1/dags/clock", data=TICKING.format(schedule=schedule),
                          headers={**tenant.headers(), "Content-Type": "application/yaml"})
    assert response.status_code == 200, response.json


def counts() -> tuple[int, int, int]:
    """(ticks, schedule runs, distinct ticked times); committed state only."""
    db.session.rollback()
    row = db.session.execute(text(
        "SELECT (SELECT count(*) FROM scheduled_ticks), (SELECT count(*) FROM runs WHERE cause = 'schedule'),"
        " (SELECT count(DISTINCT (job_id, scheduled_for)) FROM scheduled_ticks)")).one()
    return row[0], row[1], row[2]


def assert_one_run_per_tick() -> int:
    ticks, scheduled_runs, distinct = counts()
    assert ticks == scheduled_runs == distinct, (ticks, scheduled_runs, distinct)
    db.session.rollback()
    unlinked = db.session.execute(text(
        "SELECT count(*) FROM scheduled_ticks t LEFT JOIN runs r ON r.id = t.run_id "
        "WHERE r.id IS NULL OR r.parameters->>'scheduled_for' IS NULL")).scalar()
    assert unlinked == 0
    return ticks


def test_the_schedule_row_follows_the_dag(client: FlaskClient, tenant: Tenant) -> None:
    put_dag(client, tenant, "{cron: '*/5 * * * *', timezone: Europe/Paris, catch_up: 2}")
    row = db.session.execute(text("SELECT cron, every_s, timezone, catch_up, paused FROM schedules")).one()
    assert tuple(row) == ("*/5 * * * *", None, "Europe/Paris", 2, False)
    response = client.put("/v1/dags/clock", data="- name: ticker\n  runtime: platform\n  operator: noop\n",
                          headers={**tenant.headers(), "Content-Type": "application/yaml"})
    assert response.status_code == 200, response.json
    db.session.rollback()
    assert db.session.execute(text("SELECT count(*) FROM schedules")).scalar() == 0


def test_cron_ticks_are_computed_in_the_time_zone(client: FlaskClient, tenant: Tenant) -> None:
    from tracecore.dags.triggers import Schedule, due_ticks

    schedule = Schedule(cron="0 9 * * *", timezone="America/New_York", catch_up=2)
    now = datetime(2026, 7, 3, 12, 0, tzinfo=UTC)
    ticks = due_ticks(schedule, now, now - timedelta(days=10))
    assert [t.hour for t in ticks] == [13, 13, 13]  # 09:00 EDT = 13:00 UTC
    assert due_ticks(Schedule(cron="0 9 * * *", timezone="UTC", catch_up=0), now, now - timedelta(days=10)) == [
        datetime(2026, 7, 3, 9, 0, tzinfo=UTC)]


def test_beat_killed_and_restarted_makes_one_run_per_tick(client: FlaskClient, tenant: Tenant,
                                                          processes: Processes) -> None:
    put_dag(client, tenant)
    for round_ in range(3):
        beat = processes.beat()
        before = counts()[0]
        wait_for(lambda before=before: counts()[0] >= before + 2, timeout=30, message=f"ticks (round {round_})")
        processes.stop_all()  # SIGKILL, whatever the beat was doing
        assert beat.poll() is not None
    assert assert_one_run_per_tick() >= 6


def test_two_beats_make_one_run_per_tick(client: FlaskClient, tenant: Tenant, processes: Processes) -> None:
    put_dag(client, tenant)
    processes.beat()
    processes.beat()
    wait_for(lambda: counts()[0] >= 6, timeout=30, message="six ticks")
    processes.stop_all()
    assert_one_run_per_tick()


def test_pause_stops_runs_and_resume_restarts_them(client: FlaskClient, tenant: Tenant,
                                                    processes: Processes) -> None:
    put_dag(client, tenant)
    processes.beat()
    wait_for(lambda: counts()[0] >= 1, timeout=30, message="a first tick")
    response = client.post("/v1/jobs/ticker/schedule/pause", headers=tenant.headers("writer"))
    assert response.status_code == 200 and response.json["paused"] is True, response.json
    assert client.post("/v1/jobs/ticker/schedule/pause", headers=tenant.headers("reader")).status_code == 403
    paused_at = counts()[0]
    time.sleep(1.5)  # a tick already being fired when the pause committed may still land
    settled = counts()[0]
    assert settled <= paused_at + 1
    time.sleep(3)  # three ticks' worth of a paused schedule: nothing
    assert counts()[0] == settled
    response = client.post("/v1/jobs/ticker/schedule/resume", headers=tenant.headers("writer"))
    assert response.status_code == 200 and response.json["paused"] is False
    wait_for(lambda: counts()[0] >= settled + 2, timeout=30, message="ticks after resume")
    processes.stop_all()
    assert_one_run_per_tick()


def _first_batch_after(old: datetime) -> int:
    db.session.rollback()
    return db.session.execute(text(
        "SELECT count(*) FROM scheduled_ticks WHERE scheduled_for > :old AND created_at = "
        "(SELECT min(created_at) FROM scheduled_ticks WHERE scheduled_for > :old)"), {"old": old}).scalar()


def _seed_old_tick(old: datetime) -> None:
    db.session.execute(text(
        "INSERT INTO scheduled_ticks (id, org_id, job_id, scheduled_for) "
        "SELECT gen_random_uuid(), org_id, job_id, :old FROM schedules"), {"old": old})
    db.session.commit()


def test_catch_up_fires_the_bounded_number_of_missed_ticks(client: FlaskClient, tenant: Tenant,
                                                           processes: Processes) -> None:
    put_dag(client, tenant, "{every: 1s, catch_up: 3}")
    old = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=30)
    _seed_old_tick(old)
    processes.beat()
    wait_for(lambda: _first_batch_after(old) > 0, timeout=30, message="the catch-up batch")
    assert _first_batch_after(old) == 4  # the latest tick and 3 missed ones, out of 29 missed


def test_skip_fires_only_the_latest_missed_tick(client: FlaskClient, tenant: Tenant,
                                                processes: Processes) -> None:
    put_dag(client, tenant)
    old = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=30)
    _seed_old_tick(old)
    processes.beat()
    wait_for(lambda: _first_batch_after(old) > 0, timeout=30, message="the first batch")
    assert _first_batch_after(old) == 1
