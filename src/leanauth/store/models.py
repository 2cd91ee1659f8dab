"""The records the registry keeps: frozen values shared by every store backend."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

from leanauth.scopes import ScopeClass

ChangeKind = Literal["app", "customer", "key", "revocation"]


@dataclass(frozen=True, slots=True)
class App:
    client_id: str
    name: str
    scopes: frozenset[ScopeClass]
    token_ttl: int | None
    enabled: bool
    created_at: int
    # May call the introspection endpoint for any app's tokens (a resource server).
    introspect: bool = False
    # Caps on tokens issued per UTC hour and per UTC day (None: no cap).
    quota_hourly: int | None = None
    quota_daily: int | None = None
    # Tokens of this app issued (``iat``) before this time are refused everywhere.
    tokens_not_before: int | None = None

    def token_is_current(self, issued_at: float) -> bool:
        """Whether a token of this app issued at ``issued_at`` still counts: the app is
        enabled and the token is not older than the app's last ``revoke-tokens``."""
        return self.enabled and (
            self.tokens_not_before is None or issued_at >= self.tokens_not_before
        )


@dataclass(frozen=True, slots=True)
class ClientSecret:
    """A client secret as stored: only its keyed hash, never the secret itself."""

    secret_id: str
    client_id: str
    secret_hash: bytes
    created_at: int
    expires_at: int | None = None
    last_used_at: int | None = None

    def live_at(self, now: float) -> bool:
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


@dataclass(frozen=True, slots=True)
class RevokedToken:
    jti: str
    client_id: str
    expires_at: int
    revoked_at: int


class AuditEvent(NamedTuple):
    """One audit record: never a secret or a token, only what happened to whom.

    A tuple rather than a dataclass: the token path makes one per request (cheaper to make,
    and the store writes its fields as they are)."""

    at_ms: int
    kind: str
    outcome: str
    client_id: str | None = None
    source: str | None = None
    detail: dict[str, object] | None = None
    event_id: int | None = None


@dataclass(frozen=True, slots=True)
class StoredKey:
    """A signing key as the store keeps it (private part encrypted)."""

    kid: str
    alg: str
    encrypted_private_key: bytes
    public_jwk: dict[str, str]
    created_at: int
    activates_at: int
    revoked_at: int | None = None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None

    def jwk(self) -> dict[str, str]:
        return {**self.public_jwk, "kid": self.kid, "alg": self.alg, "use": "sig"}
