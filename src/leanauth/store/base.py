"""The storage contract every backend implements (SQLite and PostgreSQL through SQLAlchemy).

Handlers never write SQL: they call this interface. Every method is one transaction.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from leanauth.keys import StoredKey
from leanauth.store.models import App, Change, ClientSecret, Credentials, Customer


class StoreError(Exception):
    """The store could not answer (connection lost, timeout): callers answer 503."""


class NotFound(LookupError):
    """The named record does not exist."""


class AlreadyExists(ValueError):
    """A unique value (such as a customer's app_user_id within its app) is already taken."""


class ChangePublisher(Protocol):
    """Told the kind of each committed change (to wake other nodes' caches)."""

    def __call__(self, kind: str) -> None: ...
    def close(self) -> None: ...


class Store(Protocol):
    def upgrade_schema(self) -> None:
        """Apply every pending migration, once even when several processes ask at once."""

    def schema_revision(self) -> str | None:
        """The schema's migration revision; None for an empty database."""

    def close(self) -> None: ...

    # Apps and their secrets
    def create_app(self, app: App, secret: ClientSecret) -> None: ...
    def get_app(self, client_id: str) -> App | None: ...
    def list_apps(self) -> Sequence[App]: ...
    def set_app_enabled(self, client_id: str, enabled: bool) -> App: ...
    def replace_secrets(self, client_id: str, secret: ClientSecret, now: int) -> None:
        """Add ``secret`` and end every other live secret of the app at ``now``."""

    def list_secrets(self, client_id: str) -> Sequence[ClientSecret]: ...
    def get_credentials(self, client_id: str, now: int) -> Credentials | None: ...
    def all_credentials(self, now: int) -> Sequence[Credentials]: ...

    # Customers
    def create_customer(self, customer: Customer) -> None: ...
    def get_customer(self, customer_id: str) -> Customer | None: ...
    def list_customers(self, client_id: str) -> Sequence[Customer]: ...

    # Signing keys
    def list_keys(self) -> Sequence[StoredKey]: ...
    def ensure_active_key(self, candidate: StoredKey) -> bool:
        """Store ``candidate`` as the active key unless one exists; True if it was stored."""

    def rotate_key(self, new_key: StoredKey, now: int) -> None:
        """Retire every active key at ``now`` and make ``new_key`` the active one."""

    # Change feed for cache freshness across processes
    def latest_change_id(self) -> int: ...
    def changes_since(self, change_id: int) -> Sequence[Change]: ...
