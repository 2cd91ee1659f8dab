"""Regression tests for the security review's revocation findings. Each reproduces the attack
against real servers, over HTTP and the CLI:

1. a stolen signing key keeps signing good tokens (``leanauth keys revoke``);
2. a stolen key mints tokens living longer than this server ever issues;
3. a disabled app's tokens keep working on the Customers API and introspection;
4. an app cannot end the tokens it holds (``leanauth apps revoke-tokens``);
5. a secret past its grace period keeps working while the database is unreachable;
6. one app fills every node's memory with revocations (the per-app cap).

"Within a second" is measured from the return of the CLI command that made the change.
"""

from __future__ import annotations

import os
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest

from conftest import (
    RELAXED_THROTTLE,
    AppCredentials,
    Env,
    PostgresDatabases,
    Server,
    as_error_line,
    claims_of,
    create_app,
    installation,
    kid_of,
    known_app,
    new_token,
    request_token,
    served_kids,
    serving,
    start_server,
    wait_for,
    wait_until_known,
)
from leanauth.bootstrap import open_runtime
from leanauth.jose import PrivateKey
from leanauth.keys import schedule
from leanauth.owntokens import TOKEN_TIME_LEEWAY
from leanauth.settings import Settings

# One issuer for every node of an installation (by default each names its own port).
ISSUER = "https://auth.revocation.test"
API_AUDIENCE = "urn:leanauth:api"
BASE_ENV = {**RELAXED_THROTTLE, "LEANAUTH_ISSUER": ISSUER}
# A key made by `keys rotate` stays "next" (published, not signing) for the whole module.
SLOW_KEYS = {"LEANAUTH_KEY_PREPUBLISH": "600", "LEANAUTH_JWKS_MAX_AGE": "1"}
# Polling far beyond a second: only LISTEN/NOTIFY can carry a change to a node in time.
SLOW_POLL = {"LEANAUTH_REFRESH_INTERVAL": "30", "LEANAUTH_INTROSPECTION_MAX_STALENESS": "60"}
CUSTOMERS = "/customers/v1/"
INACTIVE = {"active": False}


# Talking to a server


def introspect(server: Server, creds: AppCredentials, token: str) -> dict[str, Any]:
    form = {"token": token, "client_id": creds.client_id, "client_secret": creds.client_secret}
    response = httpx.post(server.url + "/oauth2/introspect", data=form, timeout=10)
    assert response.status_code == 200, response.text
    return dict(response.json())


def active(server: Server, creds: AppCredentials, token: str) -> bool:
    body = introspect(server, creds, token)
    assert body == INACTIVE or body["active"] is True, body
    return bool(body["active"])


def revoke(server: Server, creds: AppCredentials, token: str) -> httpx.Response:
    form = {"token": token, "client_id": creds.client_id, "client_secret": creds.client_secret}
    return httpx.post(server.url + "/oauth2/revoke", data=form, timeout=10)


def customers_api(server: Server, token: str, customer_id: str = "") -> httpx.Response:
    """GET the app's customer list (api token) or one customer (customer token)."""
    headers = {"Authorization": f"Bearer {token}"}
    return httpx.get(server.url + CUSTOMERS + customer_id, headers=headers, timeout=10)


def assert_invalid_token(response: httpx.Response) -> None:
    assert response.status_code == 401, response.text
    challenge = response.headers["www-authenticate"]
    assert challenge.startswith("Bearer")
    assert 'error="invalid_token"' in challenge


def works(server: Server, reader: AppCredentials, token: str, customer_id: str = "") -> bool:
    """Introspection (by ``reader``) says active and the Customers API serves the token."""
    return active(server, reader, token) and (
        customers_api(server, token, customer_id).status_code == 200
    )


def refused(server: Server, reader: AppCredentials, token: str, customer_id: str = "") -> bool:
    """Introspection (by ``reader``) says inactive and the Customers API answers 401."""
    return not active(server, reader, token) and (
        customers_api(server, token, customer_id).status_code == 401
    )


def within_a_second(condition: Callable[[], bool], since: float | None = None) -> None:
    """``condition`` holds within 1 s of ``since`` (a monotonic time; default now): of the
    return of the CLI command that made the change."""
    elapsed = 0.0 if since is None else time.monotonic() - since
    wait_for(condition, timeout=max(0.0, 1.0 - elapsed))


