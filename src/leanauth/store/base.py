"""The storage contract every backend implements (SQLite and PostgreSQL through SQLAlchemy).

Handlers never write SQL: they call this interface, split by role (the registry and its
change feed, usage counts, the audit trail, the database's clock); each part of the server
depends on the role it uses. Every method is one transaction, and the calls made inside
:meth:`Store.atomic` are one together.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Protocol, TypedDict, Unpack

from leanauth.scopes import ScopeClass
from leanauth.store.models import (
    App,
    AuditEvent,
    Change,
    ClientSecret,
    Credentials,
    Customer,
    RevokedToken,
    StoredKey,
)

# The change feed, as every node follows it: change rows older than this are pruned (every
# process re-reads everything far more often), and each commit is announced on this channel
# (PostgreSQL NOTIFY, or Redis pub/sub).
CHANGE_RETENTION = 3600
NOTIFY_CHANNEL = "leanauth_changes"


class StoreError(Exception):
    """The store could not answer (connection lost, timeout): callers answer 503."""


class NotFound(LookupError):
    """The named record does not exist."""


class Conflict(ValueError):
    """A concurrent change got there first (or a limit is reached); nothing was changed."""


class RejectedRecords(StoreError):
    """The database refused the records themselves (bad data), not for want of a connection:
    writing them again cannot succeed."""


class LimitReached(Conflict):
    """A cap is reached; ``retry_after`` seconds from now there is room again."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class AlreadyExists(ValueError):
    """A unique value (such as a customer's app_user_id within its app) is already taken."""


class ChangePublisher(Protocol):
    """Told the kind of each committed change (to wake other nodes' caches)."""

    def __call__(self, kind: str) -> None: ...
    def close(self) -> None: ...


class AppChanges(TypedDict, total=False):
    """The settings of an app that can change after it is created."""

    name: str
    scopes: frozenset[ScopeClass]
    enabled: bool
    introspect: bool
    token_ttl: int | None
    quota_hourly: int | None
    quota_daily: int | None
    tokens_not_before: int | None


class ChangeFeed(Protocol):
    """Every committed registry change, in order: how each node's cache stays fresh."""

    def latest_change_id(self) -> int: ...
    def changes_since(self, change_id: int) -> Sequence[Change]: ...


class RegistryStore(ChangeFeed, Protocol):
    """Apps, their secrets and customers, signing keys and revoked tokens."""

    # Apps and their secrets
    def create_app(self, app: App, secret: ClientSecret) -> None: ...
    def get_app(self, client_id: str) -> App | None: ...
    def list_apps(self) -> Sequence[App]: ...
    def update_app(self, client_id: str, **changes: Unpack[AppChanges]) -> App: ...
    def delete_app(self, client_id: str) -> dict[str, int]:
        """Remove the app with its secrets, customers, revocations and usage counts (its
        audit records stay: the trail keeps history); how many rows of each went."""

    def rotate_secret(
        self, secret: ClientSecret, now: int, old_expires_at: int, expected_live: frozenset[str]
    ) -> None: ...
    def revoke_secret(self, client_id: str, secret_id: str, now: int) -> None: ...
    def record_secret_use(self, last_used: Mapping[str, int]) -> None: ...
    def list_secrets(self, client_id: str) -> Sequence[ClientSecret]: ...
    def get_credentials(self, client_id: str, now: int) -> Credentials | None: ...
    def all_credentials(self, now: int) -> Sequence[Credentials]: ...

    # Customers
    def create_customer(self, customer: Customer) -> None: ...
    def get_customer(self, customer_id: str) -> Customer | None: ...
    def get_customers(self, customer_ids: Collection[str]) -> Sequence[Customer]: ...
    def find_customer(self, client_id: str, app_user_id: str) -> Customer | None:
        """The app's customer with this ``app_user_id`` (unique per app), if any."""

    def delete_customer(self, client_id: str, customer_id: str) -> None: ...
    def customer_members(self) -> Iterator[tuple[str, bytes]]:
        """Every app's customer ids: sorted 16-byte keys, joined in one ``bytes`` an app."""

    def list_customers(
        self, client_id: str, limit: int | None = None, after: str | None = None
    ) -> Sequence[Customer]: ...

    # Signing keys
    def list_keys(self) -> Sequence[StoredKey]: ...
    def ensure_signing_key(self, candidate: StoredKey) -> bool: ...
    def rotate_key(
        self,
        new_key: StoredKey,
        now: int,
        created_before: int | None = None,
        keep_within: int = 0,
        seen_waiting: frozenset[str] | None = None,
    ) -> StoredKey | None: ...
    def revoke_key(
        self, kid: str, now: int, replacement: StoredKey
    ) -> tuple[StoredKey, StoredKey | None]: ...

    # Revoked tokens
    def revoke_token(self, revoked: RevokedToken, max_live_per_app: int | None = None) -> bool: ...
    def get_revoked(self, jti: str) -> RevokedToken | None: ...
    def list_revoked(self, now: int) -> Sequence[RevokedToken]: ...


class UsageStore(Protocol):
    """Tokens issued per app per hour and day (the quotas' counts)."""

    def add_usage(self, deltas: Mapping[tuple[str, str], int], keep: Sequence[str]) -> None: ...
    def usage(
        self, windows: Sequence[str], client_id: str | None = None
    ) -> dict[tuple[str, str], int]: ...


class AuditStore(Protocol):
    """The audit trail."""

    def add_audit_events(self, events: Sequence[AuditEvent]) -> None:
        """Append events; :class:`RejectedRecords` when the database refuses their data."""

    def prune_audit_events(self, before_ms: int) -> int: ...
    def list_audit_events(
        self, client_id: str | None = None, since_ms: int | None = None, limit: int = 1000
    ) -> Sequence[AuditEvent]: ...


class DatabaseClock(Protocol):
    def database_time(self) -> float | None:
        """The database server's clock now, in seconds since the epoch (to compare this
        node's with); None when the database has no clock of its own (SQLite)."""


class Store(RegistryStore, UsageStore, AuditStore, DatabaseClock, Protocol):
    """Every role, and the database's life: its schema, transactions, closing."""

    def upgrade_schema(self) -> None:
        """Apply every pending migration, once even when several processes ask at once."""

    def schema_revision(self) -> str | None:
        """The schema's migration revision; None for an empty database."""

    def close(self) -> None: ...

    def atomic(self) -> AbstractContextManager[None]:
        """The calls made in the block (in this thread or task) commit together when it
        ends, or none does when it raises: an admin change and its audit record are one
        transaction. A block inside another joins it."""
