"""The registry's admin commands a platform team scripts: `apps update`, `apps delete`,
`customers find`, `apps rotate-secret --grace` with a unit, and the Customers API's 409
naming the existing customer. Against a real server on SQLite (the store's new calls run on
PostgreSQL too, in the contract suite)."""

from __future__ import annotations

import calendar
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner, Result

from conftest import (
    RELAXED_THROTTLE,
    AppCredentials,
    Env,
    Server,
    claims_of,
    create_app,
    known_app,
    module_server,
    new_token,
    request_token,
    wait_for,
)
from leanauth.bootstrap import open_runtime
from leanauth.cache import RegistryCache
from leanauth.cli import main as cli_main
from leanauth.settings import Settings

# A change made with the CLI reaches the server within this (refresh interval 0.2 s; the
# machine may be loaded).
FRESH_WITHIN = 3.0
CUSTOMERS = "/customers/v1/"
USAGE_ERROR = 2  # click's exit status for a command line it refuses

# Waiting for new apps sends refused requests, and the tests provoke more.
env, server = module_server("registry-admin", **RELAXED_THROTTLE)


@pytest.fixture(scope="module")
def resource_server(env: Env, server: Server) -> AppCredentials:
    """An app that may introspect every app's tokens."""
    return known_app(env, server, "--scopes", "api", "--introspect")


@pytest.fixture
def full_app(env: Env, server: Server) -> AppCredentials:
    return known_app(env, server, "--scopes", "api,customer")


def run(env: Env, *args: str, answer: str | None = None) -> Result:
    """A command as typed, without the --json ``env.cli`` adds; ``answer`` on its stdin."""
    env.prepare()
    return CliRunner().invoke(cli_main, list(args), env=env.vars, input=answer)


def assert_error_line(result: Result, *words: str) -> str:
    """A refused command run without --json: exit status 1 and one ``error:`` line naming
    ``words``."""
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def assert_usage_error(result: Result, *words: str) -> None:
    assert result.exit_code == USAGE_ERROR, result.output
    for word in words:
        assert word in result.stderr, result.stderr


def new_customer(env: Env, app: AppCredentials, app_user_id: str = "user-1") -> str:
    made = env.cli("customers", "create", "--app", app.client_id, "--app-user-id", app_user_id)
    return str(made["customer_id"])


def introspect(server: Server, caller: AppCredentials, token: str) -> dict[str, Any]:
    form = {"token": token, "client_id": caller.client_id, "client_secret": caller.client_secret}
    response = httpx.post(server.url + "/oauth2/introspect", data=form, timeout=10)
    assert response.status_code == 200, response.text
    return dict(response.json())


def admin_events(env: Env, client_id: str) -> dict[str, dict[str, Any]]:
    events = env.cli("audit", "list", "--app", client_id)
    return {e["outcome"]: e for e in events if e["kind"] == "admin"}


def settings_of(env: Env, client_id: str) -> dict[str, Any]:
    """``apps show`` without what the running server changes meanwhile (the usage counts
    and the secrets' last use, written a second or so after the tokens it issued)."""
    shown = env.cli("apps", "show", client_id)
    return {k: v for k, v in shown.items() if k not in {"usage", "secrets"}}


def iso_seconds(text: str) -> int:
    return calendar.timegm(time.strptime(text, "%Y-%m-%dT%H:%M:%SZ"))


# apps update


def test_narrowed_scopes_refuse_customer_tokens_on_the_running_server(
    env: Env, server: Server, full_app: AppCredentials
) -> None:
    customer_scope = f"customer.{new_customer(env, full_app)}"
    assert request_token(server, full_app, customer_scope).status_code == 200

    updated = env.cli("apps", "update", full_app.client_id, "--scopes", "api")
    assert updated["scopes"] == ["api"]

    def refused() -> bool:
        return request_token(server, full_app, customer_scope).status_code == 400

    wait_for(refused, timeout=FRESH_WITHIN)
    assert request_token(server, full_app, customer_scope).json()["error"] == "invalid_scope"
    assert request_token(server, full_app).status_code == 200
    audited = admin_events(env, full_app.client_id)["app.update"]
    assert audited["detail"] == {"scopes": ["api"]}

    # Widened again, customer tokens come back.
    env.cli("apps", "update", full_app.client_id, "--scopes", "api,customer")
    wait_for(lambda: not refused(), timeout=FRESH_WITHIN)


