"""Time and webhook triggers: schedule rows, scheduled ticks, webhook triggers, the run rate limit.

A ``Schedule`` row is derived from a job's ``schedule:`` every time its DAG is saved
(``catalog.sync_schedules``, part of the save); only ``paused`` is set through the API. The beat (``fire_due``)
inserts ``ScheduledTick(job_id, scheduled_for)`` with ``ON CONFLICT DO NOTHING`` and the
run in the same transaction, so a restarted beat, or two beats, make exactly one run
per tick.

Missed ticks: the ticks due since the last fired one (or since the schedule was made).
``catch_up: 0`` (skip) fires only the latest; ``catch_up: N`` fires the latest and up to
N missed ticks before it.

A webhook secret must be usable to verify HMACs, so it is stored, but encrypted
(Fernet, with a key derived from the platform's secret key): a database dump alone
does not reveal it. It is answered once, at creation.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
import secrets
import time
import uuid
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

from croniter import croniter
from cryptography.fernet import Fernet
from sqlalchemy import (
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    Uuid,
    func,
    select,
)
from sqlalchemy.orm import Mapped, mapped_column

from tracecore.dags import sql
from tracecore.dags.catalog import Job, Schedule, get_job, sync_schedules
from tracecore.db.engine import Base, created_at, db, uuid_pk
from tracecore.exceptions import NotFound, Unauthenticated, ValidationError
from tracecore.execution import runs
from tracecore.execution.tokens import secret_key
from tracecore.infra.strict_json import loads
from tracecore.settings import Settings

SIGNATURE_TOLERANCE_S = 300


class ScheduledTick(Base):
    __tablename__ = "scheduled_ticks"
    __table_args__ = (UniqueConstraint("job_id", "scheduled_for", name="uq_scheduled_ticks_job_time"),)
    id: Mapped[uuid.UUID] = uuid_pk()
    org_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("orgs.id", ondelete="CASCADE"), nullable=False)
    job_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False)
    scheduled_for: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    run_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, ForeignKey("runs.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = created_at()


class TriggerFiring(Base):
    """The fire-once guard and ledger of data, refresh, idle and composite triggers: one row per
    (job, update or round), inserted in the same transaction as the run it fires, so a duplicate
    delivery fires nothing. ``outcome`` says what became of it: ``fired`` (``run_id``), ``skipped``
    (a false ``when``, or an update a DAG run of the job covers) or ``error`` (``detail``)."""

    __tablename__ = "trigger_firings"
    __table_args__ = (UniqueConstraint("job_id", "key", name="uq_trigger_firings_job_key"),
                      CheckConstraint("outcome IN ('fired', 'skipped', 'error')", name="outcome"),
                      Index("ix_trigger_firings_job_created", "job_id", "created_at"))
    id: Mapped[uuid.UUID] = uuid_pk()
    org_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("orgs.id", ondelete="CASCADE"), nullable=False)
    job_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False)
    key: Mapped[str] = mapped_column(String(512), nullable=False)
    run_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, ForeignKey("runs.id", ondelete="SET NULL"))
    outcome: Mapped[str] = mapped_column(String(16), nullable=False, server_default="fired")
    detail: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = created_at()


class WebhookTrigger(Base):
    __tablename__ = "webhook_triggers"
    id: Mapped[uuid.UUID] = uuid_pk()
    org_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("orgs.id", ondelete="CASCADE"), nullable=False)
    job_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False)
    secret_encrypted: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)
    created_by: Mapped[uuid.UUID | None] = mapped_column(Uuid, ForeignKey("users.id"))
    created_at: Mapped[datetime] = created_at()


# --- schedules ----------------------------------------------------------------------------------------------


def set_paused(org_id: uuid.UUID, job_name: str, paused: bool) -> Schedule:
    row = db.session.scalar(select(Schedule).join(Job, Job.id == Schedule.job_id).where(
        Schedule.org_id == org_id, Job.name == job_name, Job.deleted_at.is_(None)))
    if row is None:
        raise NotFound(f"job {job_name!r} has no schedule")
    row.paused = paused
    return row


def due_ticks(schedule: Schedule, now: datetime, after: datetime) -> list[datetime]:
    """The ticks to fire at ``now``: the latest due tick after ``after``, and up to
    ``catch_up`` missed ones before it (oldest first)."""
    want = 1 + max(0, schedule.catch_up)
    found: list[datetime] = []
    if schedule.every_s:
        step = schedule.every_s
        latest = math.floor(now.timestamp() / step) * step
        for k in range(want):
            at = latest - k * step
            if at <= after.timestamp():
                break
            found.append(datetime.fromtimestamp(at, UTC))
    elif schedule.cron:
        zone = ZoneInfo(schedule.timezone or "UTC")
        iterator = croniter(schedule.cron, now.astimezone(zone))
        for _ in range(want):
            tick = iterator.get_prev(datetime)
            if tick <= after:
                break
            found.append(tick.astimezone(UTC))
    return sorted(found)


def fire_due(now: datetime | None = None) -> list[uuid.UUID]:
    """Fire every live schedule's due ticks; answers the task ids to enqueue after the commit.

    A schedule's ticks commit with their runs in one transaction: a tick another beat already
    took inserts nothing (the unique key waits for that beat's transaction, then DO NOTHING)
    and makes no run.
    """
    now = now or datetime.now(UTC)
    rows = db.session.execute(
        select(Schedule, Job.name, func.max(ScheduledTick.scheduled_for))
        .join(Job, Job.id == Schedule.job_id)
        .outerjoin(ScheduledTick, ScheduledTick.job_id == Schedule.job_id)
        .where(Schedule.paused.is_(False), Job.deleted_at.is_(None))
        .group_by(Schedule.id, Job.name)).all()
    for schedule, _, _ in rows:
        db.session.expunge(schedule)  # plain values from here on: commits below do not reload them
    db.session.commit()
    task_ids: list[uuid.UUID] = []
    for schedule, job_name, last in rows:
        after = last or schedule.created_at
        fired: list[uuid.UUID] = []
        for at in due_ticks(schedule, now, after):
            tick_id = db.session.execute(sql.INSERT_TICK, {"id": uuid.uuid4(), "org_id": schedule.org_id,
                                                           "job_id": schedule.job_id, "scheduled_for": at}).scalar()
            if tick_id is None:
                continue  # another beat fired this tick
            run_id, task_id = runs.create_run(org_id=schedule.org_id, job_name=job_name, cause="schedule",
                                              triggered_by=None, parameters={"scheduled_for": at.isoformat()})
            db.session.execute(sql.SET_TICK_RUN, {"run_id": run_id, "id": tick_id})
            fired.append(task_id)
        db.session.commit()  # a schedule's ticks commit with their runs, together
        task_ids.extend(fired)
    return task_ids


# --- webhooks -----------------------------------------------------------------------------------------------


def _fernet(settings: Settings) -> Fernet:
    key = hashlib.sha256(b"trace-webhook-secrets:" + secret_key(settings)).digest()
    return Fernet(base64.urlsafe_b64encode(key))


def create_webhook(settings: Settings, org_id: uuid.UUID, job_name: str,
                   user_id: uuid.UUID | None) -> tuple[WebhookTrigger, str]:
    job = get_job(org_id, job_name)
    secret = "whsec_" + secrets.token_urlsafe(32)
    trigger = WebhookTrigger(org_id=org_id, job_id=job.id, created_by=user_id,
                             secret_encrypted=_fernet(settings).encrypt(secret.encode()))
    db.session.add(trigger)
    db.session.flush()
    return trigger, secret


def get_webhook(trigger_id: str) -> WebhookTrigger:
    try:
        trigger_uuid = uuid.UUID(trigger_id)
    except ValueError:
        raise NotFound("no such webhook trigger") from None
    trigger = db.session.get(WebhookTrigger, trigger_uuid)
    if trigger is None:
        raise NotFound("no such webhook trigger")
    return trigger


def sign(secret: str, timestamp: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


def verify_webhook(settings: Settings, trigger: WebhookTrigger, timestamp: str | None, signature: str | None,
                   body: bytes, redis_client: Any, now: float | None = None) -> None:
    """Raise Unauthenticated unless the signature is good, fresh and not seen before."""
    if not timestamp or not signature:
        raise Unauthenticated("send X-Trace-Timestamp and X-Trace-Signature", code="bad_signature")
    try:
        sent = int(timestamp)
    except ValueError:
        raise Unauthenticated("X-Trace-Timestamp is not unix seconds", code="bad_timestamp") from None
    if abs((now or time.time()) - sent) > SIGNATURE_TOLERANCE_S:
        raise Unauthenticated("the timestamp is outside the 5 minutes' tolerance", code="stale_timestamp")
    secret = _fernet(settings).decrypt(trigger.secret_encrypted).decode()
    if not hmac.compare_digest(sign(secret, timestamp, body).encode(), signature.strip().encode()):
        raise Unauthenticated("bad signature", code="bad_signature")
    # Seen signatures live in Redis for twice the tolerance: SET NX answers None on a replay.
    key = f"trace:webhook-seen:{trigger.id}:{hashlib.sha256(signature.encode()).hexdigest()}"
    if not redis_client.set(key, b"1", nx=True, ex=2 * SIGNATURE_TOLERANCE_S):
        raise Unauthenticated("this signature was already used (replay)", code="replayed_signature")


def parse_body(body: bytes) -> dict[str, Any]:
    value = loads(body or b"{}")  # depth, NaN, huge integers, NUL, surrogates: 400 with their code
    if not isinstance(value, dict):
        raise ValidationError("the body must be a JSON object", code="invalid_json")
    return value


# --- rate limit ---------------------------------------------------------------------------------------------


def ticks_for(job_id: uuid.UUID) -> list[ScheduledTick]:
    return list(db.session.scalars(select(ScheduledTick).where(ScheduledTick.job_id == job_id)
                                   .order_by(ScheduledTick.scheduled_for)))


__all__ = ["Schedule", "ScheduledTick", "WebhookTrigger", "create_webhook",
           "due_ticks", "fire_due", "get_webhook", "set_paused", "sync_schedules", "verify_webhook"]