def one_line_error(stderr: str) -> str:
    """The CLI's failure: one ``error:`` line, last, and no traceback."""
    assert "Traceback" not in stderr, stderr
    lines = [as_error_line(line) for line in stderr.strip().splitlines()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, stderr
    assert lines[-1] == errors[0], stderr
    return errors[0]


# A stolen signing key


@dataclass(frozen=True)
class StolenKey:
    kid: str
    alg: str
    private: PrivateKey


def steal_key(env: Env, kid: str | None = None) -> StolenKey:
    """The private key signing now (or key ``kid``), read from the database and decrypted
    with the key-encryption key, as an attacker holding both would."""
    runtime = open_runtime(Settings.from_env(env.vars), schema="none")
    try:
        keys = runtime.store.list_keys()
        now = int(time.time())
        if kid is None:
            kid = next(p.key.kid for p in schedule(keys) if p.state(now) == "active")
        key = next(k for k in keys if k.kid == kid)
        return StolenKey(
            key.kid, key.alg, runtime.cipher.decrypt(key.kid, key.encrypted_private_key)
        )
    finally:
        runtime.store.close()


def forge(key: StolenKey, client_id: str, lifetime: int = 600, scope: str = "api") -> str:
    """An RFC 9068 access token as the server makes them (tokens.py), signed by ``key``."""
    now = int(time.time())
    claims = {
        "iss": ISSUER,
        "sub": client_id,
        "aud": API_AUDIENCE,
        "exp": now + lifetime,
        "nbf": now,
        "iat": now,
        "jti": uuid.uuid4().hex,
        "client_id": client_id,
        "scope": scope,
        "applications": [{"id": client_id}],
    }
    headers = {"typ": "at+jwt", "kid": key.kid}
    return jwt.encode(claims, key.private, algorithm=key.alg, headers=headers)


def keys_by_kid(env: Env) -> dict[str, dict[str, Any]]:
    return {k["kid"]: k for k in env.cli("keys", "list")}


def verify_with_jwks(server: Server, token: str) -> dict[str, Any]:
    """Verify as an offline resource server does: against the published JWKS."""
    jwks = httpx.get(server.url + "/oauth2/jwks", timeout=10).json()
    key = jwt.PyJWKSet.from_dict(jwks)[kid_of(token)]
    claims: dict[str, Any] = jwt.decode(
        token, key.key, algorithms=[key.algorithm_name], audience=API_AUDIENCE, issuer=ISSUER
    )
    return claims


# One SQLite node shared by the single-node tests


@pytest.fixture(scope="module")
def single_env(tmp_path_factory: pytest.TempPathFactory) -> Env:
    return Env(tmp_path_factory.mktemp("revocation"), extra={**BASE_ENV, **SLOW_KEYS})


@pytest.fixture(scope="module")
def single(single_env: Env) -> Iterator[Server]:
    with serving(single_env) as running:
        yield running


@pytest.fixture(scope="module")
def single_reader(single_env: Env, single: Server) -> AppCredentials:
    """A resource server: may introspect every app's tokens."""
    return known_app(single_env, single, "--scopes", "api", "--introspect")


# Two nodes on one PostgreSQL database


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory, postgres: PostgresDatabases
) -> Iterator[tuple[Env, list[Server]]]:
    extra = {
        **BASE_ENV,
        **SLOW_POLL,
        "LEANAUTH_DATABASE_URL": postgres.create(),
        "LEANAUTH_KEY_ENCRYPTION_KEY": os.urandom(32).hex(),
    }
    env = Env(tmp_path_factory.mktemp("revocation-cluster"), extra=extra)
    env.cli("init")
    with ThreadPoolExecutor(2) as pool:
        servers = list(pool.map(lambda _: start_server(env), range(2)))
    yield env, servers
    for server in servers:
        server.stop()


def cluster_app(env: Env, servers: list[Server], *args: str) -> AppCredentials:
    created = create_app(env, "--name", f"app-{uuid.uuid4().hex[:8]}", *args)
    for server in servers:
        wait_until_known(server, created)
    return created