def test_token_ttl_changes_the_lifetime_of_new_tokens(
    env: Env, server: Server, full_app: AppCredentials
) -> None:
    assert request_token(server, full_app).json()["expires_in"] == 3600
    assert env.cli("apps", "update", full_app.client_id, "--token-ttl", "120")["token_ttl"] == 120

    wait_for(lambda: request_token(server, full_app).json()["expires_in"] == 120, FRESH_WITHIN)
    claims = claims_of(new_token(server, full_app))
    assert claims["exp"] - claims["iat"] == 120

    reset = env.cli("apps", "update", full_app.client_id, "--default-token-ttl")
    assert reset["token_ttl"] is None
    wait_for(lambda: request_token(server, full_app).json()["expires_in"] == 3600, FRESH_WITHIN)


def test_update_changes_only_what_is_given(env: Env, full_app: AppCredentials) -> None:
    before = settings_of(env, full_app.client_id)
    env.cli("apps", "update", full_app.client_id, "--name", "  Renamed  ", "--quota-daily", "50")
    after = settings_of(env, full_app.client_id)
    assert after == {**before, "name": "Renamed", "quota_daily": 50}

    assert env.cli("apps", "update", full_app.client_id, "--introspect")["introspect"] is True
    assert env.cli("apps", "update", full_app.client_id, "--no-introspect")["introspect"] is False
    text = run(env, "apps", "update", full_app.client_id, "--quota-hourly", "7")
    assert text.exit_code == 0, text.output
    assert text.stdout.startswith(f"{full_app.client_id}  Renamed  scopes=api,customer")


@pytest.mark.parametrize(
    ("args", "words"),
    [
        pytest.param([], ["nothing to change"], id="no-option"),
        pytest.param(
            ["--token-ttl", "120", "--default-token-ttl"], ["not both"], id="ttl-and-default"
        ),
        pytest.param(["--scopes", "api,bogus"], ["--scopes", "bogus"], id="unknown-scope"),
        pytest.param(["--scopes", " , "], ["--scopes"], id="no-scope"),
        pytest.param(["--quota-hourly", "0"], ["--quota-hourly"], id="quota-zero"),
    ],
)
def test_update_usage_errors(
    env: Env, full_app: AppCredentials, args: list[str], words: list[str]
) -> None:
    before = settings_of(env, full_app.client_id)
    assert_usage_error(run(env, "apps", "update", full_app.client_id, *args), *words)
    assert settings_of(env, full_app.client_id) == before


@pytest.mark.parametrize(
    ("args", "words"),
    [
        pytest.param(["--token-ttl", "59"], ["60 to 86400"], id="ttl-too-short"),
        pytest.param(["--token-ttl", "86401"], ["60 to 86400"], id="ttl-too-long"),
        pytest.param(["--name", "   "], ["name"], id="empty-name"),
        pytest.param(["--name", "x" * 201], ["name"], id="long-name"),
        pytest.param(["--name", "a\x1b[2Jb"], ["control characters"], id="control-name"),
    ],
)
def test_update_refuses_what_create_refuses(
    env: Env, full_app: AppCredentials, args: list[str], words: list[str]
) -> None:
    before = settings_of(env, full_app.client_id)
    assert_error_line(run(env, "apps", "update", full_app.client_id, *args), *words)
    assert settings_of(env, full_app.client_id) == before


def test_update_of_an_unknown_app_is_an_error(env: Env) -> None:
    missing = str(uuid.uuid4())
    assert_error_line(run(env, "apps", "update", missing, "--name", "x"), missing)


# apps delete


