"""org run rate: the per-org count of API-triggered runs in the current window, in PostgreSQL

Revision ID: 0010
Revises: 0009

The rate limit of API-triggered runs (TRACE_RUN_RATE_LIMIT per TRACE_RUN_RATE_WINDOW) was a
Redis counter: one more round trip on every trigger, before the run insert. A row per org,
upserted in the statement that inserts the run (tracecore/execution/runs.py), counts it in the same
round trip and inserts no run past the limit. ``window_index`` is the window's number
(epoch seconds // window, by the database's clock, so every API process agrees).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "org_run_rate",
        sa.Column("org_id", sa.Uuid(), nullable=False),
        sa.Column("window_index", sa.BigInteger(), nullable=False),
        sa.Column("runs", sa.Integer(), nullable=False),
        sa.CheckConstraint("runs >= 1", name=op.f("ck_org_run_rate_runs")),
        sa.ForeignKeyConstraint(["org_id"], ["orgs.id"], name=op.f("fk_org_run_rate_org_id_orgs"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("org_id", name=op.f("pk_org_run_rate")),
    )


def downgrade() -> None:
    op.drop_table("org_run_rate")
