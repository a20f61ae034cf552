"""chains: registered chains, hot chain tables, reorgs, cold chunks, backfills; the platform org

Revision ID: 0012
Revises: 0011

Chain data is platform data: its datasets belong to a platform org made here with a fixed id
(``tracecore.data.datasets.PLATFORM_ORG_ID``), and ``datasets.kind`` admits ``chain``.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

PLATFORM_ORG_ID = "00000000-0000-0000-0000-000000000001"
U64 = sa.Numeric(precision=20, scale=0)


def _chain_fk(table: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(["chain"], ["chains.name"], name=op.f(f"fk_{table}_chain_chains"),
                                   ondelete="CASCADE", onupdate="CASCADE")


def upgrade() -> None:
    op.execute(f"INSERT INTO orgs (id, name) VALUES ('{PLATFORM_ORG_ID}', 'trace-platform') ON CONFLICT DO NOTHING")
    op.drop_constraint(op.f("ck_datasets_kind"), "datasets", type_="check")
    op.create_check_constraint(op.f("ck_datasets_kind"), "datasets", "kind IN ('raw', 'derived', 'buffered', 'chain')")

    op.create_table(
        "chains",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("name", sa.String(length=32), nullable=False),
        sa.Column("chain_id", sa.BigInteger(), nullable=False),
        sa.Column("rpc_urls", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("ws_url", sa.Text(), nullable=True),
        sa.Column("finality", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("start_block", sa.BigInteger(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("stopped_reason", sa.Text(), nullable=True),
        sa.Column("rewrite_from", sa.BigInteger(), nullable=True),
        sa.Column("head", sa.BigInteger(), nullable=True),
        sa.Column("head_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("ingested_block", sa.BigInteger(), nullable=True),
        sa.Column("ingested_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finalized_block", sa.BigInteger(), nullable=True),
        sa.Column("cold_boundary", sa.BigInteger(), nullable=False),
        sa.Column("health", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("completeness", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column("lease_owner", sa.String(length=128), nullable=True),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("fence", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint("state IN ('following', 'stopped')", name=op.f("ck_chains_state")),
        sa.CheckConstraint("chain_id >= 0", name=op.f("ck_chains_chain_id")),
        sa.CheckConstraint("start_block >= 0", name=op.f("ck_chains_start_block")),
        sa.CheckConstraint("cold_boundary >= -1", name=op.f("ck_chains_cold_boundary")),
        sa.CheckConstraint("fence >= 0", name=op.f("ck_chains_fence")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_chains")),
        sa.UniqueConstraint("name", name=op.f("uq_chains_name")),
    )
    op.create_table(
        "chain_blocks",
        sa.Column("chain", sa.String(length=32), nullable=False),
        sa.Column("block_number", sa.BigInteger(), nullable=False),
        sa.Column("block_hash", sa.LargeBinary(), nullable=False),
        sa.Column("parent_hash", sa.LargeBinary(), nullable=False),
        sa.Column("author", sa.LargeBinary(), nullable=True),
        sa.Column("gas_used", sa.BigInteger(), nullable=True),
        sa.Column("extra_data", sa.LargeBinary(), nullable=True),
        sa.Column("timestamp", sa.BigInteger(), nullable=True),
        sa.Column("base_fee_per_gas", U64, nullable=True),
        sa.Column("chain_id", sa.BigInteger(), nullable=True),
        sa.Column("ingested_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        _chain_fk("chain_blocks"),
        sa.PrimaryKeyConstraint("chain", "block_number", name=op.f("pk_chain_blocks")),
    )
    op.create_table(
        "chain_transactions",
        sa.Column("chain", sa.String(length=32), nullable=False),
        sa.Column("block_number", sa.BigInteger(), nullable=False),
        sa.Column("transaction_index", sa.BigInteger(), nullable=False),
        sa.Column("transaction_hash", sa.LargeBinary(), nullable=True),
        sa.Column("nonce", sa.BigInteger(), nullable=True),
        sa.Column("from_address", sa.LargeBinary(), nullable=True),
        sa.Column("to_address", sa.LargeBinary(), nullable=True),
        sa.Column("value_binary", sa.LargeBinary(), nullable=True),
        sa.Column("value_string", sa.Text(), nullable=True),
        sa.Column("value_f64", sa.Double(), nullable=True),
        sa.Column("input", sa.LargeBinary(), nullable=True),
        sa.Column("gas_limit", sa.BigInteger(), nullable=True),
        sa.Column("gas_used", sa.BigInteger(), nullable=True),
        sa.Column("gas_price", U64, nullable=True),
        sa.Column("transaction_type", sa.BigInteger(), nullable=True),
        sa.Column("max_priority_fee_per_gas", U64, nullable=True),
        sa.Column("max_fee_per_gas", U64, nullable=True),
        sa.Column("success", sa.Boolean(), nullable=True),
        sa.Column("n_input_bytes", sa.BigInteger(), nullable=True),
        sa.Column("n_input_zero_bytes", sa.BigInteger(), nullable=True),
        sa.Column("n_input_nonzero_bytes", sa.BigInteger(), nullable=True),
        sa.Column("chain_id", sa.BigInteger(), nullable=True),
        _chain_fk("chain_transactions"),
        sa.PrimaryKeyConstraint("chain", "block_number", "transaction_index", name=op.f("pk_chain_transactions")),
    )
    op.create_table(
        "chain_logs",
        sa.Column("chain", sa.String(length=32), nullable=False),
        sa.Column("block_number", sa.BigInteger(), nullable=False),
        sa.Column("log_index", sa.BigInteger(), nullable=False),
        sa.Column("transaction_index", sa.BigInteger(), nullable=True),
        sa.Column("transaction_hash", sa.LargeBinary(), nullable=True),
        sa.Column("address", sa.LargeBinary(), nullable=True),
        sa.Column("topic0", sa.LargeBinary(), nullable=True),
        sa.Column("topic1", sa.LargeBinary(), nullable=True),
        sa.Column("topic2", sa.LargeBinary(), nullable=True),
        sa.Column("topic3", sa.LargeBinary(), nullable=True),
        sa.Column("data", sa.LargeBinary(), nullable=True),
        sa.Column("chain_id", sa.BigInteger(), nullable=True),
        _chain_fk("chain_logs"),
        sa.PrimaryKeyConstraint("chain", "block_number", "log_index", name=op.f("pk_chain_logs")),
    )
    op.create_table(
        "chain_reorgs",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("chain", sa.String(length=32), nullable=False),
        sa.Column("fork_block", sa.BigInteger(), nullable=False),
        sa.Column("depth", sa.Integer(), nullable=False),
        sa.Column("old_hashes", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("new_hashes", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("beyond_finality", sa.Boolean(), nullable=False),
        sa.Column("detected_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint("depth >= 1", name=op.f("ck_chain_reorgs_depth")),
        _chain_fk("chain_reorgs"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_chain_reorgs")),
    )
    op.create_index(op.f("ix_chain_reorgs_chain"), "chain_reorgs", ["chain"], unique=False)
    op.create_table(
        "chain_chunks",
        sa.Column("chain", sa.String(length=32), nullable=False),
        sa.Column("dataset", sa.String(length=16), nullable=False),
        sa.Column("start_block", sa.BigInteger(), nullable=False),
        sa.Column("end_block", sa.BigInteger(), nullable=False),
        sa.Column("key", sa.Text(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("rows", sa.BigInteger(), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("origin", sa.String(length=16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint("dataset IN ('blocks', 'transactions', 'logs')", name=op.f("ck_chain_chunks_dataset")),
        sa.CheckConstraint("end_block >= start_block AND start_block >= 0", name=op.f("ck_chain_chunks_range")),
        sa.CheckConstraint("origin IN ('compaction', 'backfill')", name=op.f("ck_chain_chunks_origin")),
        _chain_fk("chain_chunks"),
        sa.PrimaryKeyConstraint("chain", "dataset", "start_block", name=op.f("pk_chain_chunks")),
    )
    op.create_table(
        "chain_backfills",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("chain", sa.String(length=32), nullable=False),
        sa.Column("from_block", sa.BigInteger(), nullable=False),
        sa.Column("to_block", sa.BigInteger(), nullable=False),
        sa.Column("datasets", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("chunks_total", sa.Integer(), nullable=False),
        sa.Column("chunks_done", sa.Integer(), nullable=False),
        sa.Column("chunks_skipped", sa.Integer(), nullable=False),
        sa.Column("blocks_done", sa.BigInteger(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_by", sa.Uuid(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("state IN ('running', 'done', 'failed')", name=op.f("ck_chain_backfills_state")),
        sa.CheckConstraint("to_block >= from_block AND from_block >= 0", name=op.f("ck_chain_backfills_range")),
        sa.CheckConstraint("chunks_done >= 0 AND chunks_done <= chunks_total", name=op.f("ck_chain_backfills_progress")),
        _chain_fk("chain_backfills"),
        sa.ForeignKeyConstraint(["created_by"], ["users.id"], name=op.f("fk_chain_backfills_created_by_users"),
                                ondelete="SET NULL"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_chain_backfills")),
    )
    op.create_index(op.f("ix_chain_backfills_chain"), "chain_backfills", ["chain"], unique=False)
    op.create_table(
        "chain_backfill_chunks",
        sa.Column("backfill_id", sa.Uuid(), nullable=False),
        sa.Column("start_block", sa.BigInteger(), nullable=False),
        sa.Column("done_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.ForeignKeyConstraint(["backfill_id"], ["chain_backfills.id"],
                                name=op.f("fk_chain_backfill_chunks_backfill_id_chain_backfills"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("backfill_id", "start_block", name=op.f("pk_chain_backfill_chunks")),
    )


def downgrade() -> None:
    for table in ("chain_backfill_chunks", "chain_backfills", "chain_chunks", "chain_reorgs", "chain_logs",
                  "chain_transactions", "chain_blocks", "chains"):
        op.drop_table(table)
    op.execute("DELETE FROM datasets WHERE kind = 'chain'")
    op.drop_constraint(op.f("ck_datasets_kind"), "datasets", type_="check")
    op.create_check_constraint(op.f("ck_datasets_kind"), "datasets", "kind IN ('raw', 'derived', 'buffered')")
    op.execute(f"DELETE FROM orgs WHERE id = '{PLATFORM_ORG_ID}'")
