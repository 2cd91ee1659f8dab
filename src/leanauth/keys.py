"""Signing keys: generation, JWK views (RFC 7517), thumbprint kids (RFC 7638), encryption at
rest (AES-256-GCM under the key-encryption key) and the in-process key ring.

A key's life: ``active`` (signs new tokens, published) → ``retired`` (signs nothing, stays
published until every token it signed has expired, plus leeway) → gone from the JWKS.
"""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import orjson
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from leanauth.settings import MAX_TOKEN_TTL

KeyState = Literal["active", "retired"]
PrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey

# How long past its retirement a key stays published: the longest token it can have signed,
# plus clock-skew leeway for verifiers.
CLOCK_SKEW_LEEWAY = 300
RETIRED_KEY_PUBLISHED_FOR = MAX_TOKEN_TTL + CLOCK_SKEW_LEEWAY


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _uint(n: int, size: int | None = None) -> str:
    return b64url(n.to_bytes(size or (n.bit_length() + 7) // 8, "big"))


def generate_private_key(alg: str) -> PrivateKey:
    if alg == "ES256":
        return ec.generate_private_key(ec.SECP256R1())
    if alg == "EdDSA":
        return ed25519.Ed25519PrivateKey.generate()
    if alg in ("RS256", "PS256"):
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    raise ValueError(f"unsupported signing algorithm {alg!r}")


def public_jwk(key: PrivateKey) -> dict[str, str]:
    """The public members of the key as a JWK, without kid/alg/use."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        numbers = key.public_key().public_numbers()
        return {"kty": "EC", "crv": "P-256", "x": _uint(numbers.x, 32), "y": _uint(numbers.y, 32)}
    if isinstance(key, ed25519.Ed25519PrivateKey):
        raw = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        return {"kty": "OKP", "crv": "Ed25519", "x": b64url(raw)}
    rsa_numbers = key.public_key().public_numbers()
    return {"kty": "RSA", "n": _uint(rsa_numbers.n), "e": _uint(rsa_numbers.e)}


def thumbprint(jwk: dict[str, str]) -> str:
    """RFC 7638 JWK thumbprint: SHA-256 of the required members, sorted, no whitespace."""
    required = {
        "EC": ("crv", "kty", "x", "y"),
        "OKP": ("crv", "kty", "x"),
        "RSA": ("e", "kty", "n"),
    }
    canonical = orjson.dumps({name: jwk[name] for name in required[jwk["kty"]]})
    return b64url(hashlib.sha256(canonical).digest())


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


@dataclass(frozen=True, slots=True)
class StoredKey:
    """A signing key as the store keeps it (private part encrypted)."""

    kid: str
    alg: str
    state: KeyState
    encrypted_private_key: bytes
    public_jwk: dict[str, str]
    created_at: int
    activated_at: int | None = None
    retired_at: int | None = None

    def published_at(self, now: int) -> bool:
        if self.state == "active":
            return True
        return self.retired_at is not None and now < self.retired_at + RETIRED_KEY_PUBLISHED_FOR

    def jwk(self) -> dict[str, str]:
        return {**self.public_jwk, "kid": self.kid, "alg": self.alg, "use": "sig"}


def new_stored_key(alg: str, cipher: KeyCipher, now: int) -> StoredKey:
    private = generate_private_key(alg)
    jwk = public_jwk(private)
    kid = thumbprint(jwk)
    return StoredKey(
        kid=kid,
        alg=alg,
        state="active",
        encrypted_private_key=cipher.encrypt(kid, private),
        public_jwk=jwk,
        created_at=now,
        activated_at=now,
    )


class Signer:
    """Signs JWS signing inputs with one private key, producing the JOSE signature bytes.

    The token hot path calls :meth:`sign` directly on ``cryptography`` rather than going
    through a JOSE library: PyJWT costs ~110 µs per ES256 token against ~69 µs here
    (DESIGN.md's measurements), and the encoder is small and tested against PyJWT.
    """

    def __init__(self, kid: str, alg: str, key: PrivateKey) -> None:
        self.kid = kid
        self.alg = alg
        self._key = key
        header = orjson.dumps({"alg": alg, "typ": "at+jwt", "kid": kid})
        self.encoded_header = b64url(header).encode("ascii")

    def sign(self, signing_input: bytes) -> bytes:
        key = self._key
        if isinstance(key, ec.EllipticCurvePrivateKey):
            # JWS (RFC 7518 §3.4) wants the raw r || s, not the DER that cryptography returns.
            r, s = decode_dss_signature(key.sign(signing_input, ec.ECDSA(hashes.SHA256())))
            return r.to_bytes(32, "big") + s.to_bytes(32, "big")
        if isinstance(key, ed25519.Ed25519PrivateKey):
            return key.sign(signing_input)
        if self.alg == "PS256":
            pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
            return key.sign(signing_input, pss, hashes.SHA256())
        return key.sign(signing_input, padding.PKCS1v15(), hashes.SHA256())


class KeyRing:
    """The in-process view of the signing keys: one active signer and the published JWKS."""

    def __init__(self, keys: Iterable[StoredKey], cipher: KeyCipher, now: int) -> None:
        keys = sorted(keys, key=lambda k: (k.activated_at or 0, k.created_at), reverse=True)
        active = next((k for k in keys if k.state == "active"), None)
        if active is None:
            raise LookupError("no active signing key; run `leanauth keys rotate`")
        self.signer = Signer(
            active.kid, active.alg, cipher.decrypt(active.kid, active.encrypted_private_key)
        )
        published = [k.jwk() for k in keys if k.published_at(now)]
        self.jwks: dict[str, Any] = {"keys": published}
        self.jwks_body = orjson.dumps(self.jwks)
        # When the next retired key leaves the JWKS: the ring is rebuilt then.
        self.next_change_at = min(
            (
                k.retired_at + RETIRED_KEY_PUBLISHED_FOR
                for k in keys
                if k.retired_at and k.published_at(now)
            ),
            default=2**62,
        )
