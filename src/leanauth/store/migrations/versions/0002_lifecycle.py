"""Credential lifecycle: key schedule times, secret last use, introspection and quotas per
app, revoked tokens, token usage per app and window, and the audit trail.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A key's life now follows from its times alone: published from created_at, signing from
    # activates_at until the next key activates, published until that moment + retention.
    with op.batch_alter_table("signing_keys") as batch:
        batch.add_column(sa.Column("activates_at", sa.BigInteger, nullable=True))
    op.execute("UPDATE signing_keys SET activates_at = COALESCE(activated_at, created_at)")
    with op.batch_alter_table("signing_keys") as batch:
        batch.alter_column("activates_at", existing_type=sa.BigInteger, nullable=False)
        batch.drop_column("state")
        batch.drop_column("activated_at")
        batch.drop_column("retired_at")

    with op.batch_alter_table("client_secrets") as batch:
        batch.add_column(sa.Column("last_used_at", sa.BigInteger, nullable=True))

    with op.batch_alter_table("apps") as batch:
        batch.add_column(
            sa.Column("introspect", sa.Boolean, nullable=False, server_default=sa.false())
        )
        batch.add_column(sa.Column("quota_hourly", sa.Integer, nullable=True))
        batch.add_column(sa.Column("quota_daily", sa.Integer, nullable=True))

    op.create_table(
        "revoked_tokens",
        sa.Column("jti", sa.String(64), primary_key=True),
        sa.Column("client_id", sa.String(36), nullable=False),
        sa.Column("expires_at", sa.BigInteger, nullable=False),
        sa.Column("revoked_at", sa.BigInteger, nullable=False),
    )
    op.create_index("ix_revoked_tokens_expires_at", "revoked_tokens", ["expires_at"])

    op.create_table(
        "app_usage",
        sa.Column("client_id", sa.String(36), primary_key=True),
        sa.Column("window", sa.String(16), primary_key=True),
        sa.Column("tokens", sa.BigInteger, nullable=False),
    )

    op.create_table(
        "audit_events",
        sa.Column("event_id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True),
        sa.Column("at_ms", sa.BigInteger, nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("outcome", sa.String(32), nullable=False),
        sa.Column("client_id", sa.String(64), nullable=True),
        sa.Column("source", sa.String(64), nullable=True),
        sa.Column("detail", sa.Text, nullable=True),
    )
    op.create_index("ix_audit_events_at", "audit_events", ["at_ms"])
    op.create_index("ix_audit_events_client_at", "audit_events", ["client_id", "at_ms"])


def downgrade() -> None:
    # Key states were stored in 0001 and are derived from times since: going back would have
    # to guess them. Restore a backup taken before the upgrade instead.
    raise NotImplementedError("0002 cannot be downgraded; restore the pre-upgrade backup")
