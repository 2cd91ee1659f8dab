"""The audit trail: token requests (issued and refused) and admin changes, with who and
from where, listed by `leanauth audit list`; and audit records as JSON log lines."""

from __future__ import annotations

import calendar
import json
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jwt
import pytest

from conftest import (
    AppCredentials,
    Env,
    Server,
    create_app,
    module_server,
    request_token,
    serving,
    wait_for,
    wait_until_known,
)

# The server's events reach the store in a background flush once a second.
FLUSHED_WITHIN = 3.5
AT = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
EVENT_FIELDS = {"at", "kind", "outcome", "client_id", "source", "detail"}
LOOPBACK = "127.0.0.1"

Event = dict[str, Any]


env, server = module_server(
    "audit",
    LEANAUTH_AUDIT_LOG="all",
    LEANAUTH_LOG_FORMAT="json",
    # Room for the refusals made here: the brute-force throttle is tested elsewhere.
    LEANAUTH_AUTH_FAILURE_LIMIT="1000 per minute",
    LEANAUTH_AUTH_FAILURE_ADDRESS_LIMIT="10000 per minute",
)


@dataclass(frozen=True)
class Scenario:
    """What was done to the server and the registry, once for the whole module."""

    started_at: float
    app: AppCredentials
    claims: dict[str, Any]
    wrong_secret: AppCredentials
    unknown: AppCredentials
    bad_scope: str
    disabled: AppCredentials
    rotated: dict[str, Any]
    customer: dict[str, Any]
    key: dict[str, Any]


def with_secret(app: AppCredentials, secret: str) -> AppCredentials:
    return AppCredentials(app.client_id, secret, app.raw)


@pytest.fixture(scope="module")
def scenario(env: Env, server: Server) -> Scenario:
    started_at = time.time()
    app = create_app(env, "--name", "Audited", "--scopes", "api")
    wait_until_known(server, app)

    issued = request_token(server, app)
    assert issued.status_code == 200, issued.text
    claims = jwt.decode(issued.json()["access_token"], options={"verify_signature": False})

    wrong_secret = with_secret(app, "lsk_" + "W" * 43)
    unknown = AppCredentials(str(uuid.uuid4()), "lsk_" + "U" * 43, {})
    for refused in (wrong_secret, unknown):
        response = request_token(server, refused)
        assert response.status_code == 401, response.text

    bad_scope = f"customer.{uuid.uuid4()}"
    response = request_token(server, app, scope=bad_scope)
    assert response.status_code == 400, response.text
    assert response.json()["error"] == "invalid_scope"

    disabled = create_app(env, "--name", "Disabled", "--scopes", "api")
    wait_until_known(server, disabled)
    env.cli("apps", "disable", disabled.client_id)
    wait_for(lambda: request_token(server, disabled).status_code == 401)

    rotated = env.cli("apps", "rotate-secret", app.client_id)
    customer = env.cli("customers", "create", "--app", app.client_id, "--app-user-id", "u-1")
    key = env.cli("keys", "rotate")
    return Scenario(
        started_at,
        app,
        claims,
        wrong_secret,
        unknown,
        bad_scope,
        disabled,
        rotated,
        customer,
        key,
    )


def audit_list(env: Env, *args: str) -> list[Event]:
    events: list[Event] = env.cli("audit", "list", *args)
    return events


def wait_for_event(env: Env, match: Callable[[Event], bool], *args: str) -> Event:
    """The one event ``match`` picks among ``audit list ARGS``, once it is written."""
    found: list[Event] = []

    def written() -> bool:
        found[:] = [e for e in audit_list(env, *args) if match(e)]
        return bool(found)

    wait_for(written, timeout=FLUSHED_WITHIN)
    assert len(found) == 1, found
    assert set(found[0]) == EVENT_FIELDS
    return found[0]


