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
)

client_secrets = Table(
    "client_secrets",
    metadata,
    Column("secret_id", String(40), primary_key=True),
    Column("client_id", String(36), ForeignKey("apps.client_id"), nullable=False, index=True),
    Column("secret_hash", LargeBinary(64), nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("expires_at", BigInteger, nullable=True),
)

customers = Table(
    "customers",
    metadata,
    Column("customer_id", String(36), primary_key=True),
    Column("client_id", String(36), ForeignKey("apps.client_id"), nullable=False),
    Column("app_user_id", String(255), nullable=False),
    Column("created_at", BigInteger, nullable=False),
    UniqueConstraint("client_id", "app_user_id", name="uq_customers_app_user"),
)

signing_keys = Table(
    "signing_keys",
    metadata,
    Column("kid", String(64), primary_key=True),
    Column("alg", String(10), nullable=False),
    Column("state", String(10), nullable=False),
    Column("encrypted_private_key", LargeBinary, nullable=False),
    Column("public_jwk", Text, nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("activated_at", BigInteger, nullable=True),
    Column("retired_at", BigInteger, nullable=True),
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
