"""Signing keys (leanauth.keys): base64url, JWK views and RFC 7638 thumbprints, encryption at
rest, the rotation schedule and the key ring built from it."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import os

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from leanauth.jose import (
    PrivateKey,
    b64url,
    generate_private_key,
    load_public_key,
    public_jwk,
    thumbprint,
)
from leanauth.keys import (
    CLOCK_SKEW_LEEWAY,
    RETIRED_KEY_PUBLISHED_FOR,
    KeyCipher,
    KeyRing,
    new_stored_key,
    schedule,
)
from leanauth.settings import MAX_TOKEN_TTL, SIGNING_ALGORITHMS
from leanauth.store.models import StoredKey

# b64url


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"", ""),
        (b"f", "Zg"),
        (b"fo", "Zm8"),
        (b"foo", "Zm9v"),
        (b"foob", "Zm9vYg"),
        (b"\xfb\xff", "-_8"),
        (b"\xff\xff\xfe", "___-"),
        (b"\x00", "AA"),
        (bytes(range(256)), base64.urlsafe_b64encode(bytes(range(256))).decode().rstrip("=")),
    ],
)
def test_b64url(data: bytes, expected: str) -> None:
    assert b64url(data) == expected
    assert "\n" not in b64url(data * 100)


# Thumbprints (RFC 7638)

RFC7638_RSA = {
    "kty": "RSA",
    "n": (
        "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECP"
        "ebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2Qvzq"
        "Y368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0"
        "fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw"
    ),
    "e": "AQAB",
    "alg": "RS256",
    "kid": "2011-04-29",
}
# RFC 8037 Appendix A.3.
RFC8037_OKP = {"crv": "Ed25519", "kty": "OKP", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}


@pytest.mark.parametrize(
    ("jwk", "expected"),
    [
        pytest.param(RFC7638_RSA, "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs", id="rfc7638-rsa"),
        pytest.param(
            {k: v for k, v in RFC7638_RSA.items() if k in ("kty", "n", "e")},
            "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs",
            id="rfc7638-rsa-required-members-only",
        ),
        pytest.param(RFC8037_OKP, "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k", id="rfc8037-okp"),
        pytest.param(
            {**RFC8037_OKP, "kid": "x", "use": "sig", "alg": "EdDSA"},
            "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k",
            id="rfc8037-okp-with-optional-members",
        ),
    ],
)
def test_thumbprint_vectors(jwk: dict[str, str], expected: str) -> None:
    assert thumbprint(jwk) == expected


def test_ec_thumbprint_covers_crv_kty_x_y_in_order() -> None:
    jwk = {"y": "Yy", "x": "Xx", "kty": "EC", "crv": "P-256", "kid": "ignored"}
    canonical = b'{"crv":"P-256","kty":"EC","x":"Xx","y":"Yy"}'
    assert thumbprint(jwk) == b64url(hashlib.sha256(canonical).digest())


def test_thumbprint_of_unknown_key_type_refused() -> None:
    with pytest.raises(KeyError):
        thumbprint({"kty": "oct", "k": "AAAA"})


# Keys of each algorithm: generation, public JWK, and back


@pytest.fixture(scope="module")
def private_keys() -> dict[str, PrivateKey]:
    return {alg: generate_private_key(alg) for alg in SIGNING_ALGORITHMS}


def public_bytes(key: object) -> bytes:
    assert isinstance(key, ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | rsa.RSAPublicKey)
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@pytest.mark.parametrize(
    ("alg", "key_type", "members"),
    [
        ("ES256", ec.EllipticCurvePrivateKey, {"kty": "EC", "crv": "P-256"}),
        ("EdDSA", ed25519.Ed25519PrivateKey, {"kty": "OKP", "crv": "Ed25519"}),
        ("RS256", rsa.RSAPrivateKey, {"kty": "RSA", "e": "AQAB"}),
        ("PS256", rsa.RSAPrivateKey, {"kty": "RSA", "e": "AQAB"}),
    ],
)
def test_public_jwk_round_trip(
    private_keys: dict[str, PrivateKey], alg: str, key_type: type, members: dict[str, str]
) -> None:
    key = private_keys[alg]
    assert isinstance(key, key_type)
    jwk = public_jwk(key)
    assert members.items() <= jwk.items()
    assert not {"d", "p", "q", "dp", "dq", "qi", "kid", "alg", "use"} & jwk.keys()
    assert all("=" not in v and "+" not in v and "/" not in v for v in jwk.values())
    assert public_bytes(load_public_key(jwk)) == public_bytes(key.public_key())


def test_every_supported_algorithm_is_covered() -> None:
    assert set(SIGNING_ALGORITHMS) == {"ES256", "EdDSA", "RS256", "PS256"}


def test_rsa_keys_are_2048_bits(private_keys: dict[str, PrivateKey]) -> None:
    for alg in ("RS256", "PS256"):
        key = private_keys[alg]
        assert isinstance(key, rsa.RSAPrivateKey)
        assert key.key_size == 2048
        assert len(base64.urlsafe_b64decode(public_jwk(key)["n"] + "==")) == 256


def test_ec_coordinates_keep_their_leading_zero_bytes() -> None:
    """x and y are always 32 bytes (RFC 7518 §6.2.1.2), even when the number is shorter."""
    d = next(
        d
        for d in range(1, 100_000)
        if ec.derive_private_key(d, ec.SECP256R1()).public_key().public_numbers().x.bit_length()
        <= 248
    )
    key = ec.derive_private_key(d, ec.SECP256R1())
    jwk = public_jwk(key)
    assert len(jwk["x"]) == len(jwk["y"]) == 43
    assert base64.urlsafe_b64decode(jwk["x"] + "=")[0] == 0
    assert public_bytes(load_public_key(jwk)) == public_bytes(key.public_key())


@pytest.mark.parametrize("alg", ["HS256", "ES384", "es256", "none", ""])
def test_unsupported_algorithms_refused(alg: str) -> None:
    with pytest.raises(ValueError, match="unsupported signing algorithm"):
        generate_private_key(alg)


# KeyCipher


@pytest.mark.parametrize("alg", SIGNING_ALGORITHMS)
def test_cipher_round_trip(private_keys: dict[str, PrivateKey], alg: str) -> None:
    cipher = KeyCipher(os.urandom(32))
    key = private_keys[alg]
    blob = cipher.encrypt("kid-1", key)
    opened = cipher.decrypt("kid-1", blob)
    assert type(opened) is type(key)
    assert public_jwk(opened) == public_jwk(key)
    der = key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    assert der not in blob


def test_each_encryption_has_its_own_nonce(private_keys: dict[str, PrivateKey]) -> None:
    cipher = KeyCipher(os.urandom(32))
    first = cipher.encrypt("kid", private_keys["ES256"])
    second = cipher.encrypt("kid", private_keys["ES256"])
    assert first[:12] != second[:12]
    assert first != second


def test_wrong_key_encryption_key_refused(private_keys: dict[str, PrivateKey]) -> None:
    blob = KeyCipher(os.urandom(32)).encrypt("kid", private_keys["EdDSA"])
    with pytest.raises(InvalidTag):
        KeyCipher(os.urandom(32)).decrypt("kid", blob)


def test_kid_is_bound_to_the_ciphertext(private_keys: dict[str, PrivateKey]) -> None:
    cipher = KeyCipher(os.urandom(32))
    blob = cipher.encrypt("kid-a", private_keys["EdDSA"])
    with pytest.raises(InvalidTag):
        cipher.decrypt("kid-b", blob)


@pytest.mark.parametrize("position", [0, 11, 12, -1])
def test_tampered_ciphertext_refused(private_keys: dict[str, PrivateKey], position: int) -> None:
    cipher = KeyCipher(os.urandom(32))
    blob = bytearray(cipher.encrypt("kid", private_keys["EdDSA"]))
    blob[position] ^= 0x01
    with pytest.raises(InvalidTag):
        cipher.decrypt("kid", bytes(blob))


def test_new_stored_key_is_named_by_its_thumbprint() -> None:
    cipher = KeyCipher(os.urandom(32))
    stored = new_stored_key("ES256", cipher, now=1000)
    assert stored.kid == thumbprint(stored.public_jwk)
    assert (stored.alg, stored.created_at, stored.activates_at, stored.revoked) == (
        "ES256",
        1000,
        1000,
        False,
    )
    assert stored.jwk() == {**stored.public_jwk, "kid": stored.kid, "alg": "ES256", "use": "sig"}
    opened = cipher.decrypt(stored.kid, stored.encrypted_private_key)
    assert public_jwk(opened) == stored.public_jwk
    assert new_stored_key("ES256", cipher, now=1000, activates_at=1600).activates_at == 1600


# schedule: the phases of stored keys


def stored(
    kid: str, created_at: int, activates_at: int, revoked_at: int | None = None
) -> StoredKey:
    return StoredKey(kid, "ES256", b"", {}, created_at, activates_at, revoked_at)


R = RETIRED_KEY_PUBLISHED_FOR


def phases_of(*keys: StoredKey) -> dict[str, tuple[int | None, int | None]]:
    return {p.key.kid: (p.retires_at, p.unpublished_at) for p in schedule(keys)}


def states(keys: list[StoredKey], now: int) -> dict[str, str]:
    return {p.key.kid: p.state(now) for p in schedule(keys)}


def test_one_key_is_never_scheduled_to_retire() -> None:
    assert phases_of(stored("a", 0, 100)) == {"a": (None, None)}
    assert states([stored("a", 0, 100)], 99) == {"a": "next"}
    assert states([stored("a", 0, 100)], 100) == {"a": "active"}
    assert states([stored("a", 0, 100)], 10**12) == {"a": "active"}


def test_a_key_retires_when_its_successor_activates() -> None:
    keys = [stored("b", 50, 200), stored("a", 0, 0)]  # given out of order
    assert [p.key.kid for p in schedule(keys)] == ["a", "b"]
    assert phases_of(*keys) == {"a": (200, 200 + R), "b": (None, None)}


@pytest.mark.parametrize(
    ("now", "expected"),
    [
        (0, {"a": "active", "b": "next", "c": "next"}),
        (50, {"a": "active", "b": "next", "c": "next"}),
        (199, {"a": "active", "b": "next", "c": "next"}),
        (200, {"a": "retired", "b": "active", "c": "next"}),
        (400, {"a": "retired", "b": "retired", "c": "active"}),
        (200 + R - 1, {"a": "retired", "b": "retired", "c": "active"}),
        (200 + R, {"a": "expired", "b": "retired", "c": "active"}),
        (400 + R, {"a": "expired", "b": "expired", "c": "active"}),
    ],
)
def test_states_over_time(now: int, expected: dict[str, str]) -> None:
    keys = [stored("a", 0, 0), stored("b", 50, 200), stored("c", 60, 400)]
    assert states(keys, now) == expected
    published = {p.key.kid for p in schedule(keys) if p.published(now)}
    assert published == {kid for kid, state in expected.items() if state != "expired"}


def test_retired_keys_stay_published_for_the_longest_token_plus_leeway() -> None:
    assert R == MAX_TOKEN_TTL + CLOCK_SKEW_LEEWAY


def test_a_key_revoked_before_it_activated_takes_no_part() -> None:
    keys = [stored("a", 0, 0), stored("b", 50, 200, revoked_at=150)]
    assert phases_of(*keys) == {"a": (None, None)}
    assert states(keys, 300) == {"a": "active"}


def test_a_revoked_key_that_had_activated_still_retires_its_predecessor() -> None:
    keys = [stored("a", 0, 0), stored("b", 50, 200, revoked_at=250), stored("c", 250, 250)]
    assert phases_of(*keys) == {"a": (200, 200 + R), "b": (250, 250 + R), "c": (None, None)}
    # Revoking b never brings a back.
    assert states(keys, 300) == {"a": "retired", "b": "revoked", "c": "active"}
    assert [p.key.kid for p in schedule(keys) if p.published(300)] == ["a", "c"]


def test_revoked_at_its_activation_moment_counts_as_activated() -> None:
    keys = [stored("a", 0, 0), stored("b", 50, 200, revoked_at=200)]
    assert phases_of(*keys) == {"a": (200, 200 + R), "b": (None, None)}
    assert states(keys, 200) == {"a": "retired", "b": "revoked"}


def test_of_two_keys_activating_together_the_revoked_one_comes_first() -> None:
    revoked = stored("zzz", 500, 500, revoked_at=500)
    replacement = stored("aaa", 500, 500)
    for keys in ([revoked, replacement], [replacement, revoked]):
        assert [p.key.kid for p in schedule(keys)] == ["zzz", "aaa"]
        assert states(keys, 500) == {"zzz": "revoked", "aaa": "active"}


def test_same_activation_is_ordered_by_creation_then_kid() -> None:
    keys = [stored("b", 10, 100), stored("a", 20, 100), stored("c", 10, 100)]
    assert [p.key.kid for p in schedule(keys)] == ["b", "c", "a"]
    assert states(keys, 100) == {"b": "retired", "c": "retired", "a": "active"}


def test_no_keys_no_phases() -> None:
    assert schedule([]) == []


# KeyRing


@pytest.fixture(scope="module")
def cipher() -> KeyCipher:
    return KeyCipher(os.urandom(32))


def test_key_ring_signs_with_the_active_key_and_publishes_newest_first(cipher: KeyCipher) -> None:
    old = new_stored_key("ES256", cipher, now=0)
    current = new_stored_key("EdDSA", cipher, now=100)
    waiting = new_stored_key("ES256", cipher, now=150, activates_at=1000)
    ring = KeyRing([waiting, old, current], cipher, now=200)
    assert (ring.signer.kid, ring.signer.alg) == (current.kid, "EdDSA")
    assert ring.active_since == 100
    assert [k["kid"] for k in ring.jwks["keys"]] == [waiting.kid, current.kid, old.kid]
    assert set(ring.public_keys) == {waiting.kid, current.kid, old.kid}
    assert ring.next_change_at == 1000
    assert b'"d"' not in ring.jwks_body


def test_key_ring_drops_expired_and_revoked_keys(cipher: KeyCipher) -> None:
    expired = new_stored_key("ES256", cipher, now=0)
    current = new_stored_key("ES256", cipher, now=100)
    revoked = dataclasses.replace(new_stored_key("ES256", cipher, now=50), revoked_at=60)
    now = 100 + R
    ring = KeyRing([expired, current, revoked], cipher, now=now)
    assert ring.signer.kid == current.kid
    assert [k["kid"] for k in ring.jwks["keys"]] == [current.kid]
    assert set(ring.public_keys) == {current.kid}
    assert ring.next_change_at == 2**62


def test_key_ring_without_an_active_key_refuses(cipher: KeyCipher) -> None:
    waiting = new_stored_key("ES256", cipher, now=0, activates_at=1000)
    with pytest.raises(LookupError, match="no usable signing key"):
        KeyRing([waiting], cipher, now=10)
    with pytest.raises(LookupError):
        KeyRing([], cipher, now=10)
