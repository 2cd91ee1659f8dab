"""Token revocation (RFC 7009) and introspection (RFC 7662) against real servers."""

from __future__ import annotations

import base64
import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import quote_plus

import httpx
import jwt
import psycopg
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from conftest import (
    RELAXED_THROTTLE,
    AppCredentials,
    Env,
    PostgresDatabases,
    Server,
    claims_of,
    create_app,
    new_token,
    serving,
    start_server,
    wait_for,
    wait_until_known,
)
from leanauth.bootstrap import open_runtime
from leanauth.jose import b64url
from leanauth.keys import KeyRing
from leanauth.settings import Settings

REVOKE = "/oauth2/revoke"
INTROSPECT = "/oauth2/introspect"
ENDPOINTS = [REVOKE, INTROSPECT]
METHODS = ["client_secret_post", "client_secret_basic"]
INACTIVE = {"active": False}
# Waiting for new apps sends failing requests; the throttle must not mind them.


def basic(creds: AppCredentials) -> str:
    raw = f"{quote_plus(creds.client_id)}:{quote_plus(creds.client_secret)}".encode()
    return "Basic " + base64.b64encode(raw).decode()


def call(
    server: Server,
    path: str,
    creds: AppCredentials,
    token: str | None,
    method: str = "client_secret_post",
) -> httpx.Response:
    """POST to the revocation or introspection endpoint, authenticating as ``creds``."""
    form = {} if token is None else {"token": token}
    headers = {}
    if method == "client_secret_basic":
        headers["Authorization"] = basic(creds)
    else:
        form |= {"client_id": creds.client_id, "client_secret": creds.client_secret}
    return httpx.post(server.url + path, data=form, headers=headers, timeout=10)


def introspect(
    server: Server, creds: AppCredentials, token: str, method: str = "client_secret_post"
) -> dict[str, Any]:
    response = call(server, INTROSPECT, creds, token, method)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert response.headers["cache-control"] == "no-store"
    return dict(response.json())


def revoke(
    server: Server, creds: AppCredentials, token: str, method: str = "client_secret_post"
) -> httpx.Response:
    response = call(server, REVOKE, creds, token, method)
    assert response.headers["cache-control"] == "no-store"
    return response


def assert_error(response: httpx.Response, status: int, error: str) -> None:
    assert response.status_code == status, response.text
    assert response.json()["error"] == error
    assert response.headers["cache-control"] == "no-store"


@pytest.fixture(scope="module")
def ienv(tmp_path_factory: pytest.TempPathFactory) -> Env:
    return Env(tmp_path_factory.mktemp("introspection"), extra=RELAXED_THROTTLE)


@pytest.fixture(scope="module")
def node(ienv: Env) -> Iterator[Server]:
    with serving(ienv) as running:
        yield running


@pytest.fixture(scope="module")
def owner(ienv: Env, node: Server) -> AppCredentials:
    created = create_app(ienv, "--name", "Owner app", "--scopes", "api,customer")
    wait_until_known(node, created)
    return created


@pytest.fixture(scope="module")
def stranger(ienv: Env, node: Server) -> AppCredentials:
    created = create_app(ienv, "--name", "Another app", "--scopes", "api")
    wait_until_known(node, created)
    return created


@pytest.fixture(scope="module")
def resource_server(ienv: Env, node: Server) -> AppCredentials:
    created = create_app(ienv, "--name", "Resource server", "--scopes", "api", "--introspect")
    assert created.raw["introspect"] is True
    wait_until_known(node, created)
    return created


# Introspection


@pytest.mark.parametrize("method", METHODS)
def test_the_owner_introspects_its_fresh_token(
    node: Server, owner: AppCredentials, method: str
) -> None:
    token = new_token(node, owner)
    claims = claims_of(token)
    body = introspect(node, owner, token, method)
    assert body["active"] is True
    assert body["token_type"] == "Bearer"
    for name in ("client_id", "scope", "exp", "iat", "jti", "sub", "iss"):
        assert body[name] == claims[name], name
    assert body["client_id"] == body["sub"] == owner.client_id
    assert body["scope"] == "api"
    assert body["iss"] == node.url
    assert body["exp"] > time.time()
    assert {k: v for k, v in body.items() if k not in ("active", "token_type")} == claims


