"""queries: saved queries and downloads (exported query results)

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('saved_queries',
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('org_id', sa.Uuid(), nullable=False),
    sa.Column('owner_id', sa.Uuid(), nullable=False),
    sa.Column('name', sa.String(length=128), nullable=False),
    sa.Column('sql', sa.Text(), nullable=False),
    sa.Column('shared', sa.Boolean(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.ForeignKeyConstraint(['org_id'], ['orgs.id'], name=op.f('fk_saved_queries_org_id_orgs'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['owner_id'], ['users.id'], name=op.f('fk_saved_queries_owner_id_users'),
                            ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_saved_queries')),
    sa.UniqueConstraint('org_id', 'owner_id', 'name', name=op.f('uq_saved_queries_org_id_owner_id_name'))
    )
    op.create_index('ix_saved_queries_org_shared', 'saved_queries', ['org_id', 'shared'], unique=False)
    op.create_table('downloads',
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('org_id', sa.Uuid(), nullable=False),
    sa.Column('created_by', sa.Uuid(), nullable=True),
    sa.Column('task_id', sa.Uuid(), nullable=True),
    sa.Column('key', sa.String(length=1024), nullable=False),
    sa.Column('format', sa.String(length=16), nullable=False),
    sa.Column('row_count', sa.BigInteger(), nullable=False),
    sa.Column('bytes', sa.BigInteger(), nullable=False),
    sa.Column('truncated', sa.Boolean(), nullable=False),
    sa.Column('sql_sha256', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.CheckConstraint("format IN ('parquet', 'csv')", name=op.f('ck_downloads_format')),
    sa.ForeignKeyConstraint(['created_by'], ['users.id'], name=op.f('fk_downloads_created_by_users'),
                            ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['org_id'], ['orgs.id'], name=op.f('fk_downloads_org_id_orgs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_downloads'))
    )
    op.create_index('ix_downloads_org_created', 'downloads', ['org_id', 'created_at'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_downloads_org_created', table_name='downloads')
    op.drop_table('downloads')
    op.drop_index('ix_saved_queries_org_shared', table_name='saved_queries')
    op.drop_table('saved_queries')
