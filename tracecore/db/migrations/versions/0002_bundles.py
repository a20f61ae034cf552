"""bundles: Lambda-style zips addressed by SHA-256

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('bundles',
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('org_id', sa.Uuid(), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('size', sa.BigInteger(), nullable=False),
    sa.Column('runtime', sa.String(length=16), nullable=False),
    sa.Column('handler', sa.String(length=128), nullable=False),
    sa.Column('entries', sa.Integer(), nullable=False),
    sa.Column('unzipped_size', sa.BigInteger(), nullable=False),
    sa.Column('created_by', sa.Uuid(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.CheckConstraint("runtime IN ('python3.11', 'nodejs', 'provided')", name=op.f('ck_bundles_runtime')),
    sa.CheckConstraint("sha256 ~ '^[0-9a-f]{64}$'", name=op.f('ck_bundles_sha256')),
    sa.CheckConstraint('size > 0 AND entries >= 0 AND unzipped_size >= 0', name=op.f('ck_bundles_sizes')),
    sa.ForeignKeyConstraint(['created_by'], ['users.id'], name=op.f('fk_bundles_created_by_users')),
    sa.ForeignKeyConstraint(['org_id'], ['orgs.id'], name=op.f('fk_bundles_org_id_orgs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_bundles')),
    sa.UniqueConstraint('org_id', 'sha256', 'runtime', 'handler', name=op.f('uq_bundles_org_id_sha256_runtime_handler'))
    )


def downgrade() -> None:
    op.drop_table('bundles')