def test_a_customer_token_introspects_with_its_scope(
    ienv: Env, node: Server, owner: AppCredentials
) -> None:
    customer = ienv.cli("customers", "create", "--app", owner.client_id, "--app-user-id", "u-1")
    scope = f"customer.{customer['customer_id']}"
    token = new_token(node, owner, scope)
    body = introspect(node, owner, token)
    assert body["active"] is True
    assert body["scope"] == scope
    assert body["jti"] == claims_of(token)["jti"]


def test_another_app_without_the_introspect_flag_learns_nothing(
    node: Server, owner: AppCredentials, stranger: AppCredentials
) -> None:
    token = new_token(node, owner)
    for method in METHODS:
        assert introspect(node, stranger, token, method) == INACTIVE
    # The token is fine for its owner.
    assert introspect(node, owner, token)["active"] is True


def test_an_app_with_the_introspect_flag_introspects_any_apps_token(
    node: Server,
    owner: AppCredentials,
    stranger: AppCredentials,
    resource_server: AppCredentials,
) -> None:
    for creds in (owner, stranger):
        token = new_token(node, creds)
        body = introspect(node, resource_server, token)
        assert body["active"] is True
        assert body["client_id"] == creds.client_id
        assert body["jti"] == claims_of(token)["jti"]


def server_signer(env: Env, server: Server) -> Any:
    """The server's own signing key, read from its database as the server reads it."""
    settings = Settings.from_env({**env.vars, "LEANAUTH_PORT": str(server.port)})
    runtime = open_runtime(settings, schema="none")
    try:
        return KeyRing(runtime.store.list_keys(), runtime.cipher, int(time.time())).signer
    finally:
        runtime.store.close()


def sign(signer: Any, claims: dict[str, Any], header: dict[str, Any] | None = None) -> str:
    """Sign as the server does (with its header unless another is given)."""
    encoded_header = signer.encoded_header if header is None else segment(header).encode()
    signing_input = encoded_header + b"." + segment(claims).encode()
    return (signing_input + b"." + b64url(signer.sign(signing_input)).encode()).decode()


def segment(data: dict[str, Any]) -> str:
    return b64url(json.dumps(data).encode())


def forged_tokens(good: str, signer: Any) -> dict[str, str]:
    """Tokens that must never introspect as active, built from a good one."""
    header_b64, payload_b64, signature_b64 = good.split(".")
    header = jwt.get_unverified_header(good)
    claims = claims_of(good)
    now = int(time.time())
    stranger_key = ec.generate_private_key(ec.SECP256R1())
    tampered = {**claims, "scope": "admin"}
    not_alg = {k: v for k, v in header.items() if k != "alg"}
    expired = {**claims, "iat": now - 7200, "nbf": now - 7200, "exp": now - 60}
    return {
        "garbage": "garbage",
        "three dots": "a.b.c",
        "header only": header_b64,
        "no signature": f"{header_b64}.{payload_b64}.",
        "alg none": f"{segment({**header, 'alg': 'none'})}.{payload_b64}.",
        "hs256 forged": jwt.encode(
            claims, "a-shared-secret-guessed-by-an-attacker!", algorithm="HS256", headers=not_alg
        ),
        "tampered payload": f"{header_b64}.{segment(tampered)}.{signature_b64}",
        "another key with our kid": jwt.encode(
            claims, stranger_key, algorithm="ES256", headers=not_alg
        ),
        "unknown kid": jwt.encode(
            claims,
            stranger_key,
            algorithm="ES256",
            headers={"typ": "at+jwt", "kid": "not-a-published-key"},
        ),
        "expired": sign(signer, expired),
        "another issuer": sign(signer, {**claims, "iss": "https://elsewhere.example"}),
        "not at+jwt": sign(signer, claims, {**header, "typ": "JWT"}),
        "missing claim": sign(signer, {k: v for k, v in claims.items() if k != "jti"}),
        "huge": good + "A" * 10_000,
    }


FORGERIES = [
    "garbage",
    "three dots",
    "header only",
    "no signature",
    "alg none",
    "hs256 forged",
    "tampered payload",
    "another key with our kid",
    "unknown kid",
    "expired",
    "another issuer",
    "not at+jwt",
    "missing claim",
    "huge",
]


@pytest.fixture(scope="module")
def forgeries(ienv: Env, node: Server, owner: AppCredentials) -> dict[str, str]:
    return forged_tokens(new_token(node, owner), server_signer(ienv, node))


