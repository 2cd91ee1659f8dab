"""JWT access tokens (leanauth.tokens) signed by leanauth.jose.Signer, checked with PyJWT: the
encoder is hand-made for speed, so an independent JOSE library is the judge."""

from __future__ import annotations

import base64
import time
from typing import Any

import jwt
import pytest

from leanauth.jose import PrivateKey, Signer, generate_private_key, public_jwk, thumbprint
from leanauth.scopes import API_SCOPE, RequestedScope, parse_scope
from leanauth.settings import MIN_CUSTOMER_TOKEN_TTL, SIGNING_ALGORITHMS
from leanauth.tokens import JTI_BYTES, TokenIssuer

ISSUER = "https://auth.example.test"
AUDIENCES = {"api": "urn:leanauth:api", "customer": "urn:leanauth:link"}
CLIENT_ID = "6d0f2a4e-1c3b-4e5f-8a7b-9c0d1e2f3a4b"
CUSTOMER_ID = "0b6f3c2e-8a4d-4f1e-9c7b-5d2a1e3f4b6c"
CUSTOMER_SCOPE = parse_scope("customer." + CUSTOMER_ID.upper())
SIGNATURE_BYTES = {"ES256": 64, "EdDSA": 64, "RS256": 256, "PS256": 256}


@pytest.fixture(scope="module")
def private_keys() -> dict[str, PrivateKey]:
    return {alg: generate_private_key(alg) for alg in SIGNING_ALGORITHMS}


def signer_for(key: PrivateKey, alg: str) -> Signer:
    return Signer(thumbprint(public_jwk(key)), alg, key)


def verification_key(key: PrivateKey, alg: str) -> Any:
    """The public key as a verifier gets it: a JWK from the JWKS, read by PyJWT."""
    jwk = {**public_jwk(key), "kid": thumbprint(public_jwk(key)), "alg": alg, "use": "sig"}
    return jwt.PyJWK(jwk).key


def decode(token: str, key: Any, alg: str, audience: str, **options: bool) -> dict[str, Any]:
    return dict(
        jwt.decode(
            token,
            key,
            algorithms=[alg],
            audience=audience,
            issuer=ISSUER,
            options={"require": ["exp", "iat", "nbf", "iss", "aud", "sub", "jti"], **options},
        )
    )


def issuer(default_ttl: int = 3600) -> TokenIssuer:
    return TokenIssuer(ISSUER, AUDIENCES, default_ttl)


@pytest.mark.parametrize("alg", SIGNING_ALGORITHMS)
def test_api_token_verifies_with_the_published_key(
    private_keys: dict[str, PrivateKey], alg: str
) -> None:
    key = private_keys[alg]
    signer = signer_for(key, alg)
    at = time.time()
    issued = issuer().issue(signer, CLIENT_ID, API_SCOPE, None, at)
    token = issued.access_token
    assert jwt.get_unverified_header(token) == {"alg": alg, "typ": "at+jwt", "kid": signer.kid}
    claims = decode(token, verification_key(key, alg), alg, AUDIENCES["api"])
    now = int(at)
    assert claims == {
        "iss": ISSUER,
        "sub": CLIENT_ID,
        "aud": "urn:leanauth:api",
        "exp": now + 3600,
        "nbf": now,
        "iat": now,
        "jti": issued.jti,
        "client_id": CLIENT_ID,
        "scope": "api",
        "applications": [{"id": CLIENT_ID}],
    }
    assert (issued.expires_in, issued.expires_at, issued.scope) == (3600, now + 3600, "api")
    signature = token.rsplit(".", 1)[1]
    assert len(base64.urlsafe_b64decode(signature + "==")) == SIGNATURE_BYTES[alg]
    assert "=" not in token


@pytest.mark.parametrize("alg", ["ES256", "EdDSA"])
def test_customer_token_names_its_customer(private_keys: dict[str, PrivateKey], alg: str) -> None:
    key = private_keys[alg]
    at = time.time()
    issued = issuer().issue(signer_for(key, alg), CLIENT_ID, CUSTOMER_SCOPE, None, at)
    claims = decode(issued.access_token, verification_key(key, alg), alg, AUDIENCES["customer"])
    assert claims["aud"] == "urn:leanauth:link"
    assert claims["scope"] == issued.scope == "customer." + CUSTOMER_ID
    assert claims["customers"] == [{"id": CUSTOMER_ID}]
    assert claims["applications"] == [{"id": CLIENT_ID}]
    assert claims["sub"] == claims["client_id"] == CLIENT_ID


def test_an_api_token_is_not_for_the_customer_audience(
    private_keys: dict[str, PrivateKey],
) -> None:
    key = private_keys["ES256"]
    issued = issuer().issue(signer_for(key, "ES256"), CLIENT_ID, API_SCOPE, None, time.time())
    with pytest.raises(jwt.InvalidAudienceError):
        decode(issued.access_token, verification_key(key, "ES256"), "ES256", AUDIENCES["customer"])
    assert "customers" not in jwt.decode(issued.access_token, options={"verify_signature": False})