def test_delete_ends_the_app_and_its_tokens_on_the_running_server(
    env: Env, server: Server, full_app: AppCredentials, resource_server: AppCredentials
) -> None:
    customer_id = new_customer(env, full_app)
    api_token = new_token(server, full_app)
    customer_token = new_token(server, full_app, f"customer.{customer_id}")
    assert introspect(server, resource_server, api_token)["active"] is True

    deleted = env.cli("apps", "delete", full_app.client_id, "--yes")
    assert deleted["client_id"] == full_app.client_id
    assert deleted["deleted"] is True
    assert deleted["removed"]["secrets"] == 1
    assert deleted["removed"]["customers"] == 1

    wait_for(lambda: request_token(server, full_app).status_code == 401, timeout=FRESH_WITHIN)
    assert request_token(server, full_app).json()["error"] == "invalid_client"
    refused = request_token(server, full_app, f"customer.{customer_id}")
    assert refused.status_code == 401, refused.text
    assert introspect(server, resource_server, api_token) == {"active": False}
    assert introspect(server, resource_server, customer_token) == {"active": False}
    headers = {"Authorization": f"Bearer {customer_token}"}
    read = httpx.get(server.url + CUSTOMERS + customer_id, headers=headers, timeout=10)
    assert read.status_code == 401, read.text

    # Gone from the registry; its audit trail stays, the deletion in it.
    assert_error_line(run(env, "apps", "show", full_app.client_id), full_app.client_id)
    assert full_app.client_id not in {a["client_id"] for a in env.cli("apps", "list")}
    audited = admin_events(env, full_app.client_id)
    assert {"app.create", "customer.create", "app.delete"} <= set(audited)
    assert audited["app.delete"]["detail"]["customers"] == 1
    assert_error_line(run(env, "apps", "delete", full_app.client_id, "--yes"), full_app.client_id)


def test_delete_asks_first(env: Env, full_app: AppCredentials) -> None:
    kept = run(env, "apps", "delete", full_app.client_id, answer="n\n")
    assert kept.exit_code == 1, kept.output
    assert full_app.client_id in kept.output  # the question names the app
    assert env.cli("apps", "show", full_app.client_id)["client_id"] == full_app.client_id

    gone = run(env, "apps", "delete", full_app.client_id, answer="y\n")
    assert gone.exit_code == 0, gone.output
    assert f"app {full_app.client_id} deleted" in gone.stdout
    assert_error_line(run(env, "apps", "show", full_app.client_id), full_app.client_id)


def test_delete_with_json_needs_yes(env: Env, full_app: AppCredentials) -> None:
    result = run(env, "apps", "delete", full_app.client_id, "--json")
    assert_usage_error(result, "--yes")
    assert env.cli("apps", "show", full_app.client_id)["client_id"] == full_app.client_id


# customers find


def test_customers_find(env: Env, full_app: AppCredentials) -> None:
    customer_id = new_customer(env, full_app, "alice")
    new_customer(env, full_app, "bob")
    found = env.cli("customers", "find", "--app", full_app.client_id, "--app-user-id", "alice")
    assert found == {
        "customer_id": customer_id,
        "app_user_id": "alice",
        "client_id": full_app.client_id,
        "created_at": found["created_at"],
    }
    text = run(env, "customers", "find", "--app", full_app.client_id, "--app-user-id", "alice")
    assert text.exit_code == 0, text.output
    assert text.stdout.strip() == f"{customer_id}  alice"

    missing = run(env, "customers", "find", "--app", full_app.client_id, "--app-user-id", "carol")
    assert_error_line(missing, "no customer", "'carol'")
    unknown = str(uuid.uuid4())
    result = run(env, "customers", "find", "--app", unknown, "--app-user-id", "alice")
    assert_error_line(result, unknown)


def test_customers_create_names_the_customer_that_has_the_app_user_id(
    env: Env, full_app: AppCredentials
) -> None:
    customer_id = new_customer(env, full_app, "dup")
    duplicate = run(env, "customers", "create", "--app", full_app.client_id, "--app-user-id", "dup")
    assert_error_line(duplicate, customer_id, "'dup'")


# rotate-secret --grace