def test_a_token_signed_by_the_test_with_the_servers_key_is_active(
    ienv: Env, node: Server, owner: AppCredentials
) -> None:
    """The control for the forgeries below: the test's own signing makes good tokens, so an
    expired or foreign-issuer token is refused for that reason alone."""
    good = new_token(node, owner)
    resigned = sign(server_signer(ienv, node), claims_of(good))
    assert introspect(node, owner, resigned)["active"] is True


@pytest.mark.parametrize("kind", FORGERIES)
def test_a_bad_token_is_inactive(
    node: Server,
    owner: AppCredentials,
    resource_server: AppCredentials,
    forgeries: dict[str, str],
    kind: str,
) -> None:
    token = forgeries[kind]
    assert introspect(node, owner, token) == INACTIVE
    assert introspect(node, resource_server, token) == INACTIVE


# Revocation


@pytest.mark.parametrize("method", METHODS)
def test_the_owner_revokes_its_token(
    node: Server, owner: AppCredentials, resource_server: AppCredentials, method: str
) -> None:
    token = new_token(node, owner)
    other = new_token(node, owner)
    assert introspect(node, owner, token)["active"] is True
    response = revoke(node, owner, token, method)
    assert response.status_code == 200, response.text
    assert introspect(node, owner, token, method) == INACTIVE
    assert introspect(node, resource_server, token) == INACTIVE
    # Only that token.
    assert introspect(node, owner, other)["active"] is True
    # Revoking it again is fine too.
    assert revoke(node, owner, token, method).status_code == 200
    assert introspect(node, owner, token) == INACTIVE


@pytest.mark.parametrize("kind", ["garbage", "three dots", "unknown kid", "expired", "huge"])
def test_revoking_a_token_that_is_not_a_valid_one_is_fine(
    node: Server, owner: AppCredentials, forgeries: dict[str, str], kind: str
) -> None:
    assert revoke(node, owner, forgeries[kind]).status_code == 200


def test_revoking_another_apps_token_is_refused_and_the_token_stays_active(
    node: Server,
    owner: AppCredentials,
    stranger: AppCredentials,
    resource_server: AppCredentials,
) -> None:
    token = new_token(node, owner)
    for creds in (stranger, resource_server):
        for method in METHODS:
            assert_error(revoke(node, creds, token, method), 400, "unauthorized_client")
    assert introspect(node, owner, token)["active"] is True
    assert introspect(node, resource_server, token)["active"] is True


# Requests the endpoints refuse


@pytest.mark.parametrize("path", ENDPOINTS)
@pytest.mark.parametrize("who", ["wrong secret", "unknown client", "no credentials"])
def test_bad_client_credentials_get_invalid_client(
    node: Server, owner: AppCredentials, path: str, who: str
) -> None:
    token = new_token(node, owner)
    if who == "no credentials":
        response = httpx.post(node.url + path, data={"token": token}, timeout=10)
        responses = [response]
    else:
        creds = {
            "wrong secret": AppCredentials(owner.client_id, "lsk_" + "x" * 43, {}),
            "unknown client": AppCredentials(
                "8a1f7c1e-0000-4000-8000-000000000000", owner.client_secret, {}
            ),
        }[who]
        responses = [call(node, path, creds, token, method) for method in METHODS]
    for response in responses:
        assert_error(response, 401, "invalid_client")
        assert response.headers["www-authenticate"].startswith("Basic")
    # Refused requests changed nothing.
    assert introspect(node, owner, token)["active"] is True


@pytest.mark.parametrize("path", ENDPOINTS)
@pytest.mark.parametrize("method", METHODS)
def test_a_missing_token_parameter_is_invalid_request(
    node: Server, owner: AppCredentials, path: str, method: str
) -> None:
    assert_error(call(node, path, owner, None, method), 400, "invalid_request")
    # An empty value counts as omitted.
    assert_error(call(node, path, owner, "", method), 400, "invalid_request")


@pytest.mark.parametrize("path", ENDPOINTS)
@pytest.mark.parametrize("verb", ["GET", "PUT", "DELETE"])
def test_only_post_is_allowed(node: Server, path: str, verb: str) -> None:
    response = httpx.request(verb, node.url + path, timeout=10)
    assert response.status_code == 405, response.text
    assert response.headers["allow"] == "POST"
    assert response.headers["cache-control"] == "no-store"


