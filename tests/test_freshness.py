"""Changes made with the CLI reach a running server within 2 s (refresh interval 0.2 s)."""

from __future__ import annotations

import time
from collections.abc import Iterator
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
from leanauth.store.sql import ROTATION_RACE_WINDOW

FRESH_WITHIN = 2.0


def token_header(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    return jwt.get_unverified_header(response.json()["access_token"])


def verify(server: Server, token: str, audience: str = "urn:leanauth:api") -> dict[str, Any]:
    client = jwt.PyJWKClient(server.url + "/oauth2/jwks", cache_keys=False, cache_jwk_set=False)
    key = client.get_signing_key_from_jwt(token)
    claims: dict[str, Any] = jwt.decode(
        token,
        key,
        algorithms=["ES256", "EdDSA", "PS256", "RS256"],
        audience=audience,
        issuer=server.url,
    )
    return claims


@pytest.fixture
def fresh_app(env: Env, server: Server) -> AppCredentials:
    """An app of this test's own on the shared server (so changing it disturbs no other test)."""
    created = create_app(env, "--name", "Freshness", "--scopes", "api,customer")
    wait_until_known(server, created)
    return created


@pytest.fixture(scope="module")
def own_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server with a database of its own, for key rotation (global to an installation)."""
    running = start_server(Env(tmp_path_factory.mktemp("freshness")))
    yield running
    running.stop()


def test_new_app_is_known_within_the_refresh_bound(env: Env, server: Server) -> None:
    created = create_app(env, "--name", "Brand new")
    wait_for(lambda: request_token(server, created).status_code == 200, timeout=FRESH_WITHIN)


def test_disabled_app_is_refused_then_enabled_again(
    env: Env, server: Server, fresh_app: AppCredentials
) -> None:
    assert request_token(server, fresh_app).status_code == 200
    env.cli("apps", "disable", fresh_app.client_id)
    wait_for(lambda: request_token(server, fresh_app).status_code == 401, timeout=FRESH_WITHIN)
    refused = request_token(server, fresh_app)
    assert refused.status_code == 401
    assert refused.json()["error"] == "invalid_client"

    env.cli("apps", "enable", fresh_app.client_id)
    wait_for(lambda: request_token(server, fresh_app).status_code == 200, timeout=FRESH_WITHIN)


def test_disabled_app_cannot_get_customer_tokens(
    env: Env, server: Server, fresh_app: AppCredentials
) -> None:
    made = env.cli("customers", "create", "--app", fresh_app.client_id, "--app-user-id", "dis")
    scope = f"customer.{made['customer_id']}"
    assert request_token(server, fresh_app, scope).status_code == 200
    env.cli("apps", "disable", fresh_app.client_id)
    wait_for(
        lambda: request_token(server, fresh_app, scope).status_code == 401, timeout=FRESH_WITHIN
    )
    assert request_token(server, fresh_app, scope).json()["error"] == "invalid_client"


def test_rotated_secret(env: Env, server: Server, fresh_app: AppCredentials) -> None:
    rotated = env.cli("apps", "rotate-secret", fresh_app.client_id, "--grace", "0")
    new = AppCredentials(fresh_app.client_id, rotated["client_secret"], rotated)
    wait_for(lambda: request_token(server, new).status_code == 200, timeout=FRESH_WITHIN)
    wait_for(lambda: request_token(server, fresh_app).status_code == 401, timeout=FRESH_WITHIN)
    assert request_token(server, fresh_app).json()["error"] == "invalid_client"
    assert request_token(server, new).status_code == 200

    # A second rotation ends the first new secret as well (once the window in which it would
    # count as racing the first has passed).
    time.sleep(ROTATION_RACE_WINDOW)
    again = env.cli("apps", "rotate-secret", fresh_app.client_id, "--grace", "0")
    newest = AppCredentials(fresh_app.client_id, again["client_secret"], again)
    wait_for(lambda: request_token(server, newest).status_code == 200, timeout=FRESH_WITHIN)
    wait_for(lambda: request_token(server, new).status_code == 401, timeout=FRESH_WITHIN)
    assert request_token(server, fresh_app).status_code == 401


def test_customer_created_a_moment_ago_works_at_once(
    env: Env, server: Server, fresh_app: AppCredentials
) -> None:
    for n in range(3):
        made = env.cli(
            "customers", "create", "--app", fresh_app.client_id, "--app-user-id", f"now-{n}"
        )
        # No waiting: the very first request after the CLI returns must succeed.
        response = request_token(server, fresh_app, f"customer.{made['customer_id']}")
        assert response.status_code == 200, response.text
        assert response.json()["scope"] == f"customer.{made['customer_id']}"
        claims = jwt.decode(response.json()["access_token"], options={"verify_signature": False})
        assert claims["customers"] == [{"id": made["customer_id"]}]


def test_rotated_key(own_server: Server) -> None:
    env = own_server.env
    created = create_app(env, "--name", "Key rotation")
    wait_until_known(own_server, created)
    old_token = request_token(own_server, created).json()["access_token"]
    old_kid = jwt.get_unverified_header(old_token)["kid"]
    assert served_kids(own_server) == {old_kid}

    new_kid = env.cli("keys", "rotate")["kid"]
    assert new_kid != old_kid
    wait_for(
        lambda: token_header(request_token(own_server, created))["kid"] == new_kid,
        timeout=FRESH_WITHIN,
    )
    health = httpx.get(own_server.url + "/healthz", timeout=10).json()
    assert health["signing_key"] == new_kid

    # Both keys are served: the new one signs, the retired one still verifies old tokens.
    assert set(served_kids(own_server)) == {old_kid, new_kid}
    assert verify(own_server, old_token)["sub"] == created.client_id
    new_token = request_token(own_server, created).json()["access_token"]
    assert jwt.get_unverified_header(new_token)["kid"] == new_kid
    assert verify(own_server, new_token)["sub"] == created.client_id
    assert set(served_kids(own_server)) == {old_kid, new_kid}


def test_rotated_key_to_another_algorithm(own_server: Server) -> None:
    env = own_server.env
    created = create_app(env, "--name", "Key rotation EdDSA")
    wait_until_known(own_server, created)
    old_token = request_token(own_server, created).json()["access_token"]
    new = env.cli("keys", "rotate", "--alg", "EdDSA")
    wait_for(
        lambda: token_header(request_token(own_server, created))["kid"] == new["kid"],
        timeout=FRESH_WITHIN,
    )
    new_token = request_token(own_server, created).json()["access_token"]
    assert jwt.get_unverified_header(new_token)["alg"] == "EdDSA"
    assert verify(own_server, new_token)["sub"] == created.client_id
    assert verify(own_server, old_token)["sub"] == created.client_id
    jwks = httpx.get(own_server.url + "/oauth2/jwks", timeout=10).json()
    by_kid = {k["kid"]: k for k in jwks["keys"]}
    assert by_kid[new["kid"]]["alg"] == "EdDSA"
    assert all("d" not in k for k in jwks["keys"])
