"""Signing keys: their encryption at rest (AES-256-GCM under the key-encryption key), the
rotation schedule and the key ring (the JOSE encoding is :mod:`leanauth.jose`).

A key's life follows from two stored times, so every node derives the same states from the
same rows, and a rotation is one insert that cannot be left half done::

    created_at            activates_at            next key activates      + RETENTION
        |---- next ----------|---- active ------------|---- retired ----------|  (gone)
        published in the JWKS from created_at .......................... until here

``next``: published, signs nothing yet (verifiers' cached JWKS catch up during the
pre-publication period); ``active``: signs new tokens; ``retired``: signs nothing, stays
published until every token it signed has expired, plus clock-skew leeway.

``revoked`` (a compromised key, ``leanauth keys revoke``) overrides all of these: the key
leaves the JWKS and this server's own checks at once. A revoked key that had activated still
marks where its predecessor retired, so revoking it never brings an older key back; one
revoked before it activated never takes part in the schedule at all.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import orjson
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from leanauth.jose import (
    PrivateKey,
    PublicKey,
    Signer,
    generate_private_key,
    load_public_key,
    public_jwk,
    thumbprint,
)
from leanauth.settings import MAX_TOKEN_TTL
from leanauth.store.models import StoredKey

KeyState = Literal["next", "active", "retired", "expired", "revoked"]

# How long past its retirement a key stays published: the longest token it can have signed,
# plus clock-skew leeway for verifiers.
CLOCK_SKEW_LEEWAY = 300
RETIRED_KEY_PUBLISHED_FOR = MAX_TOKEN_TTL + CLOCK_SKEW_LEEWAY


class KeyCipher:
    """AES-256-GCM encryption of private keys at rest; the kid is bound as associated data."""

    def __init__(self, key_encryption_key: bytes) -> None:
        self._aead = AESGCM(key_encryption_key)

    def encrypt(self, kid: str, key: PrivateKey) -> bytes:
        der = key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        nonce = os.urandom(12)
        return nonce + self._aead.encrypt(nonce, der, kid.encode())

    def decrypt(self, kid: str, blob: bytes) -> PrivateKey:
        der = self._aead.decrypt(blob[:12], blob[12:], kid.encode())
        key = serialization.load_der_private_key(der, password=None)
        if not isinstance(
            key, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey
        ):
            raise ValueError(f"key {kid} has an unsupported type")
        return key


def new_stored_key(
    alg: str, cipher: KeyCipher, now: int, activates_at: int | None = None
) -> StoredKey:
    private = generate_private_key(alg)
    jwk = public_jwk(private)
    kid = thumbprint(jwk)
    return StoredKey(
        kid=kid,
        alg=alg,
        encrypted_private_key=cipher.encrypt(kid, private),
        public_jwk=jwk,
        created_at=now,
        activates_at=now if activates_at is None else activates_at,
    )


@dataclass(frozen=True, slots=True)
class KeyPhase:
    """When one key is published, signs, and leaves the JWKS (None: not scheduled yet)."""

    key: StoredKey
    retires_at: int | None
    unpublished_at: int | None

    def state(self, now: int) -> KeyState:
        if self.key.revoked:
            return "revoked"
        if now < self.key.activates_at:
            return "next"
        if self.retires_at is None or now < self.retires_at:
            return "active"
        if self.unpublished_at is None or now < self.unpublished_at:
            return "retired"
        return "expired"

    def published(self, now: int) -> bool:
        return self.state(now) not in ("expired", "revoked")


def schedule(keys: Iterable[StoredKey]) -> list[KeyPhase]:
    """Every key's phases, in activation order: a key retires when the next one activates.

    A key revoked before it activated is left out. Of two keys activating at the same moment
    (a revoked key and the key that replaced it), the revoked one comes first."""
    scheduled = [k for k in keys if k.revoked_at is None or k.revoked_at >= k.activates_at]
    ordered = sorted(scheduled, key=lambda k: (k.activates_at, k.created_at, not k.revoked, k.kid))
    phases = []
    for index, key in enumerate(ordered):
        successor = ordered[index + 1] if index + 1 < len(ordered) else None
        retires_at = successor.activates_at if successor else None
        unpublished_at = retires_at + RETIRED_KEY_PUBLISHED_FOR if retires_at is not None else None
        phases.append(KeyPhase(key, retires_at, unpublished_at))
    return phases


class KeyRing:
    """The in-process view of the signing keys at one moment: the signer and the JWKS."""

    def __init__(self, keys: Iterable[StoredKey], cipher: KeyCipher, now: int) -> None:
        phases = schedule(keys)
        active = [p.key for p in phases if p.state(now) == "active"]
        if not active:
            raise LookupError("no usable signing key; run `leanauth keys rotate --immediately`")
        key = active[-1]
        # When the signing key became active (its age is a metric).
        self.active_since = key.activates_at
        self.signer = Signer(key.kid, key.alg, cipher.decrypt(key.kid, key.encrypted_private_key))
        # Newest first: verifiers that try keys in order find the signer's key soonest.
        published = [p.key.jwk() for p in reversed(phases) if p.published(now)]
        self.jwks: dict[str, Any] = {"keys": published}
        self.jwks_body = orjson.dumps(self.jwks)
        # Public keys of every published key, for this server's own checks of its tokens
        # (introspection, revocation).
        self.public_keys: dict[str, tuple[str, PublicKey]] = {
            p.key.kid: (p.key.alg, load_public_key(p.key.public_jwk))
            for p in phases
            if p.published(now)
        }
        # The next moment a key activates or leaves the JWKS: the ring is rebuilt then.
        moments = [p.key.activates_at for p in phases] + [
            p.unpublished_at for p in phases if p.unpublished_at is not None
        ]
        self.next_change_at = min((m for m in moments if m > now), default=2**62)
