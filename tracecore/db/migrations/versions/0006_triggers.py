"""triggers: schedules, scheduled ticks (one run per job and tick), webhook triggers

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def _org_fk(table: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(["org_id"], ["orgs.id"], name=op.f(f"fk_{table}_org_id_orgs"), ondelete="CASCADE")


def _job_fk(table: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name=op.f(f"fk_{table}_job_id_jobs"), ondelete="CASCADE")


def upgrade() -> None:
    op.create_table(
        "schedules",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("org_id", sa.Uuid(), nullable=False),
        sa.Column("job_id", sa.Uuid(), nullable=False),
        sa.Column("cron", sa.String(length=128), nullable=True),
        sa.Column("every_s", sa.Float(), nullable=True),
        sa.Column("timezone", sa.String(length=64), nullable=False),
        sa.Column("catch_up", sa.Integer(), nullable=False),
        sa.Column("paused", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        _org_fk("schedules"), _job_fk("schedules"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_schedules")),
        sa.UniqueConstraint("job_id", name=op.f("uq_schedules_job_id")),
    )
    op.create_table(
        "scheduled_ticks",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("org_id", sa.Uuid(), nullable=False),
        sa.Column("job_id", sa.Uuid(), nullable=False),
        sa.Column("scheduled_for", sa.DateTime(timezone=True), nullable=False),
        sa.Column("run_id", sa.Uuid(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        _org_fk("scheduled_ticks"), _job_fk("scheduled_ticks"),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], name=op.f("fk_scheduled_ticks_run_id_runs"),
                                ondelete="SET NULL"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_scheduled_ticks")),
        sa.UniqueConstraint("job_id", "scheduled_for", name="uq_scheduled_ticks_job_time"),
    )
    op.create_table(
        "webhook_triggers",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("org_id", sa.Uuid(), nullable=False),
        sa.Column("job_id", sa.Uuid(), nullable=False),
        sa.Column("secret_encrypted", sa.LargeBinary(), nullable=False),
        sa.Column("created_by", sa.Uuid(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        _org_fk("webhook_triggers"), _job_fk("webhook_triggers"),
        sa.ForeignKeyConstraint(["created_by"], ["users.id"], name=op.f("fk_webhook_triggers_created_by_users")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhook_triggers")),
    )


def downgrade() -> None:
    op.drop_table("webhook_triggers")
    op.drop_table("scheduled_ticks")
    op.drop_table("schedules")