# 1. A compromised signing key


def test_a_revoked_key_leaves_the_jwks_its_tokens_are_refused_and_a_new_key_signs(
    single_env: Env, single: Server, single_reader: AppCredentials
) -> None:
    """An attacker holding the signing key mints tokens for any app. `keys revoke` must end
    them (and the key's genuine tokens) within a second, and a new key must sign at once."""
    victim = known_app(single_env, single, "--scopes", "api")
    stolen = steal_key(single_env)
    genuine = new_token(single, victim)
    assert kid_of(genuine) == stolen.kid
    forged = forge(stolen, victim.client_id)
    for token in (forged, genuine):
        assert works(single, single_reader, token)

    revoked = single_env.cli("keys", "revoke", stolen.kid)
    within_a_second(
        lambda: (
            stolen.kid not in served_kids(single)
            and refused(single, single_reader, forged)
            and refused(single, single_reader, genuine)
        )
    )
    assert_invalid_token(customers_api(single, forged))
    assert revoked["revoked"]["kid"] == stolen.kid
    assert revoked["revoked"]["revoked_at"] <= time.time()
    replacement = revoked["signing_key"]
    assert replacement["kid"] != stolen.kid
    assert replacement["state"] == "active"

    # The server signs with the new key as soon as it has dropped the old one.
    fresh = new_token(single, victim)
    assert kid_of(fresh) == replacement["kid"]
    assert verify_with_jwks(single, fresh)["client_id"] == victim.client_id
    assert works(single, single_reader, fresh)
    keys = keys_by_kid(single_env)
    assert keys[stolen.kid]["state"] == "revoked"
    assert keys[stolen.kid]["revoked_at"] == revoked["revoked"]["revoked_at"]
    assert keys[replacement["kid"]]["state"] == "active"

    # Revoking it again changes nothing: no second replacement.
    again = single_env.cli("keys", "revoke", stolen.kid)
    assert again["signing_key"] is None
    assert again["revoked"] == revoked["revoked"]
    assert keys_by_kid(single_env) == keys


def test_revoking_a_next_key_takes_it_out_of_the_jwks_and_leaves_the_signer(
    single_env: Env, single: Server, single_reader: AppCredentials
) -> None:
    """A key stolen while it is published but not yet signing: revoking it refuses what it
    signed and takes it out of the JWKS; the key signing now goes on signing."""
    victim = known_app(single_env, single, "--scopes", "api")
    signer = kid_of(new_token(single, victim))
    rotated = single_env.cli("keys", "rotate")
    assert rotated["state"] == "next"
    wait_for(lambda: rotated["kid"] in served_kids(single), timeout=1.0)
    forged = forge(steal_key(single_env, rotated["kid"]), victim.client_id)
    assert works(single, single_reader, forged)

    revoked = single_env.cli("keys", "revoke", rotated["kid"])
    within_a_second(
        lambda: rotated["kid"] not in served_kids(single) and refused(single, single_reader, forged)
    )
    assert revoked["signing_key"] is None
    assert signer in served_kids(single)
    token = new_token(single, victim)
    assert kid_of(token) == signer
    assert works(single, single_reader, token)
    keys = keys_by_kid(single_env)
    assert keys[rotated["kid"]]["state"] == "revoked"
    assert keys[signer]["state"] == "active"


def test_revoking_an_unknown_kid_is_a_one_line_error(single_env: Env, single: Server) -> None:
    """A mistyped kid changes nothing and says so; it does not look like success."""
    before = keys_by_kid(single_env)
    # A kid is base64url: one in 64 begins with "-", and is still a kid, not an option.
    for kid in ("no-such-kid", "-Tno-such-kid"):
        result = single_env.cli("keys", "revoke", kid, expect_ok=False)
        assert result.exit_code == 1
        assert result.stdout == ""
        assert kid in one_line_error(result.stderr)
    assert keys_by_kid(single_env) == before


