"""Signing keys: generation, JWK views (RFC 7517), thumbprint kids (RFC 7638), encryption at
rest (AES-256-GCM under the key-encryption key), the rotation schedule and the key ring.

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

import base64
import binascii
import hashlib
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import orjson
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from leanauth.settings import MAX_TOKEN_TTL

KeyState = Literal["next", "active", "retired", "expired", "revoked"]
PrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey
PublicKey = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | rsa.RSAPublicKey

# How long past its retirement a key stays published: the longest token it can have signed,
# plus clock-skew leeway for verifiers.
CLOCK_SKEW_LEEWAY = 300
RETIRED_KEY_PUBLISHED_FOR = MAX_TOKEN_TTL + CLOCK_SKEW_LEEWAY


_TO_URLSAFE = bytes.maketrans(b"+/", b"-_")


def b64url(data: bytes) -> str:
    """Unpadded base64url (RFC 7515 §2); three calls per token, so straight to binascii."""
    encoded = binascii.b2a_base64(data, newline=False).translate(_TO_URLSAFE)
    return encoded.rstrip(b"=").decode("ascii")


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


def _b64decode_int(text: str) -> int:
    return int.from_bytes(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)), "big")


def load_public_key(jwk: dict[str, str]) -> PublicKey:
    """The public key object for a JWK written by :func:`public_jwk`."""
    if jwk["kty"] == "EC":
        numbers = ec.EllipticCurvePublicNumbers(
            _b64decode_int(jwk["x"]), _b64decode_int(jwk["y"]), ec.SECP256R1()
        )
        return numbers.public_key()
    if jwk["kty"] == "OKP":
        raw = base64.urlsafe_b64decode(jwk["x"] + "=" * (-len(jwk["x"]) % 4))
        return ed25519.Ed25519PublicKey.from_public_bytes(raw)
    return rsa.RSAPublicNumbers(_b64decode_int(jwk["e"]), _b64decode_int(jwk["n"])).public_key()


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


class Signer:
    """Signs JWS signing inputs with one private key, producing the JOSE signature bytes.

    The token hot path calls :meth:`sign` directly on ``cryptography`` rather than going
    through a JOSE library: PyJWT costs ~110 µs per ES256 token against ~69 µs here
    (measured; bench/README.md), and the encoder is small and tested against PyJWT.
    """

    def __init__(self, kid: str, alg: str, key: PrivateKey) -> None:
        self.kid = kid
        self.alg = alg
        header = orjson.dumps({"alg": alg, "typ": "at+jwt", "kid": kid})
        self.encoded_header = b64url(header).encode("ascii")
        # The signing function is chosen once: the hot path makes no type checks and builds
        # no padding or hash objects per token.
        self.sign: Callable[[bytes], bytes] = _signing_function(alg, key)


def _signing_function(alg: str, key: PrivateKey) -> Callable[[bytes], bytes]:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        ecdsa = ec.ECDSA(hashes.SHA256())

        def sign_es256(signing_input: bytes) -> bytes:
            # JWS (RFC 7518 §3.4) wants the raw r || s, not the DER that cryptography returns.
            r, s = decode_dss_signature(key.sign(signing_input, ecdsa))
            return r.to_bytes(32, "big") + s.to_bytes(32, "big")

        return sign_es256
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign
    digest = hashes.SHA256()
    scheme = (
        padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
        if alg == "PS256"
        else padding.PKCS1v15()
    )
    return lambda signing_input: key.sign(signing_input, scheme, digest)


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
