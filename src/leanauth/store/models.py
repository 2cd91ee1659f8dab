"""The records the registry keeps: frozen values shared by every store backend."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from leanauth.scopes import ScopeClass

ChangeKind = Literal["app", "customer", "key"]


@dataclass(frozen=True, slots=True)
class App:
    client_id: str
    name: str
    scopes: frozenset[ScopeClass]
    token_ttl: int | None
    enabled: bool
    created_at: int


@dataclass(frozen=True, slots=True)
class ClientSecret:
    """A client secret as stored: only its keyed hash, never the secret itself."""

    secret_id: str
    client_id: str
    secret_hash: bytes
    created_at: int
    expires_at: int | None = None

    def live_at(self, now: int) -> bool:
        return self.expires_at is None or now < self.expires_at


@dataclass(frozen=True, slots=True)
class Customer:
    customer_id: str
    client_id: str
    app_user_id: str
    created_at: int


@dataclass(frozen=True, slots=True)
class Credentials:
    """An app with its live secret hashes: what client authentication needs."""

    app: App
    secrets: tuple[ClientSecret, ...]


@dataclass(frozen=True, slots=True)
class Change:
    """One committed registry change, for other processes to refresh their caches."""

    change_id: int
    kind: ChangeKind
    entity_id: str