def test_revoking_a_retired_key_never_brings_an_older_key_back(tmp_path: Path) -> None:
    """Keys first (expired: retired two days ago), second (retired now) and third (signing).
    Revoking the second must not make the third the first's successor, which would publish
    the first key again for another day."""
    env = Env(tmp_path, extra=BASE_ENV)
    first = env.cli("keys", "list")[0]["kid"]
    second = env.cli("keys", "rotate", "--immediately")["kid"]
    # Back-date the first two keys (a rotation drops keys not yet active, so before the third).
    now = int(time.time())
    with sqlite3.connect(tmp_path / "leanauth.db") as conn:
        for kid, activated in ((first, now - 3 * 86_400), (second, now - 2 * 86_400)):
            conn.execute(
                "UPDATE signing_keys SET created_at = ?, activates_at = ? WHERE kid = ?",
                (activated, activated, kid),
            )
    third = env.cli("keys", "rotate", "--immediately")["kid"]
    states = {kid: k["state"] for kid, k in keys_by_kid(env).items()}
    assert states == {first: "expired", second: "retired", third: "active"}
    with serving(env) as server:
        app = known_app(env, server, "--scopes", "api")
        assert served_kids(server) == {second, third}

        revoked = env.cli("keys", "revoke", second)
        within_a_second(lambda: served_kids(server) == {third})
        assert revoked["signing_key"] is None
        assert kid_of(new_token(server, app)) == third
    states = {kid: k["state"] for kid, k in keys_by_kid(env).items()}
    assert states == {first: "expired", second: "revoked", third: "active"}


def test_a_revoked_key_is_refused_on_every_node_within_a_second(
    cluster: tuple[Env, list[Server]],
) -> None:
    """Two nodes on one PostgreSQL database, polling only every 30 s: the revocation must
    reach both (JWKS and token checks) by notification within a second."""
    env, servers = cluster
    victim = cluster_app(env, servers, "--scopes", "api")
    reader = cluster_app(env, servers, "--scopes", "api", "--introspect")
    stolen = steal_key(env)
    forged = forge(stolen, victim.client_id)
    for server in servers:
        assert active(server, reader, forged)
        assert stolen.kid in served_kids(server)

    replacement = env.cli("keys", "revoke", stolen.kid)["signing_key"]["kid"]
    within_a_second(
        lambda: all(
            stolen.kid not in served_kids(server) and not active(server, reader, forged)
            for server in servers
        )
    )
    for server in servers:
        assert_invalid_token(customers_api(server, forged))
        assert kid_of(new_token(server, victim)) == replacement


# 2. Tokens living longer than this server issues


@pytest.mark.parametrize(("ttl_setting", "longest"), [(None, 3600), ("300", 660)])
def test_a_token_living_longer_than_any_this_server_issues_is_refused(
    tmp_path: Path, ttl_setting: str | None, longest: int
) -> None:
    """A stolen key mints a token valid for years. The longest lifetime is the default TTL,
    at least 660 s (customer tokens), or the longest TTL of an app the server knows."""
    extra = dict(BASE_ENV)
    if ttl_setting is not None:
        extra["LEANAUTH_TOKEN_TTL"] = ttl_setting
    env = Env(tmp_path, extra=extra)
    with serving(env) as server:
        reader = known_app(env, server, "--scopes", "api", "--introspect")
        victim = known_app(env, server, "--scopes", "api")
        stolen = steal_key(env)
        exact = forge(stolen, victim.client_id, lifetime=longest)
        too_long = forge(stolen, victim.client_id, lifetime=longest + 1)
        years = forge(stolen, victim.client_id, lifetime=5 * 365 * 86_400)
        assert works(server, reader, exact)
        for token in (too_long, years):
            assert introspect(server, reader, token) == INACTIVE
            assert_invalid_token(customers_api(server, token))

        # An app with a longer lifetime of its own raises the bound once the server knows it.
        known_app(env, server, "--scopes", "api", "--token-ttl", "7200")
        assert works(server, reader, forge(stolen, victim.client_id, lifetime=7200))
        assert works(server, reader, too_long)
        assert refused(server, reader, forge(stolen, victim.client_id, lifetime=7201))
        assert refused(server, reader, years)


# 3. A disabled app's tokens


