"""An admin change and its audit record commit in one transaction (issue #11): a command
whose audit record the database refuses changes nothing, and one killed at any moment leaves
no secret or signing key without its audit record.

The database itself refuses the records (a trigger on ``audit_events``), on SQLite and on
PostgreSQL; the commands are the real CLI."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from conftest import Env, create_app, installation, new_token, serving, wait_for, wait_until_known
from leanauth.store.models import App, AuditEvent, ClientSecret
from leanauth.store.sql import SqlStore

REFUSAL = "audit refused"
SQLITE_TRIGGER = f"""
CREATE TRIGGER refuse_admin_audit BEFORE INSERT ON audit_events WHEN NEW.kind = 'admin'
BEGIN SELECT RAISE(ABORT, '{REFUSAL}'); END
"""
POSTGRES_TRIGGER = f"""
CREATE FUNCTION refuse_admin_audit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.kind = 'admin' THEN
        RAISE EXCEPTION '{REFUSAL}';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER refuse_admin_audit BEFORE INSERT ON audit_events
    FOR EACH ROW EXECUTE FUNCTION refuse_admin_audit();
"""
POSTGRES_DROP = "DROP TRIGGER refuse_admin_audit ON audit_events"


@pytest.fixture
def env(tmp_path: Path, database_url: str) -> Env:
    return installation(tmp_path, database_url)


def database_url_of(env: Env) -> str:
    return env.vars["LEANAUTH_DATABASE_URL"]


@contextmanager
def refused_admin_audit(env: Env) -> Iterator[None]:
    """The database refuses every admin audit record while the block runs."""
    url = database_url_of(env)
    if url.startswith("sqlite"):
        path = url.removeprefix("sqlite:///")
        with sqlite3.connect(path) as conn:
            conn.execute(SQLITE_TRIGGER)
        try:
            yield
        finally:
            with sqlite3.connect(path) as conn:
                conn.execute("DROP TRIGGER refuse_admin_audit")
        return
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(POSTGRES_TRIGGER)
    try:
        yield
    finally:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(POSTGRES_DROP)


@contextmanager
def store_of(env: Env) -> Iterator[SqlStore]:
    store = SqlStore(database_url_of(env))
    try:
        yield store
    finally:
        store.close()


def snapshot(env: Env) -> dict[str, Any]:
    """Everything an admin command can change, read straight from the database."""
    with store_of(env) as store:
        apps = store.list_apps()
        return {
            "apps": apps,
            "secrets": {a.client_id: store.list_secrets(a.client_id) for a in apps},
            "customers": {a.client_id: store.list_customers(a.client_id) for a in apps},
            "keys": sorted(store.list_keys(), key=lambda k: k.kid),
            "audit": store.list_audit_events(limit=100_000),
        }


def test_the_calls_of_an_atomic_block_commit_together_or_not_at_all(database_url: str) -> None:
    """The store's side: what the block wrote is seen inside it, gone when it raises (the
    change feed too, and no other process is told of it), kept with its audit record when
    it ends; a block inside another joins it."""
    published: list[str] = []

    class Publisher:
        def __call__(self, kind: str) -> None:
            published.append(kind)

        def close(self) -> None:
            pass

    store = SqlStore(database_url, publish=Publisher())
    store.upgrade_schema()
    try:
        app = App(str(uuid.uuid4()), "Atomic", frozenset({"api"}), None, True, 1_800_000_000)
        secret = ClientSecret("sec_atomic", app.client_id, os.urandom(32), 1_800_000_000)
        event = AuditEvent(1_800_000_000_000, "admin", "app.create", app.client_id, "test", None)
        changes = store.latest_change_id()

        def fail_after_writing() -> None:
            with store.atomic():
                store.create_app(app, secret)
                store.add_audit_events([event])
                assert store.get_app(app.client_id) == app
                raise RuntimeError

        with pytest.raises(RuntimeError):
            fail_after_writing()
        assert store.get_app(app.client_id) is None
        assert store.list_audit_events() == []
        assert store.latest_change_id() == changes
        assert published == []

        with store.atomic():
            store.create_app(app, secret)
            with store.atomic():
                store.add_audit_events([event])
            assert published == []  # told once committed
        assert store.get_app(app.client_id) == app
        assert [e.outcome for e in store.list_audit_events()] == ["app.create"]
        assert published == ["app"]
    finally:
        store.close()


def admin_events(env: Env) -> list[dict[str, Any]]:
    return [e for e in env.cli("audit", "list", "--limit", "100000") if e["kind"] == "admin"]


def test_a_change_whose_audit_record_is_refused_changes_nothing(env: Env) -> None:
    app = create_app(env, "--name", "Audited", "--scopes", "api,customer")
    customer = env.cli("customers", "create", "--app", app.client_id, "--app-user-id", "u-1")
    secret_id = app.raw["secret_id"]
    kid = env.cli("keys", "list")[0]["kid"]
    commands = [
        ("apps", "create", "--name", "Never made"),
        ("apps", "rotate-secret", app.client_id),
        ("apps", "rotate-secret", app.client_id, "--grace", "0"),
        ("apps", "revoke-secret", app.client_id, secret_id),
        ("apps", "disable", app.client_id),
        ("apps", "revoke-tokens", app.client_id),
        ("apps", "set-quota", app.client_id, "--quota-hourly", "5"),
        ("customers", "create", "--app", app.client_id, "--app-user-id", "u-2"),
        ("customers", "delete", "--app", app.client_id, customer["customer_id"]),
        ("keys", "rotate"),
        ("keys", "rotate", "--immediately"),
        ("keys", "revoke", kid),
    ]
    before = snapshot(env)
    with refused_admin_audit(env):
        for command in commands:
            result = env.cli(*command, expect_ok=False)
            assert result.exit_code == 1, (command, result.output)
            assert "the audit record could not be written" in result.output, command
            assert REFUSAL in result.output
            # No audit log line either: it would tell of a change that never happened.
            assert '"audit":"admin"' not in result.output
            assert snapshot(env) == before, command

    # The refused rotation left no second live secret: the next one is not refused for
    # "2 live secrets", and each change is audited.
    rotated = env.cli("apps", "rotate-secret", app.client_id)
    key = env.cli("keys", "rotate", "--immediately")
    assert key["kid"] in {k["kid"] for k in env.cli("keys", "list")}
    secrets = env.cli("apps", "show", app.client_id)["secrets"]
    assert sum(s["live"] for s in secrets) == 2
    events = admin_events(env)
    assert [e["outcome"] for e in events] == [
        "app.create",
        "customer.create",
        "secret.rotate",
        "key.rotate",
    ]
    assert events[2]["detail"]["secret_id"] == rotated["secret_id"]
    assert events[3]["detail"]["kid"] == key["kid"]


def test_the_customers_api_creates_no_customer_without_its_audit_record(env: Env) -> None:
    with serving(env) as server:
        app = create_app(env, "--name", "Customers API", "--scopes", "api")
        wait_until_known(server, app)
        headers = {"Authorization": f"Bearer {new_token(server, app)}"}
        body = {"app_user_id": "from-the-api"}
        with refused_admin_audit(env):
            refused = httpx.post(
                server.url + "/customers/v1/", json=body, headers=headers, timeout=10
            )
            assert refused.status_code == 503, refused.text
            with store_of(env) as store:
                assert store.list_customers(app.client_id) == []
        created = httpx.post(server.url + "/customers/v1/", json=body, headers=headers, timeout=10)
        assert created.status_code == 201, created.text
    events = [e for e in admin_events(env) if e["outcome"] == "customer.create"]
    assert [e["detail"]["customer_id"] for e in events] == [created.json()["customer_id"]]
    assert events[0]["source"] == "server"


def unaudited(env: Env, first_kids: set[str]) -> list[str]:
    """Secrets and signing keys that have no admin audit record (the keys made before any
    admin command, by ``init``, have none)."""
    with store_of(env) as store:
        audited = {
            str(value)
            for event in store.list_audit_events(limit=100_000)
            if event.kind == "admin" and event.detail
            for name, value in event.detail.items()
            if name in ("secret_id", "kid")
        }
        issued = [s.secret_id for a in store.list_apps() for s in store.list_secrets(a.client_id)]
        issued += [k.kid for k in store.list_keys() if k.kid not in first_kids]
    return [name for name in issued if name not in audited]


def kids(env: Env) -> set[str]:
    with store_of(env) as store:
        return {k.kid for k in store.list_keys()}


def test_a_command_killed_at_any_moment_leaves_nothing_unaudited(env: Env) -> None:
    """Each of ``apps rotate-secret`` and ``keys rotate --immediately`` is killed (-9) at a
    random moment of its run, mostly late in it (the start is Python importing modules); the
    invariant holds after every kill, and the registry still works after them."""
    app = create_app(env, "--name", "Killed", "--scopes", "api")
    first_kids = kids(env)
    leanauth = [sys.executable, "-m", "leanauth"]
    commands = [
        [*leanauth, "apps", "rotate-secret", app.client_id, "--grace", "0", "--json"],
        [*leanauth, "keys", "rotate", "--immediately", "--json"],
    ]
    variables = {**os.environ, **env.vars}
    started = time.monotonic()
    subprocess.run(commands[1], env=variables, capture_output=True, check=True, timeout=60)
    full_run = time.monotonic() - started

    seed = random.randrange(1_000_000)
    rng = random.Random(seed)
    for attempt in range(10):
        delay = full_run * rng.uniform(0.3 if attempt < 2 else 0.6, 1.1)
        process = subprocess.Popen(
            commands[attempt % 2], env=variables, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        _, errors = process.communicate(timeout=10)
        # Finished, or refused cleanly (a rotation within 2 s of another), or killed.
        assert process.returncode in (0, 1, -signal.SIGKILL), errors
        missing = unaudited(env, first_kids)
        assert not missing, f"kill after {delay:.3f} s (seed {seed}): {missing} unaudited"

    # The registry goes on working: a rotation now is not refused for a leftover secret.
    time.sleep(2)
    env.cli("apps", "rotate-secret", app.client_id, "--grace", "0")
    env.cli("keys", "rotate", "--immediately")
    assert not unaudited(env, first_kids)


def test_a_command_killed_while_its_audit_record_waits_changes_nothing(
    tmp_path: Path, postgres: Any
) -> None:
    """The window between the change and its audit record, held open: this test holds a lock
    on ``audit_events`` (PostgreSQL) so that the audit write waits, then kills the command."""
    env = installation(tmp_path, postgres.create())
    url = database_url_of(env)
    app = create_app(env, "--name", "Held", "--scopes", "api")
    first_kids = kids(env)
    variables = {**os.environ, **env.vars}
    leanauth = [sys.executable, "-m", "leanauth"]
    for command in (
        [*leanauth, "apps", "rotate-secret", app.client_id, "--json"],
        [*leanauth, "keys", "rotate", "--immediately", "--json"],
    ):
        before = snapshot(env)
        with psycopg.connect(url) as holder:
            holder.execute("LOCK TABLE audit_events IN EXCLUSIVE MODE")
            process = subprocess.Popen(command, env=variables, stdout=subprocess.DEVNULL)
            try:
                wait_for(lambda: waiting_on_audit_events(url), timeout=30)
            finally:
                process.send_signal(signal.SIGKILL)
                process.wait(timeout=10)
            holder.rollback()
        # The killed command's connection ends (and its transaction with it) once it gets
        # the lock and finds its client gone.
        wait_for(lambda: not waiting_on_audit_events(url) and not leanauth_sessions(url))
        assert snapshot(env) == before, command
        assert not unaudited(env, first_kids)


def waiting_on_audit_events(url: str) -> bool:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND wait_event_type = 'Lock' AND query ILIKE %s",
            ("%audit_events%",),
        ).fetchone()
    return bool(row and row[0])


def leanauth_sessions(url: str) -> bool:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND application_name = 'leanauth'"
        ).fetchone()
    return bool(row and row[0])
