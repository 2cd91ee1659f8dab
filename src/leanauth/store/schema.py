"""The registry's tables (SQLAlchemy Core). Times are integer Unix seconds (UTC)."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    false,
)

metadata = MetaData()

apps = Table(
    "apps",
    metadata,
    Column("client_id", String(36), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("scopes", String(100), nullable=False),  # comma list of scope classes
    Column("token_ttl", Integer, nullable=True),
    Column("enabled", Boolean, nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("introspect", Boolean, nullable=False, server_default=false()),
    Column("quota_hourly", Integer, nullable=True),
    Column("quota_daily", Integer, nullable=True),
    # Tokens of the app issued (iat) before this time are refused: `apps revoke-tokens`.
    Column("tokens_not_before", BigInteger, nullable=True),
)

client_secrets = Table(
    "client_secrets",
    metadata,
    Column("secret_id", String(40), primary_key=True),
    Column("client_id", String(36), ForeignKey("apps.client_id"), nullable=False, index=True),
    Column("secret_hash", LargeBinary(64), nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("expires_at", BigInteger, nullable=True),
    Column("last_used_at", BigInteger, nullable=True),
)

customers = Table(
    "customers",
    metadata,
    Column("customer_id", String(36), primary_key=True),
    Column("client_id", String(36), ForeignKey("apps.client_id"), nullable=False),
    Column("app_user_id", String(255), nullable=False),
    Column("created_at", BigInteger, nullable=False),
    UniqueConstraint("client_id", "app_user_id", name="uq_customers_app_user"),
    Index("ix_customers_client_customer", "client_id", "customer_id"),
)

signing_keys = Table(
    "signing_keys",
    metadata,
    Column("kid", String(64), primary_key=True),
    Column("alg", String(10), nullable=False),
    Column("encrypted_private_key", LargeBinary, nullable=False),
    Column("public_jwk", Text, nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("activates_at", BigInteger, nullable=False),
    # Set by `keys revoke`: the key leaves the JWKS and verifies nothing from then on.
    Column("revoked_at", BigInteger, nullable=True),
)

changes = Table(
    "changes",
    metadata,
    Column("change_id", Integer, primary_key=True, autoincrement=True),
    Column("kind", String(10), nullable=False),
    Column("entity_id", String(64), nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Index("ix_changes_created_at", "created_at"),
)

revoked_tokens = Table(
    "revoked_tokens",
    metadata,
    Column("jti", String(64), primary_key=True),
    Column("client_id", String(36), nullable=False),
    Column("expires_at", BigInteger, nullable=False),
    Column("revoked_at", BigInteger, nullable=False),
    Index("ix_revoked_tokens_expires_at", "expires_at"),
    Index("ix_revoked_tokens_client_expires", "client_id", "expires_at"),
)

app_usage = Table(
    "app_usage",
    metadata,
    Column("client_id", String(36), primary_key=True),
    Column("window", String(16), primary_key=True),  # "h:2026112907" or "d:20261129" (UTC)
    Column("tokens", BigInteger, nullable=False),
)

audit_events = Table(
    "audit_events",
    metadata,
    Column("event_id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True),
    Column("at_ms", BigInteger, nullable=False),
    Column("kind", String(32), nullable=False),
    Column("outcome", String(32), nullable=False),
    Column("client_id", String(64), nullable=True),
    Column("source", String(64), nullable=True),
    Column("detail", Text, nullable=True),
    Index("ix_audit_events_at", "at_ms"),
    Index("ix_audit_events_client_at", "client_id", "at_ms"),
)