@pytest.mark.parametrize(
    ("default_ttl", "app_ttl", "scope", "expected"),
    [
        pytest.param(3600, None, API_SCOPE, 3600, id="default"),
        pytest.param(300, None, API_SCOPE, 300, id="short-default"),
        pytest.param(3600, 120, API_SCOPE, 120, id="app-lifetime"),
        pytest.param(3600, 7200, API_SCOPE, 7200, id="longer-app-lifetime"),
        pytest.param(3600, None, CUSTOMER_SCOPE, 3600, id="customer-default"),
        pytest.param(60, None, CUSTOMER_SCOPE, MIN_CUSTOMER_TOKEN_TTL, id="customer-floor"),
        pytest.param(3600, 120, CUSTOMER_SCOPE, MIN_CUSTOMER_TOKEN_TTL, id="customer-app-floor"),
        pytest.param(3600, 7200, CUSTOMER_SCOPE, 7200, id="customer-app-lifetime"),
    ],
)
def test_lifetimes(
    private_keys: dict[str, PrivateKey],
    default_ttl: int,
    app_ttl: int | None,
    scope: RequestedScope,
    expected: int,
) -> None:
    tokens = issuer(default_ttl)
    assert tokens.lifetime(app_ttl, scope) == expected
    key = private_keys["EdDSA"]
    at = 1_700_000_000.75  # fractions of a second are dropped
    issued = tokens.issue(signer_for(key, "EdDSA"), CLIENT_ID, scope, app_ttl, at)
    claims = decode(
        issued.access_token,
        verification_key(key, "EdDSA"),
        "EdDSA",
        AUDIENCES[scope.scope_class],
        verify_exp=False,
    )
    assert claims["iat"] == claims["nbf"] == 1_700_000_000
    assert claims["exp"] - claims["iat"] == expected == issued.expires_in
    assert issued.expires_at == claims["exp"]


def test_customer_tokens_live_at_least_ten_minutes() -> None:
    """The LinkSDK refuses a customer token with less than ten minutes left."""
    assert MIN_CUSTOMER_TOKEN_TTL >= 600
    for default_ttl in (60, 300, 599, 600, 660):
        assert issuer(default_ttl).lifetime(None, CUSTOMER_SCOPE) >= 600
        assert issuer(default_ttl).longest_default_lifetime == max(default_ttl, 660)


def test_token_ids_are_unique(private_keys: dict[str, PrivateKey]) -> None:
    """1000 tokens (the random pool is refilled every 256): no two share a jti."""
    key = private_keys["EdDSA"]
    signer = signer_for(key, "EdDSA")
    tokens = issuer()
    at = time.time()
    issued = [tokens.issue(signer, CLIENT_ID, API_SCOPE, None, at) for _ in range(1000)]
    jtis = [token.jti for token in issued]
    assert len(set(jtis)) == 1000
    assert all(len(base64.urlsafe_b64decode(j)) == JTI_BYTES for j in jtis)
    assert len({token.access_token for token in issued}) == 1000
    for token in issued[250:260]:  # around the first refill
        claims = jwt.decode(token.access_token, options={"verify_signature": False})
        assert claims["jti"] == token.jti
    # Another issuer draws its own ids.
    assert not set(jtis) & {issuer().issue(signer, CLIENT_ID, API_SCOPE, None, at).jti}


@pytest.mark.parametrize("alg", ["ES256", "PS256"])
def test_a_tampered_token_is_refused(private_keys: dict[str, PrivateKey], alg: str) -> None:
    key = private_keys[alg]
    issued = issuer().issue(signer_for(key, alg), CLIENT_ID, API_SCOPE, None, time.time())
    header, payload, signature = issued.access_token.split(".")
    forged_claims = base64.urlsafe_b64decode(payload + "==").replace(b'"api"', b'"apj"')
    forged_payload = base64.urlsafe_b64encode(forged_claims).rstrip(b"=").decode()
    with pytest.raises(jwt.InvalidSignatureError):
        decode(
            f"{header}.{forged_payload}.{signature}",
            verification_key(key, alg),
            alg,
            AUDIENCES["api"],
        )


def test_another_key_does_not_verify(private_keys: dict[str, PrivateKey]) -> None:
    issued = issuer().issue(
        signer_for(private_keys["RS256"], "RS256"), CLIENT_ID, API_SCOPE, None, time.time()
    )
    with pytest.raises(jwt.InvalidSignatureError):
        decode(
            issued.access_token,
            verification_key(private_keys["PS256"], "RS256"),
            "RS256",
            AUDIENCES["api"],
        )
