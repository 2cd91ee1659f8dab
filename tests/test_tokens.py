"""Access tokens (RFC 9068 JWTs) verified with PyJWT against the served JWKS, never with
leanauth's own code."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest

from conftest import (
    AppCredentials,
    Env,
    Server,
    create_app,
    request_token,
    served_kids,
    start_server,
    wait_for,
    wait_until_known,
)

API_AUDIENCE = "urn:leanauth:api"
CUSTOMER_AUDIENCE = "urn:leanauth:link"
ADMIN_AUDIENCE = "urn:leanauth:admin"
REQUIRED_CLAIMS = [
    "iss",
    "sub",
    "aud",
    "exp",
    "nbf",
    "iat",
    "jti",
    "client_id",
    "scope",
    "applications",
]


@dataclass
class Issued:
    response: dict[str, Any]
    header: dict[str, Any]
    claims: dict[str, Any]


def issue(
    server: Server,
    jwks_client: jwt.PyJWKClient,
    creds: AppCredentials,
    scope: str,
    audience: str,
    algorithm: str = "ES256",
) -> Issued:
    response = request_token(server, creds, scope)
    assert response.status_code == 200, response.text
    body = response.json()
    token = body["access_token"]
    key = jwks_client.get_signing_key_from_jwt(token)
    claims = jwt.decode(
        token,
        key,
        algorithms=[algorithm],
        audience=audience,
        issuer=server.url,
        options={"require": REQUIRED_CLAIMS},
    )
    return Issued(body, jwt.get_unverified_header(token), claims)


def test_header_is_es256_at_jwt_with_a_published_kid(
    server: Server, app: AppCredentials, jwks_client: jwt.PyJWKClient
) -> None:
    issued = issue(server, jwks_client, app, "api", API_AUDIENCE)
    assert issued.header["alg"] == "ES256"
    assert issued.header["typ"] == "at+jwt"
    assert issued.header["kid"] in served_kids(server)


def test_api_token_claims(
    server: Server, app: AppCredentials, jwks_client: jwt.PyJWKClient
) -> None:
    before = int(time.time())
    issued = issue(server, jwks_client, app, "api", API_AUDIENCE)
    after = time.time()
    claims = issued.claims
    assert claims["iss"] == server.url
    assert claims["sub"] == app.client_id
    assert claims["client_id"] == app.client_id
    assert claims["aud"] == API_AUDIENCE
    assert claims["scope"] == "api" == issued.response["scope"]
    assert claims["applications"] == [{"id": app.client_id}]
    assert "customers" not in claims
    assert before - 1 <= claims["iat"] <= after + 1
    assert claims["nbf"] <= claims["iat"]
    assert claims["exp"] - claims["iat"] == issued.response["expires_in"] == 3600
    assert isinstance(claims["jti"], str)
    assert claims["jti"]


def test_customer_token_claims(
    server: Server, app: AppCredentials, customer_id: str, jwks_client: jwt.PyJWKClient
) -> None:
    scope = f"customer.{customer_id}"
    before = int(time.time())
    issued = issue(server, jwks_client, app, scope, CUSTOMER_AUDIENCE)
    after = time.time()
    claims = issued.claims
    assert issued.header["typ"] == "at+jwt"
    assert claims["iss"] == server.url
    assert claims["sub"] == app.client_id == claims["client_id"]
    assert claims["aud"] == CUSTOMER_AUDIENCE
    assert claims["scope"] == scope == issued.response["scope"]
    assert claims["applications"] == [{"id": app.client_id}]
    assert claims["customers"] == [{"id": customer_id}]
    assert before - 1 <= claims["iat"] <= after + 1
    assert claims["nbf"] <= claims["iat"]
    assert claims["exp"] - claims["iat"] == issued.response["expires_in"] == 3600


def test_upper_case_customer_scope_gives_lower_case_claims(
    server: Server, app: AppCredentials, customer_id: str, jwks_client: jwt.PyJWKClient
) -> None:
    issued = issue(server, jwks_client, app, f"customer.{customer_id.upper()}", CUSTOMER_AUDIENCE)
    assert issued.claims["scope"] == f"customer.{customer_id.lower()}"
    assert issued.claims["customers"] == [{"id": customer_id.lower()}]


def test_admin_tokens_only_for_apps_given_the_admin_class(
    env: Env, server: Server, app: AppCredentials, jwks_client: jwt.PyJWKClient
) -> None:
    admin = create_app(env, "--name", "Operators", "--scopes", "admin")
    wait_for(lambda: request_token(server, admin, "admin").status_code == 200)
    issued = issue(server, jwks_client, admin, "admin", ADMIN_AUDIENCE)
    assert issued.claims["scope"] == "admin" == issued.response["scope"]
    assert issued.claims["client_id"] == admin.client_id
    # An app not given the class is refused, and an admin app gets no other class.
    refused = request_token(server, app, "admin")
    assert refused.status_code == 400
    assert refused.json()["error"] == "invalid_scope"
    assert request_token(server, admin, "api").json()["error"] == "invalid_scope"
    # Its audience is its own: no resource server for api tokens takes it.
    key = jwks_client.get_signing_key_from_jwt(issued.response["access_token"])
    for other in (API_AUDIENCE, CUSTOMER_AUDIENCE):
        with pytest.raises(jwt.InvalidAudienceError):
            jwt.decode(
                issued.response["access_token"],
                key,
                algorithms=["ES256"],
                audience=other,
                issuer=server.url,
            )


@pytest.mark.parametrize(
    ("scope_class", "wrong_audience"),
    [("api", CUSTOMER_AUDIENCE), ("customer", API_AUDIENCE)],
)
def test_token_is_refused_for_the_other_audience(
    server: Server,
    app: AppCredentials,
    customer_id: str,
    jwks_client: jwt.PyJWKClient,
    scope_class: str,
    wrong_audience: str,
) -> None:
    scope = "api" if scope_class == "api" else f"customer.{customer_id}"
    token = request_token(server, app, scope).json()["access_token"]
    key = jwks_client.get_signing_key_from_jwt(token)
    with pytest.raises(jwt.InvalidAudienceError):
        jwt.decode(token, key, algorithms=["ES256"], audience=wrong_audience, issuer=server.url)


def test_jti_is_unique(server: Server, app: AppCredentials) -> None:
    form = {
        "grant_type": "client_credentials",
        "client_id": app.client_id,
        "client_secret": app.client_secret,
        "scope": "api",
    }
    jtis = []
    with httpx.Client(timeout=10) as client:
        for _ in range(50):
            response = client.post(server.token_url, data=form)
            assert response.status_code == 200, response.text
            claims = jwt.decode(
                response.json()["access_token"], options={"verify_signature": False}
            )
            jtis.append(claims["jti"])
    assert len(set(jtis)) == 50


# Per-app lifetimes


@pytest.fixture(scope="module")
def ttl_apps(env: Env, server: Server) -> dict[int, tuple[AppCredentials, str]]:
    apps = {}
    for ttl in (900, 120):
        creds = create_app(env, "--name", f"TTL {ttl}", "--token-ttl", str(ttl))
        customer = env.cli("customers", "create", "--app", creds.client_id, "--app-user-id", "u")
        apps[ttl] = (creds, str(customer["customer_id"]))
    for creds, _ in apps.values():
        wait_until_known(server, creds)
    return apps


@pytest.mark.parametrize(
    ("app_ttl", "scope_class", "expected"),
    [
        (900, "api", 900),
        (900, "customer", 900),
        (120, "api", 120),
        # Customer tokens never live less than 660 s (the LinkSDK needs ten minutes left).
        (120, "customer", 660),
    ],
)
def test_app_token_ttl_override(
    server: Server,
    jwks_client: jwt.PyJWKClient,
    ttl_apps: dict[int, tuple[AppCredentials, str]],
    app_ttl: int,
    scope_class: str,
    expected: int,
) -> None:
    creds, customer = ttl_apps[app_ttl]
    scope = "api" if scope_class == "api" else f"customer.{customer}"
    audience = API_AUDIENCE if scope_class == "api" else CUSTOMER_AUDIENCE
    issued = issue(server, jwks_client, creds, scope, audience)
    assert issued.response["expires_in"] == expected
    assert issued.claims["exp"] - issued.claims["iat"] == expected


# Other signing algorithms, each on its own server


@pytest.fixture
def alg_server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Server, Any]]:
    env = Env(tmp_path, extra={"LEANAUTH_SIGNING_ALG": request.param})
    creds = create_app(env, "--name", f"{request.param} app")
    running = start_server(env)
    try:
        yield running, creds
    finally:
        running.stop()


@pytest.mark.parametrize(
    ("alg_server", "kty", "crv"),
    [("RS256", "RSA", None), ("PS256", "RSA", None), ("EdDSA", "OKP", "Ed25519")],
    indirect=["alg_server"],
)
def test_other_signing_algorithms(
    alg_server: tuple[Server, AppCredentials], kty: str, crv: str | None
) -> None:
    running, creds = alg_server
    alg = running.env.extra["LEANAUTH_SIGNING_ALG"]
    client = jwt.PyJWKClient(running.url + "/oauth2/jwks", cache_keys=False, cache_jwk_set=False)
    issued = issue(running, client, creds, "api", API_AUDIENCE, algorithm=alg)
    assert issued.header["alg"] == alg
    assert issued.header["typ"] == "at+jwt"
    assert issued.claims["sub"] == creds.client_id
    jwks = httpx.get(running.url + "/oauth2/jwks", timeout=10).json()
    [jwk] = [k for k in jwks["keys"] if k["kid"] == issued.header["kid"]]
    assert jwk["kty"] == kty
    assert jwk["alg"] == alg
    assert jwk["use"] == "sig"
    assert jwk.get("crv") == crv
