"""datasets: versions, partitions, lineage edges, cross-org and PII grants

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "datasets",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("org_id", sa.Uuid(), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("schema", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column("schema_fingerprint", sa.String(length=64), nullable=True),
        sa.Column("unique_key", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("pii", sa.Boolean(), nullable=False),
        sa.Column("current_version", sa.Integer(), nullable=True),
        sa.Column("latest_version", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("producer_job_id", sa.Uuid(), nullable=True),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint("kind IN ('raw', 'derived', 'buffered')", name=op.f("ck_datasets_kind")),
        sa.CheckConstraint(
            "current_version IS NULL OR (current_version >= 1 AND current_version <= latest_version)",
            name=op.f("ck_datasets_current_version"),
        ),
        sa.CheckConstraint("latest_version >= 0", name=op.f("ck_datasets_latest_version")),
        sa.ForeignKeyConstraint(["org_id"], ["orgs.id"], name=op.f("fk_datasets_org_id_orgs"), ondelete="CASCADE"),
        sa.ForeignKeyConstraint(
            ["producer_job_id"], ["jobs.id"], name=op.f("fk_datasets_producer_job_id_jobs"), ondelete="SET NULL"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_datasets")),
        sa.UniqueConstraint("org_id", "name", name=op.f("uq_datasets_org_id_name")),
    )
    op.create_index("ix_datasets_producer_job_id", "datasets", ["producer_job_id"], unique=False)
    op.create_table(
        "dataset_grants",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("dataset_id", sa.Uuid(), nullable=False),
        sa.Column("org_id", sa.Uuid(), nullable=False),
        sa.Column("grantee_org_id", sa.Uuid(), nullable=False),
        sa.Column("granted_by", sa.Uuid(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.ForeignKeyConstraint(
            ["dataset_id"], ["datasets.id"], name=op.f("fk_dataset_grants_dataset_id_datasets"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["granted_by"], ["users.id"], name=op.f("fk_dataset_grants_granted_by_users"), ondelete="SET NULL"
        ),
        sa.ForeignKeyConstraint(
            ["grantee_org_id"], ["orgs.id"], name=op.f("fk_dataset_grants_grantee_org_id_orgs"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["org_id"], ["orgs.id"], name=op.f("fk_dataset_grants_org_id_orgs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_dataset_grants")),
        sa.UniqueConstraint("dataset_id", "grantee_org_id", name=op.f("uq_dataset_grants_dataset_id_grantee_org_id")),
    )
    op.create_table(
        "partitions",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("dataset_id", sa.Uuid(), nullable=False),
        sa.Column("org_id", sa.Uuid(), nullable=False),
        sa.Column("key", sa.String(length=256), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("range_start", sa.String(length=64), nullable=False),
        sa.Column("range_end", sa.String(length=64), nullable=False),
        sa.Column("latest_version", sa.Integer(), nullable=False),
        sa.Column("rows", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint("kind IN ('block_range', 'date')", name=op.f("ck_partitions_kind")),
        sa.ForeignKeyConstraint(
            ["dataset_id"], ["datasets.id"], name=op.f("fk_partitions_dataset_id_datasets"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(["org_id"], ["orgs.id"], name=op.f("fk_partitions_org_id_orgs"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_partitions")),
        sa.UniqueConstraint("dataset_id", "key", name=op.f("uq_partitions_dataset_id_key")),
    )
    op.create_table(
        "pii_grants",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("dataset_id", sa.Uuid(), nullable=False),
        sa.Column("org_id", sa.Uuid(), nullable=False),
        sa.Column("user_id", sa.Uuid(), nullable=False),
        sa.Column("granted_by", sa.Uuid(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.ForeignKeyConstraint(
            ["dataset_id"], ["datasets.id"], name=op.f("fk_pii_grants_dataset_id_datasets"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["granted_by"], ["users.id"], name=op.f("fk_pii_grants_granted_by_users"), ondelete="SET NULL"
        ),
        sa.ForeignKeyConstraint(["org_id"], ["orgs.id"], name=op.f("fk_pii_grants_org_id_orgs"), ondelete="CASCADE"),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name=op.f("fk_pii_grants_user_id_users"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_pii_grants")),
        sa.UniqueConstraint("dataset_id", "user_id", name=op.f("uq_pii_grants_dataset_id_user_id")),
    )
    op.create_table(
        "dataset_versions",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("dataset_id", sa.Uuid(), nullable=False),
        sa.Column("org_id", sa.Uuid(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("manifest", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("rows", sa.BigInteger(), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("schema_fingerprint", sa.String(length=64), nullable=True),
        sa.Column("attempt_id", sa.Uuid(), nullable=True),
        sa.Column("task_id", sa.Uuid(), nullable=True),
        sa.Column("run_id", sa.Uuid(), nullable=True),
        sa.Column("partition_key", sa.String(length=256), nullable=True),
        sa.Column("metadata", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint("rows >= 0 AND bytes >= 0", name=op.f("ck_dataset_versions_sizes")),
        sa.CheckConstraint("version >= 1", name=op.f("ck_dataset_versions_version")),
        sa.ForeignKeyConstraint(
            ["attempt_id"], ["attempts.id"], name=op.f("fk_dataset_versions_attempt_id_attempts"), ondelete="SET NULL"
        ),
        sa.ForeignKeyConstraint(
            ["dataset_id"], ["datasets.id"], name=op.f("fk_dataset_versions_dataset_id_datasets"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["org_id"], ["orgs.id"], name=op.f("fk_dataset_versions_org_id_orgs"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.id"], name=op.f("fk_dataset_versions_run_id_runs"), ondelete="SET NULL"
        ),
        sa.ForeignKeyConstraint(
            ["task_id"], ["tasks.id"], name=op.f("fk_dataset_versions_task_id_tasks"), ondelete="SET NULL"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_dataset_versions")),
        sa.UniqueConstraint("dataset_id", "version", name=op.f("uq_dataset_versions_dataset_id_version")),
    )
    op.create_table(
        "lineage_edges",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("org_id", sa.Uuid(), nullable=False),
        sa.Column("attempt_id", sa.Uuid(), nullable=True),
        sa.Column("run_id", sa.Uuid(), nullable=True),
        sa.Column("job_id", sa.Uuid(), nullable=True),
        sa.Column("input_dataset_id", sa.Uuid(), nullable=True),
        sa.Column("input_version", sa.Integer(), nullable=True),
        sa.Column("input_source", sa.String(length=128), nullable=True),
        sa.Column("output_dataset_id", sa.Uuid(), nullable=False),
        sa.Column("output_version", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.ForeignKeyConstraint(
            ["attempt_id"], ["attempts.id"], name=op.f("fk_lineage_edges_attempt_id_attempts"), ondelete="SET NULL"
        ),
        sa.ForeignKeyConstraint(
            ["input_dataset_id"],
            ["datasets.id"],
            name=op.f("fk_lineage_edges_input_dataset_id_datasets"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_lineage_edges_job_id_jobs"), ondelete="SET NULL"
        ),
        sa.ForeignKeyConstraint(["org_id"], ["orgs.id"], name=op.f("fk_lineage_edges_org_id_orgs"), ondelete="CASCADE"),
        sa.ForeignKeyConstraint(
            ["output_dataset_id"],
            ["datasets.id"],
            name=op.f("fk_lineage_edges_output_dataset_id_datasets"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.id"], name=op.f("fk_lineage_edges_run_id_runs"), ondelete="SET NULL"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_lineage_edges")),
    )
    op.create_index("ix_lineage_edges_input", "lineage_edges", ["input_dataset_id"], unique=False)
    op.create_index("ix_lineage_edges_org", "lineage_edges", ["org_id"], unique=False)
    op.create_index("ix_lineage_edges_output", "lineage_edges", ["output_dataset_id", "output_version"], unique=False)
    op.create_index(
        "uq_lineage_edges_identity",
        "lineage_edges",
        [
            "output_dataset_id",
            "output_version",
            sa.literal_column("coalesce(input_dataset_id, '00000000-0000-0000-0000-000000000000'::uuid)"),
            sa.literal_column("coalesce(input_version, 0)"),
            sa.literal_column("coalesce(input_source, '')"),
        ],
        unique=True,
    )


def downgrade() -> None:
    # The hot tables of buffered datasets (ds_<dataset id hex>) are made at run time, not here.
    connection = op.get_bind()
    for (dataset_id,) in connection.execute(sa.text("SELECT id FROM datasets WHERE kind = 'buffered'")):
        op.execute(f'DROP TABLE IF EXISTS "ds_{dataset_id.hex}"')
    op.drop_index("uq_lineage_edges_identity", table_name="lineage_edges")
    op.drop_index("ix_lineage_edges_output", table_name="lineage_edges")
    op.drop_index("ix_lineage_edges_org", table_name="lineage_edges")
    op.drop_index("ix_lineage_edges_input", table_name="lineage_edges")
    op.drop_table("lineage_edges")
    op.drop_table("dataset_versions")
    op.drop_table("pii_grants")
    op.drop_table("partitions")
    op.drop_table("dataset_grants")
    op.drop_index("ix_datasets_producer_job_id", table_name="datasets")
    op.drop_table("datasets")
