"""Discovery over HTTP: the JWKS (RFC 7517), server metadata (RFC 8414) and the health check."""

from __future__ import annotations

import re
from collections.abc import Iterator

import httpx
import jwt
import pytest

from conftest import (
    AppCredentials,
    Env,
    Server,
    create_app,
    free_port,
    request_token,
    start_server,
)

JWKS_PATHS = ["/oauth2/jwks", "/.well-known/jwks.json"]
METADATA_PATH = "/.well-known/oauth-authorization-server"
PRIVATE_MEMBERS = {"d", "p", "q", "dp", "dq", "qi", "k", "oth"}


def max_age(response: httpx.Response) -> int:
    cache_control = response.headers["cache-control"].lower()
    assert "no-store" not in cache_control
    assert "no-cache" not in cache_control
    assert "private" not in cache_control
    match = re.search(r"(?:^|[,\s])max-age=(\d+)(?:$|[,\s])", cache_control)
    assert match, cache_control
    return int(match.group(1))


# JWKS


@pytest.mark.parametrize("path", JWKS_PATHS)
def test_jwks_is_public_and_cacheable(http: httpx.Client, path: str) -> None:
    response = http.get(path)
    assert response.status_code == 200
    assert response.headers["content-type"].split(";")[0] in (
        "application/jwk-set+json",
        "application/json",
    )
    assert max_age(response) > 0
    jwks = response.json()
    assert set(jwks) == {"keys"}
    assert jwks["keys"]
    for key in jwks["keys"]:
        assert key["kid"]
        assert key["alg"]
        assert key["kty"]
        assert key["use"] == "sig"
        assert not PRIVATE_MEMBERS & set(key), key
        # Each key loads as a public key.
        jwt.PyJWK(key)
    kids = [key["kid"] for key in jwks["keys"]]
    assert len(kids) == len(set(kids))


def test_both_jwks_paths_serve_the_same_key_set(http: httpx.Client) -> None:
    first, second = (http.get(path) for path in JWKS_PATHS)
    assert first.json() == second.json()


def test_jwks_signs_the_issued_tokens(
    http: httpx.Client, server: Server, app: AppCredentials
) -> None:
    token = request_token(server, app).json()["access_token"]
    kid = jwt.get_unverified_header(token)["kid"]
    for path in JWKS_PATHS:
        assert kid in {key["kid"] for key in http.get(path).json()["keys"]}


# Authorization-server metadata (RFC 8414)


def test_metadata(http: httpx.Client, server: Server, app: AppCredentials) -> None:
    response = http.get(METADATA_PATH)
    assert response.status_code == 200
    assert response.headers["content-type"].split(";")[0] == "application/json"
    assert max_age(response) >= 0
    metadata = response.json()
    assert metadata["issuer"] == server.url
    assert metadata["token_endpoint"] == server.token_url
    assert metadata["grant_types_supported"] == ["client_credentials"]
    assert {"client_secret_basic", "client_secret_post"} <= set(
        metadata["token_endpoint_auth_methods_supported"]
    )
    assert isinstance(metadata["response_types_supported"], list)
    assert "api" in metadata["scopes_supported"]

    jwks = httpx.get(metadata["jwks_uri"], timeout=10)
    assert jwks.status_code == 200
    assert jwks.json() == http.get("/oauth2/jwks").json()

    form = {
        "grant_type": "client_credentials",
        "client_id": app.client_id,
        "client_secret": app.client_secret,
        "scope": "api",
    }
    token = httpx.post(metadata["token_endpoint"], data=form, timeout=10)
    assert token.status_code == 200, token.text


def test_metadata_issuer_is_the_token_issuer(
    http: httpx.Client, server: Server, app: AppCredentials
) -> None:
    issuer = http.get(METADATA_PATH).json()["issuer"]
    token = request_token(server, app).json()["access_token"]
    assert jwt.decode(token, options={"verify_signature": False})["iss"] == issuer


@pytest.fixture(scope="module")
def tenant_server(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Server, AppCredentials, str]]:
    env = Env(tmp_path_factory.mktemp("tenant"))
    creds = create_app(env, "--name", "Tenant app")
    port = free_port()
    issuer = f"http://127.0.0.1:{port}/tenant"
    running = start_server(env, port, issuer=issuer)
    try:
        yield running, creds, issuer
    finally:
        running.stop()


def test_metadata_for_an_issuer_with_a_path(
    tenant_server: tuple[Server, AppCredentials, str],
) -> None:
    running, creds, issuer = tenant_server
    # RFC 8414 §3: the well-known suffix goes between the host and the issuer's path.
    response = httpx.get(running.url + METADATA_PATH + "/tenant", timeout=10)
    assert response.status_code == 200
    metadata = response.json()
    assert metadata["issuer"] == issuer
    assert metadata["grant_types_supported"] == ["client_credentials"]

    token = request_token(running, creds).json()["access_token"]
    client = jwt.PyJWKClient(running.url + "/oauth2/jwks", cache_keys=False, cache_jwk_set=False)
    claims = jwt.decode(
        token,
        client.get_signing_key_from_jwt(token),
        algorithms=["ES256"],
        audience="urn:leanauth:api",
        issuer=issuer,
    )
    assert claims["iss"] == issuer


def test_endpoints_advertised_for_an_issuer_with_a_path_are_served(
    tenant_server: tuple[Server, AppCredentials, str],
) -> None:
    """The metadata names URLs on this very server (the issuer is its own host and port):
    fetching them must work."""
    running, creds, _ = tenant_server
    metadata = httpx.get(running.url + METADATA_PATH + "/tenant", timeout=10).json()

    jwks = httpx.get(metadata["jwks_uri"], timeout=10)
    assert jwks.status_code == 200, metadata["jwks_uri"]
    assert jwks.json() == httpx.get(running.url + "/oauth2/jwks", timeout=10).json()

    form = {
        "grant_type": "client_credentials",
        "client_id": creds.client_id,
        "client_secret": creds.client_secret,
        "scope": "api",
    }
    token = httpx.post(metadata["token_endpoint"], data=form, timeout=10)
    assert token.status_code == 200, metadata["token_endpoint"]


# Health


def test_healthz(http: httpx.Client) -> None:
    response = http.get("/healthz")
    assert response.status_code == 200