@pytest.mark.parametrize("path", ENDPOINTS)
def test_a_body_that_is_not_a_form_is_invalid_request(
    node: Server, owner: AppCredentials, path: str
) -> None:
    response = httpx.post(
        node.url + path,
        json={"token": "x", "client_id": owner.client_id, "client_secret": owner.client_secret},
        timeout=10,
    )
    assert_error(response, 400, "invalid_request")


def test_the_metadata_advertises_working_endpoints(
    node: Server, owner: AppCredentials, resource_server: AppCredentials
) -> None:
    metadata = httpx.get(node.url + "/.well-known/oauth-authorization-server", timeout=10).json()
    assert metadata["revocation_endpoint"] == node.url + REVOKE
    assert metadata["introspection_endpoint"] == node.url + INTROSPECT
    for name in ("revocation", "introspection"):
        assert set(metadata[f"{name}_endpoint_auth_methods_supported"]) == set(METHODS)
    token = new_token(node, owner)
    form = {"token": token, "client_id": owner.client_id, "client_secret": owner.client_secret}
    response = httpx.post(metadata["introspection_endpoint"], data=form, timeout=10)
    assert response.json()["active"] is True
    response = httpx.post(metadata["revocation_endpoint"], data=form, timeout=10)
    assert response.status_code == 200
    response = httpx.post(metadata["introspection_endpoint"], data=form, timeout=10)
    assert response.json() == INACTIVE
    assert introspect(node, resource_server, token) == INACTIVE


# Two nodes on one PostgreSQL database


@pytest.fixture(params=["listen-notify", "redis"])
def pg_nodes(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    postgres: PostgresDatabases,
) -> Iterator[tuple[Env, list[Server]]]:
    extra = {
        **RELAXED_THROTTLE,
        "LEANAUTH_DATABASE_URL": postgres.create(),
        "LEANAUTH_KEY_ENCRYPTION_KEY": os.urandom(32).hex(),
        # Polling alone would take seconds: only a notification is fast enough (and the
        # polls stay within the introspection staleness bound).
        "LEANAUTH_REFRESH_INTERVAL": "5",
        # One installation, one issuer (by default each node's would name its own port).
        "LEANAUTH_ISSUER": "https://auth.cluster.test",
    }
    if request.param == "redis":
        extra["LEANAUTH_REDIS_URL"] = request.getfixturevalue("redis_url")
    env = Env(tmp_path_factory.mktemp("introspection-cluster"), extra=extra)
    env.cli("init")
    with ThreadPoolExecutor(2) as pool:
        servers = list(pool.map(lambda _: start_server(env), range(2)))
    yield env, servers
    for server in servers:
        server.stop()


def test_a_revocation_on_one_node_reaches_the_other_within_a_second(
    pg_nodes: tuple[Env, list[Server]],
) -> None:
    env, (node_a, node_b) = pg_nodes
    app = create_app(env, "--name", "Cluster app", "--scopes", "api")
    for server in (node_a, node_b):
        wait_until_known(server, app)
    token = new_token(node_a, app)
    assert introspect(node_b, app, token)["active"] is True
    assert revoke(node_a, app, token).status_code == 200
    assert introspect(node_a, app, token) == INACTIVE
    wait_for(lambda: introspect(node_b, app, token) == INACTIVE, timeout=1.0)
    # And the other way round.
    token = new_token(node_b, app)
    assert introspect(node_a, app, token)["active"] is True
    assert revoke(node_b, app, token).status_code == 200
    wait_for(lambda: introspect(node_a, app, token) == INACTIVE, timeout=1.0)


# A broken database


def drop_sqlite_changes(env: Env) -> None:
    path = env.data_dir / "leanauth.db"
    with sqlite3.connect(path, timeout=10) as conn:
        conn.execute("DROP TABLE changes")


def drop_postgres_changes(env: Env) -> None:
    with psycopg.connect(env.vars["LEANAUTH_DATABASE_URL"], autocommit=True) as conn:
        conn.execute("SET lock_timeout = '10s'")
        conn.execute("DROP TABLE changes")