def disabled_app_tokens_are_suspended(
    env: Env, servers: list[Server], app: AppCredentials, reader: AppCredentials
) -> None:
    token = new_token(servers[0], app)
    customer = httpx.post(
        servers[-1].url + CUSTOMERS,
        json={"app_user_id": "u-1"},
        headers={"Authorization": f"Bearer {token}"},
        timeout=10,
    )
    assert customer.status_code == 201, customer.text
    customer_id = customer.json()["customer_id"]
    for server in servers:
        assert works(server, reader, token)

    env.cli("apps", "disable", app.client_id)
    within_a_second(lambda: all(refused(server, reader, token) for server in servers))
    for server in servers:
        assert_invalid_token(customers_api(server, token, customer_id))

    env.cli("apps", "enable", app.client_id)
    within_a_second(lambda: all(works(server, reader, token) for server in servers))
    for server in servers:
        assert customers_api(server, token, customer_id).json()["customer_id"] == customer_id


def test_a_disabled_apps_tokens_are_refused_until_it_is_enabled(
    single_env: Env, single: Server, single_reader: AppCredentials
) -> None:
    """An app is disabled because it is compromised: the tokens it holds stop working on the
    Customers API and introspection within a second. Disabling suspends: `apps enable` makes
    the same tokens work again (`apps revoke-tokens` ends them for good)."""
    app = known_app(single_env, single, "--scopes", "api")
    disabled_app_tokens_are_suspended(single_env, [single], app, single_reader)


def test_a_disabled_apps_tokens_are_refused_on_every_node(
    cluster: tuple[Env, list[Server]],
) -> None:
    """The same on two nodes: the token is issued by one node, the customer made on the
    other, and both refuse the token within a second, then accept it again."""
    env, servers = cluster
    app = cluster_app(env, servers, "--scopes", "api")
    reader = cluster_app(env, servers, "--scopes", "api", "--introspect")
    disabled_app_tokens_are_suspended(env, servers, app, reader)


# 4. Ending every token an app holds


def app_tokens_are_revoked(
    env: Env, servers: list[Server], app: AppCredentials, reader: AppCredentials
) -> None:
    bystander = known_app(env, servers[0], "--scopes", "api")
    for server in servers[1:]:
        wait_until_known(server, bystander)
    customer_id = env.cli("customers", "create", "--app", app.client_id, "--app-user-id", "u")[
        "customer_id"
    ]
    held = [
        (new_token(server, app, scope), customer)
        for server in servers
        for scope, customer in (("api", ""), (f"customer.{customer_id}", customer_id))
    ]
    kept = new_token(servers[-1], bystander)
    for server in servers:
        for token, customer in held:
            assert works(server, reader, token, customer)

    revoked = env.cli("apps", "revoke-tokens", app.client_id)
    returned = time.monotonic()
    # Tokens asked for at once, before any node may have heard of the change: they must not
    # be born revoked.
    fresh = [new_token(server, app) for server in servers]
    within_a_second(
        lambda: all(
            refused(server, reader, token, customer)
            for server in servers
            for token, customer in held
        ),
        since=returned,
    )
    not_before = revoked["tokens_not_before"]
    assert all(claims_of(token)["iat"] < not_before for token, _ in held)
    for server in servers:
        for token, customer in held:
            assert_invalid_token(customers_api(server, token, customer))
            # Not even the app itself learns otherwise.
            assert introspect(server, app, token) == INACTIVE
        for token in fresh:
            assert claims_of(token)["iat"] >= not_before
            assert works(server, reader, token)
        assert works(server, reader, kept)
    actions = [
        (e["kind"], e["outcome"], (e["detail"] or {}).get("not_before"))
        for e in env.cli("audit", "list", "--app", app.client_id)
    ]
    assert ("admin", "app.revoke_tokens", not_before) in actions
    assert not any(
        e["outcome"] == "app.revoke_tokens"
        for e in env.cli("audit", "list", "--app", bystander.client_id)
    )


def test_revoke_tokens_ends_every_token_the_app_holds(
    single_env: Env, single: Server, single_reader: AppCredentials
) -> None:
    """An app's tokens leak (a log, a backup): `apps revoke-tokens` ends its api and customer
    tokens within a second, while its secret still gets new tokens at once and other apps'
    tokens are untouched."""
    app = known_app(single_env, single, "--scopes", "api,customer")
    app_tokens_are_revoked(single_env, [single], app, single_reader)