def test_an_issued_token_is_audited_with_its_jti_scope_and_expiry(
    env: Env, scenario: Scenario
) -> None:
    jti = scenario.claims["jti"]
    event = wait_for_event(
        env,
        lambda e: e["outcome"] == "issued" and (e["detail"] or {}).get("jti") == jti,
        "--app",
        scenario.app.client_id,
    )
    request_id = event["detail"].pop("request_id")
    assert isinstance(request_id, str)
    assert len(request_id) >= 8
    assert {k: v for k, v in event.items() if k != "at"} == {
        "kind": "token",
        "outcome": "issued",
        "client_id": scenario.app.client_id,
        "source": LOOPBACK,
        "detail": {"scope": "api", "jti": jti, "exp": scenario.claims["exp"]},
    }


@pytest.mark.parametrize("who", ["wrong_secret", "unknown_client", "disabled_app"])
def test_a_refused_authentication_is_audited_with_its_reason(
    env: Env, scenario: Scenario, who: str
) -> None:
    creds = {
        "wrong_secret": scenario.wrong_secret,
        "unknown_client": scenario.unknown,
        "disabled_app": scenario.disabled,
    }[who]
    event = wait_for_event(
        env,
        lambda e: e["outcome"] == "invalid_client" and (e["detail"] or {}).get("reason") == who,
        "--app",
        creds.client_id,
    )
    assert event["detail"].pop("request_id")
    assert {k: v for k, v in event.items() if k != "at"} == {
        "kind": "token",
        "outcome": "invalid_client",
        "client_id": creds.client_id,
        "source": LOOPBACK,
        "detail": {"scope": "api", "reason": who},
    }


def test_a_refused_scope_is_audited(env: Env, scenario: Scenario) -> None:
    event = wait_for_event(
        env, lambda e: e["outcome"] == "invalid_scope", "--app", scenario.app.client_id
    )
    assert event["kind"] == "token"
    assert event["client_id"] == scenario.app.client_id
    assert event["source"] == LOOPBACK
    assert event["detail"]["scope"] == scenario.bad_scope


def test_admin_changes_are_audited(env: Env, scenario: Scenario) -> None:
    app_id = scenario.app.client_id
    admin = {e["outcome"]: e for e in audit_list(env, "--app", app_id) if e["kind"] == "admin"}
    assert set(admin) == {"app.create", "secret.rotate", "customer.create"}
    assert admin["app.create"]["detail"] == {
        "name": "Audited",
        "secret_id": scenario.app.raw["secret_id"],
    }
    assert admin["secret.rotate"]["detail"] == {
        "secret_id": scenario.rotated["secret_id"],
        "grace": 86_400,
    }
    assert admin["customer.create"]["detail"] == {"customer_id": scenario.customer["customer_id"]}
    for event in admin.values():
        assert event["client_id"] == app_id
        assert event["source"] == "cli"

    disabled = [
        e for e in audit_list(env, "--app", scenario.disabled.client_id) if e["kind"] == "admin"
    ]
    assert [(e["outcome"], e["source"]) for e in disabled] == [
        ("app.create", "cli"),
        ("app.disable", "cli"),
    ]

    # A key belongs to no app: only the unfiltered list has its rotation.
    rotations = [e for e in audit_list(env) if e["outcome"] == "key.rotate"]
    assert len(rotations) == 1
    (rotation,) = rotations
    assert rotation["kind"] == "admin"
    assert rotation["client_id"] is None
    assert rotation["source"] == "cli"
    assert rotation["detail"] == {
        "kid": scenario.key["kid"],
        "alg": scenario.key["alg"],
        "activates_at": scenario.key["activates_at"],
    }