@pytest.mark.parametrize(
    ("grace", "words"),
    [
        pytest.param("24", ["unit"], id="bare-number"),
        pytest.param("90", ["unit"], id="bare-seconds"),
        pytest.param("1w", ["unit"], id="unknown-unit"),
        pytest.param("-1h", ["unit"], id="negative"),
        pytest.param("31d", ["at most 30d"], id="past-the-cap"),
        pytest.param("721h", ["at most 30d"], id="past-the-cap-in-hours"),
    ],
)
def test_grace_needs_a_unit_and_is_capped(
    env: Env, full_app: AppCredentials, grace: str, words: list[str]
) -> None:
    result = run(env, "apps", "rotate-secret", full_app.client_id, "--grace", grace)
    assert_usage_error(result, "--grace", *words)
    assert len(env.cli("apps", "show", full_app.client_id)["secrets"]) == 1


@pytest.mark.parametrize(("grace", "seconds"), [("30d", 30 * 86_400), ("90s", 90), ("0", 0)])
def test_grace_end_is_printed_as_utc(
    env: Env, full_app: AppCredentials, grace: str, seconds: int
) -> None:
    old_id = full_app.raw["secret_id"]
    before = int(time.time())
    rotated = env.cli("apps", "rotate-secret", full_app.client_id, "--grace", grace)
    ends = rotated["old_secrets_expire_at"]
    assert before + seconds <= ends <= int(time.time()) + seconds
    assert rotated["old_secrets_expire_at_utc"].endswith("Z")
    assert iso_seconds(rotated["old_secrets_expire_at_utc"]) == ends
    stored = {s["secret_id"]: s for s in env.cli("apps", "show", full_app.client_id)["secrets"]}
    assert stored[old_id]["expires_at"] == ends


def test_grace_end_in_the_text_output(env: Env, full_app: AppCredentials) -> None:
    result = run(env, "apps", "rotate-secret", full_app.client_id, "--grace", "2h")
    assert result.exit_code == 0, result.output
    last = result.stdout.strip().splitlines()[-1]
    when = last.removeprefix("The old secret works until ").removesuffix(" at the latest.")
    assert abs(iso_seconds(when) - (time.time() + 7200)) < 5


# The Customers API


def test_duplicate_app_user_id_409_names_the_existing_customer(
    server: Server, full_app: AppCredentials
) -> None:
    headers = {"Authorization": f"Bearer {new_token(server, full_app)}"}
    body = {"app_user_id": f"user-{uuid.uuid4()}"}
    with httpx.Client(base_url=server.url, headers=headers, timeout=10) as http:
        first = http.post(CUSTOMERS, json=body)
        assert first.status_code == 201, first.text
        again = http.post(CUSTOMERS, json=body)
    assert again.status_code == 409, again.text
    answer = again.json()
    assert set(answer) == {"status", "message", "timestamp", "customer_id"}
    assert answer["status"] == "CUSTOMER_ALREADY_EXISTS"
    assert answer["customer_id"] == first.json()["customer_id"]
    assert again.headers["cache-control"] == "no-store"


def test_a_shorter_lifetime_leaves_the_longer_tokens_good_until_they_expire(
    tmp_path: Path,
) -> None:
    """This server refuses a token living longer than any it issues (a stolen key's). After
    `apps update --token-ttl` shortens an app's lifetime, tokens issued under the longer one
    must still pass that check until they expire, full reloads of the registry included."""
    env = Env(tmp_path)
    app = create_app(env, "--name", "Long-lived", "--token-ttl", "7200")
    runtime = open_runtime(Settings.from_env(env.vars))
    try:
        cache = RegistryCache(runtime.store, runtime.cipher, 1.0)
        cache.load()
        assert cache.longest_app_ttl == 7200
        env.cli("apps", "update", app.client_id, "--token-ttl", "600")
        now = int(time.time())
        cache.load()
        assert cache.longest_app_ttl == 7200
        # Once every token of the longer lifetime has expired, the bound comes down.
        cache._reload_registry(now + 7201)
        assert cache.longest_app_ttl == 600
    finally:
        runtime.store.close()
