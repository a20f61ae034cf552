"""token installation power: installation-admin power belongs to a token, not to a user's every token

Revision ID: 0011
Revises: 0010

A token carried installation-admin power whenever its user was an installation admin, so
any org admin who minted a token for that user's email got that power. Now a token carries
it only when minted with it (``trace up``'s bootstrap, on the host) *and* its user is an
installation admin. No existing token is given the power here: ``trace up`` mints a new
admin token on its next start when the stored one lacks it.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("api_tokens", sa.Column("installation_admin", sa.Boolean(), nullable=False,
                                          server_default=sa.false()))


def downgrade() -> None:
    op.drop_column("api_tokens", "installation_admin")