def test_since_limit_and_app_filters(env: Env, scenario: Scenario) -> None:
    app_id = scenario.app.client_id
    wait_for_event(env, lambda e: e["outcome"] == "invalid_scope", "--app", app_id)
    everything = audit_list(env, "--app", app_id)
    assert len(everything) >= 6
    assert audit_list(env, "--app", app_id, "--since", "1h") == everything
    # Oldest first, each stamped with its time in milliseconds, UTC.
    stamps = [e["at"] for e in everything]
    assert stamps == sorted(stamps)
    for stamp in stamps:
        assert AT.match(stamp), stamp
        seconds = calendar.timegm(time.strptime(stamp[:19], "%Y-%m-%dT%H:%M:%S"))
        assert scenario.started_at - 1 <= seconds <= time.time() + 1

    # A window that ends before now: nothing of the past is in it.
    assert audit_list(env, "--app", app_id, "--since", "0") == []
    assert audit_list(env, "--app", str(uuid.uuid4())) == []
    assert audit_list(env, "--app", app_id, "--limit", "1") == everything[-1:]
    assert audit_list(env, "--app", app_id, "--limit", "2") == everything[-2:]
    # Unfiltered, both apps and the key rotation are there.
    clients = {e["client_id"] for e in audit_list(env, "--since", "1h")}
    assert {app_id, scenario.disabled.client_id, scenario.unknown.client_id, None} <= clients


def test_the_audit_list_shows_no_secret_and_no_token(env: Env, scenario: Scenario) -> None:
    wait_for_event(env, lambda e: e["outcome"] == "invalid_scope", "--app", scenario.app.client_id)
    text = json.dumps(audit_list(env))
    for secret in (
        scenario.app.client_secret,
        scenario.rotated["client_secret"],
        scenario.disabled.client_secret,
        scenario.wrong_secret.client_secret,
        scenario.unknown.client_secret,
    ):
        assert secret.removeprefix("lsk_") not in text


def audit_records(log: str) -> list[dict[str, Any]]:
    """The audit records among JSON log lines: each is an object of its line (``audit``),
    never a string to parse again."""
    records = []
    for line in log.splitlines():
        if not line.strip():
            continue
        entry = json.loads(line)
        assert isinstance(entry, dict), line
        if entry.get("logger") == "leanauth.audit" and "audit" in entry:
            assert isinstance(entry["audit"], dict), line
            records.append(entry["audit"])
    return records


def test_the_server_writes_audit_records_as_json_log_lines(
    env: Env, server: Server, scenario: Scenario
) -> None:
    jti = scenario.claims["jti"]
    # Every line of the log is one JSON object (a line that is not fails json.loads).
    wait_for(
        lambda: any(r.get("jti") == jti for r in audit_records(server.log())),
        timeout=FLUSHED_WITHIN,
    )
    wait_for(
        lambda: any(r.get("outcome") == "invalid_scope" for r in audit_records(server.log())),
        timeout=FLUSHED_WITHIN,
    )
    records = audit_records(server.log())
    (issued,) = [r for r in records if r.get("jti") == jti]
    assert issued["audit"] == "token"
    assert issued["outcome"] == "issued"
    assert issued["client_id"] == scenario.app.client_id
    assert issued["source"] == LOOPBACK
    assert issued["scope"] == "api"
    assert issued["exp"] == scenario.claims["exp"]
    assert isinstance(issued["at_ms"], int)

    reasons = {
        (r["client_id"], r.get("reason")) for r in records if r["outcome"] == "invalid_client"
    }
    assert (scenario.app.client_id, "wrong_secret") in reasons
    assert (scenario.unknown.client_id, "unknown_client") in reasons
    assert (scenario.disabled.client_id, "disabled_app") in reasons


def test_a_server_deletes_audit_records_past_their_retention(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    from leanauth.store.models import AuditEvent
    from leanauth.store.sql import SqlStore

    env = Env(tmp_path_factory.mktemp("retention"), extra={"LEANAUTH_AUDIT_RETENTION_DAYS": "1"})
    env.cli("init")
    now_ms = int(time.time() * 1000)
    store = SqlStore(env.vars["LEANAUTH_DATABASE_URL"])
    try:
        store.add_audit_events(
            [
                AuditEvent(now_ms - 2 * 86_400_000, "admin", "app.create", "old-app", "cli", None),
                AuditEvent(now_ms - 3_600_000, "admin", "app.create", "recent-app", "cli", None),
            ]
        )
    finally:
        store.close()
    with serving(env):
        wait_for(
            lambda: {e["client_id"] for e in env.cli("audit", "list")} == {"recent-app"},
            timeout=5,
        )
