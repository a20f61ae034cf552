"""running counts: one counter row per org and per job of the tasks holding a lease

Revision ID: 0008
Revises: 0007

The fairness caps (TRACE_ORG_MAX_RUNNING, a job's ``max_concurrency``) were enforced by
counting running tasks under an advisory lock: four round trips per lease. A counter row
per org and per job, kept by the statements that take, close and reap leases, lets the
lease be one statement again: a conditional increment under the row's lock cannot admit
past the cap. ``running`` counts tasks in state ``running`` (an expired lease counts until
it is taken over or reaped); it may never go negative.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    for table, key, parent in (("org_running", "org_id", "orgs"), ("job_running", "job_id", "jobs")):
        op.create_table(
            table,
            sa.Column(key, sa.Uuid(), nullable=False),
            sa.Column("running", sa.Integer(), server_default="0", nullable=False),
            sa.CheckConstraint("running >= 0", name=op.f(f"ck_{table}_running")),
            sa.ForeignKeyConstraint([key], [f"{parent}.id"], name=op.f(f"fk_{table}_{key}_{parent}"),
                                    ondelete="CASCADE"),
            sa.PrimaryKeyConstraint(key, name=op.f(f"pk_{table}")),
        )
        # Leases held when the migration runs are counted from the start.
        op.execute(sa.text(f"INSERT INTO {table} ({key}, running) "
                           f"SELECT {key}, count(*) FROM tasks WHERE state = 'running' GROUP BY {key}"))


def downgrade() -> None:
    op.drop_table("job_running")
    op.drop_table("org_running")
