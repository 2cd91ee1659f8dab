"""Revocation at scale: revoked signing keys, a per-app not-before time for its tokens, and
live revocations counted per app.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A revoked key leaves the JWKS at once and verifies nothing more.
    with op.batch_alter_table("signing_keys") as batch:
        batch.add_column(sa.Column("revoked_at", sa.BigInteger, nullable=True))
    # Tokens of the app issued before this time are refused (`apps revoke-tokens`).
    with op.batch_alter_table("apps") as batch:
        batch.add_column(sa.Column("tokens_not_before", sa.BigInteger, nullable=True))
    # Revocations are capped per app: counting an app's live ones needs this index.
    op.create_index(
        "ix_revoked_tokens_client_expires", "revoked_tokens", ["client_id", "expires_at"]
    )


def downgrade() -> None:
    op.drop_index("ix_revoked_tokens_client_expires", "revoked_tokens")
    with op.batch_alter_table("apps") as batch:
        batch.drop_column("tokens_not_before")
    with op.batch_alter_table("signing_keys") as batch:
        batch.drop_column("revoked_at")