def test_revoke_tokens_reaches_every_node_within_a_second(
    cluster: tuple[Env, list[Server]],
) -> None:
    env, servers = cluster
    app = cluster_app(env, servers, "--scopes", "api,customer")
    reader = cluster_app(env, servers, "--scopes", "api", "--introspect")
    app_tokens_are_revoked(env, servers, app, reader)


# 5. An expired secret while the database is unreachable


def test_a_secret_past_its_grace_is_refused_while_the_database_is_unreachable(
    tmp_path: Path, postgres: PostgresDatabases
) -> None:
    """The old secret of a rotation leaked: its grace period ends while the database is
    down, and the server, unable to reload the app, must still stop accepting it on time."""
    url = postgres.create()
    env = installation(tmp_path, url, **BASE_ENV)
    with serving(env) as server:
        old = known_app(env, server, "--scopes", "api")
        rotated_at = time.time()
        rotated = env.cli("apps", "rotate-secret", old.client_id, "--grace", "3s")
        new = AppCredentials(old.client_id, rotated["client_secret"], rotated)
        wait_for(lambda: request_token(server, new).status_code == 200, timeout=1.0)
        with postgres.offline(url):
            assert httpx.get(server.url + "/healthz", timeout=10).status_code == 200
            answers: list[tuple[float, int]] = []

            def old_refused() -> bool:
                answers.append((time.time() - rotated_at, request_token(server, old).status_code))
                assert request_token(server, new).status_code == 200
                return answers[-1][1] != 200

            wait_for(old_refused, timeout=4.5, interval=0.1)
            # The grace ends 3 s after the rotation in whole seconds: not before 2 s.
            assert answers[0][1] == 200, answers
            assert all(code == 200 for _, code in answers[:-1]), answers
            assert answers[-1][0] >= 2.0, answers
            response = request_token(server, old)
            assert response.status_code == 401, response.text
            assert response.json()["error"] == "invalid_client"
            assert request_token(server, new).status_code == 200
            # The outage was real: the server could not reach the database all along.
            assert "registry refresh failed" in server.log()


# 6. A cap on live revocations per app


def test_revocations_per_app_are_capped(tmp_path: Path, database_url: str) -> None:
    """Each node keeps every live revocation in memory: one app revoking tokens without end
    would exhaust them. Past LEANAUTH_MAX_REVOCATIONS_PER_APP, 429 until one expires."""
    env = installation(tmp_path, database_url, **BASE_ENV, LEANAUTH_MAX_REVOCATIONS_PER_APP="3")
    with serving(env) as server:
        app = known_app(env, server, "--scopes", "api")
        other = known_app(env, server, "--scopes", "api")
        tokens = [new_token(server, app) for _ in range(5)]
        for token in tokens[:3]:
            assert revoke(server, app, token).status_code == 200
            assert introspect(server, app, token) == INACTIVE

        before = time.time()
        response = revoke(server, app, tokens[3])
        after = time.time()
        assert response.status_code == 429, response.text
        assert response.json()["error"] == "too_many_requests"
        assert response.headers["cache-control"] == "no-store"
        retry_after = int(response.headers["retry-after"])
        # Room again once the first revoked token can pass no check: its expiry plus the
        # clock-skew leeway (the store counts a revocation live through its last second).
        soonest = min(claims_of(token)["exp"] for token in tokens[:3]) + TOKEN_TIME_LEEWAY
        assert soonest - int(after) + 1 <= retry_after <= soonest - int(before) + 1
        lifetime = claims_of(tokens[0])["exp"] - claims_of(tokens[0])["iat"]
        assert 1 <= retry_after <= lifetime + TOKEN_TIME_LEEWAY + 1
        assert active(server, app, tokens[3])

        # Nothing new to keep: these still answer 200.
        assert revoke(server, app, tokens[0]).status_code == 200
        assert revoke(server, app, "not-a-token").status_code == 200
        assert revoke(server, app, tokens[4]).status_code == 429
        # The cap is per app.
        assert revoke(server, other, new_token(server, other)).status_code == 200
