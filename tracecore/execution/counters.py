"""The counter rows the hot path keeps beside runs and tasks, declared so the schema has one source.

No code reads or writes them through these models: the lease statements (``lease``) and the
run-creating statement (``runs``) update them in the same round trip as the rows they count,
in raw SQL. The models exist so that ``Base.metadata`` describes every table the migrations
make (tests/integration/db/test_schema.py holds the two equal).
"""

from __future__ import annotations

import uuid

from sqlalchemy import BigInteger, CheckConstraint, ForeignKey, Integer, Uuid
from sqlalchemy.orm import Mapped, mapped_column

from tracecore.db.engine import Base


class OrgRunning(Base):
    """Tasks of an org in state ``running``: the TRACE_ORG_MAX_RUNNING cap is checked against it
    under the row's lock, so a lease is one statement (migration 0008)."""

    __tablename__ = "org_running"
    __table_args__ = (CheckConstraint("running >= 0", name="running"),)
    org_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("orgs.id", ondelete="CASCADE"), primary_key=True)
    running: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")


class JobRunning(Base):
    """Tasks of a job in state ``running``, against the job's ``max_concurrency`` (migration 0008)."""

    __tablename__ = "job_running"
    __table_args__ = (CheckConstraint("running >= 0", name="running"),)
    job_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    running: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")


class OrgRunRate(Base):
    """API-triggered runs of an org in the current fixed window (``window_index`` = epoch seconds //
    TRACE_RUN_RATE_WINDOW by the database's clock), upserted by the run insert (migration 0010)."""

    __tablename__ = "org_run_rate"
    __table_args__ = (CheckConstraint("runs >= 1", name="runs"),)
    org_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("orgs.id", ondelete="CASCADE"), primary_key=True)
    window_index: Mapped[int] = mapped_column(BigInteger, nullable=False)
    runs: Mapped[int] = mapped_column(Integer, nullable=False)
