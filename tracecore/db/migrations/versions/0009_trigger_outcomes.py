"""trigger outcomes: why a trigger fired or did not; refresh and idle run causes

Revision ID: 0009
Revises: 0008

``trigger_firings`` becomes the ledger of every update or round a trigger consumed: ``outcome``
``fired`` (a run), ``skipped`` (its ``when`` condition was false, or the update came from a
DAG run that runs the job anyway) or ``error`` (the condition failed), with ``detail``.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

_CAUSES_BEFORE = ("schedule", "webhook", "data", "dependency", "composite", "manual", "rerun")
_CAUSES_AFTER = (*_CAUSES_BEFORE, "refresh", "idle")
_OUTCOMES = ("fired", "skipped", "error")


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(value) for value in values)})"


def upgrade() -> None:
    op.add_column("trigger_firings", sa.Column("outcome", sa.String(length=16), server_default="fired",
                                               nullable=False))
    op.add_column("trigger_firings", sa.Column("detail", sa.Text(), nullable=True))
    op.create_check_constraint("outcome", "trigger_firings", _in("outcome", _OUTCOMES))
    op.create_index("ix_trigger_firings_job_created", "trigger_firings", ["job_id", "created_at"])
    op.create_index("ix_dataset_versions_dataset_created", "dataset_versions", ["dataset_id", "created_at"])
    op.create_index("ix_tasks_job_created", "tasks", ["job_id", "created_at"])
    op.drop_constraint(op.f("ck_runs_cause"), "runs", type_="check")
    op.create_check_constraint("cause", "runs", _in("cause", _CAUSES_AFTER))


def downgrade() -> None:
    op.execute(sa.text("DELETE FROM runs WHERE cause IN ('refresh', 'idle')"))
    op.drop_constraint(op.f("ck_runs_cause"), "runs", type_="check")
    op.create_check_constraint("cause", "runs", _in("cause", _CAUSES_BEFORE))
    op.drop_index("ix_tasks_job_created", table_name="tasks")
    op.drop_index("ix_dataset_versions_dataset_created", table_name="dataset_versions")
    op.drop_index("ix_trigger_firings_job_created", table_name="trigger_firings")
    op.drop_constraint(op.f("ck_trigger_firings_outcome"), "trigger_firings", type_="check")
    op.drop_column("trigger_firings", "detail")
    op.drop_column("trigger_firings", "outcome")