@pytest.fixture(params=["sqlite", "postgresql"])
def fragile(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[Env, Server, Callable[[Env], None]]]:
    extra = {**RELAXED_THROTTLE, "LEANAUTH_INTROSPECTION_MAX_STALENESS": "1"}
    breaker: Callable[[Env], None] = drop_sqlite_changes
    if request.param == "postgresql":
        databases: PostgresDatabases = request.getfixturevalue("postgres")
        extra["LEANAUTH_DATABASE_URL"] = databases.create()
        extra["LEANAUTH_KEY_ENCRYPTION_KEY"] = os.urandom(32).hex()
        breaker = drop_postgres_changes
    env = Env(tmp_path, extra=extra)
    server = start_server(env)
    yield env, server, breaker
    server.stop()


def test_a_broken_database_makes_introspection_unavailable_never_inactive(
    fragile: tuple[Env, Server, Callable[[Env], None]],
) -> None:
    env, server, break_database = fragile
    app = create_app(env, "--name", "Fragile app", "--scopes", "api")
    wait_until_known(server, app)
    token = new_token(server, app)
    assert introspect(server, app, token)["active"] is True

    break_database(env)
    answers: list[tuple[int, Any]] = []

    def unavailable() -> bool:
        response = call(server, INTROSPECT, app, token)
        answers.append((response.status_code, response.json()))
        return response.status_code == 503

    wait_for(unavailable, timeout=4.0, interval=0.1)
    # Until the view went stale the answer was the right one, and after, 503: never a good
    # token called inactive.
    assert all(
        (status, body.get("active")) in ((200, True), (503, None)) for status, body in answers
    ), answers
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        response = call(server, INTROSPECT, app, token)
        assert_error(response, 503, "temporarily_unavailable")
        assert response.headers["retry-after"].isdigit()
        time.sleep(0.1)
    # A revocation that cannot be recorded is not reported as done.
    assert_error(revoke(server, app, token), 503, "temporarily_unavailable")


def test_a_healthy_idle_server_never_answers_503(tmp_path: Path) -> None:
    """The staleness bound is about a failing database. With a refresh interval longer than
    the bound (both valid settings), either the server refuses the combination at start or
    an idle, healthy server keeps answering introspection."""
    env = Env(
        tmp_path,
        extra={
            "LEANAUTH_REFRESH_INTERVAL": "3",
            "LEANAUTH_INTROSPECTION_MAX_STALENESS": "1",
        },
    )
    refused = env.cli("apps", "list", expect_ok=False)
    if refused.exit_code != 0:
        # Refused as a bad setting (by every command, not only the server).
        assert "LEANAUTH_INTROSPECTION_MAX_STALENESS" in refused.output, refused.output
        return
    app = create_app(env, "--name", "Idle app", "--scopes", "api")
    try:
        server = start_server(env)
    except RuntimeError as exc:
        refused = str(exc)
        assert "LEANAUTH_INTROSPECTION_MAX_STALENESS" in refused, refused
        return
    try:
        token = new_token(server, app)
        statuses = []
        deadline = time.monotonic() + 2.5
        while time.monotonic() < deadline:
            response = call(server, INTROSPECT, app, token)
            statuses.append(response.status_code)
            if response.status_code == 200:
                assert response.json()["active"] is True
            time.sleep(0.25)
        assert set(statuses) == {200}, statuses
    finally:
        server.stop()


@pytest.mark.parametrize("path", ENDPOINTS)
def test_a_token_type_hint_is_accepted(node: Server, owner: AppCredentials, path: str) -> None:
    token = new_token(node, owner)
    form = {
        "token": token,
        "token_type_hint": "access_token",
        "client_id": owner.client_id,
        "client_secret": owner.client_secret,
    }
    response = httpx.post(node.url + path, data=form, timeout=10)
    assert response.status_code == 200, response.text
    if path == INTROSPECT:
        assert response.json()["active"] is True
    else:
        assert introspect(node, owner, token) == INACTIVE


def test_a_revocation_outlives_a_restart(tmp_path: Path) -> None:
    env = Env(tmp_path, extra=RELAXED_THROTTLE)
    # The restarted server listens on another port: keep the issuer.
    issuer = "https://auth.restart.test"
    app = create_app(env, "--name", "Restarted app", "--scopes", "api")
    server = start_server(env, issuer=issuer)
    try:
        token, kept = new_token(server, app), new_token(server, app)
        assert revoke(server, app, token).status_code == 200
    finally:
        server.stop()
    server = start_server(env, issuer=issuer)
    try:
        assert introspect(server, app, token) == INACTIVE
        assert introspect(server, app, kept)["active"] is True
    finally:
        server.stop()
