"""The storage contract: the same tests against SQLite and PostgreSQL (``database_url``)."""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Iterator

import pytest

from leanauth.keys import KeyCipher, StoredKey, new_stored_key
from leanauth.store import migrate
from leanauth.store.base import AlreadyExists, NotFound, StoreError
from leanauth.store.models import App, ClientSecret, Customer
from leanauth.store.sql import SqlStore

NOW = 1_800_000_000


@pytest.fixture
def store(database_url: str) -> Iterator[SqlStore]:
    opened = SqlStore(database_url)
    opened.upgrade_schema()
    yield opened
    opened.close()


@pytest.fixture
def cipher() -> KeyCipher:
    return KeyCipher(os.urandom(32))


def make_app(name: str = "App", enabled: bool = True) -> App:
    return App(str(uuid.uuid4()), name, frozenset({"api", "customer"}), None, enabled, NOW)


def make_secret(app: App, secret_id: str | None = None, created_at: int = NOW) -> ClientSecret:
    return ClientSecret(
        secret_id or f"sec_{uuid.uuid4().hex[:16]}", app.client_id, os.urandom(32), created_at
    )


def add_app(store: SqlStore, name: str = "App") -> tuple[App, ClientSecret]:
    app = make_app(name)
    secret = make_secret(app)
    store.create_app(app, secret)
    return app, secret


def test_schema_is_at_head_and_upgrade_is_idempotent(store: SqlStore) -> None:
    assert store.schema_revision() == migrate.head_revision()
    store.upgrade_schema()
    assert store.schema_revision() == migrate.head_revision()


def test_empty_database_has_no_revision(database_url: str) -> None:
    fresh = SqlStore(database_url)
    try:
        assert fresh.schema_revision() is None
        with pytest.raises(migrate.SchemaOutdated, match="leanauth db upgrade"):
            migrate.require_current(fresh.engine)
    finally:
        fresh.close()


def test_app_round_trip(store: SqlStore) -> None:
    app = App(str(uuid.uuid4()), "Round trip", frozenset({"api"}), 900, True, NOW)
    secret = make_secret(app)
    store.create_app(app, secret)
    assert store.get_app(app.client_id) == app
    assert store.list_apps() == [app]
    assert store.list_secrets(app.client_id) == [secret]
    credentials = store.get_credentials(app.client_id, NOW)
    assert credentials is not None
    assert credentials.app == app
    assert credentials.secrets == (secret,)


def test_unknown_app_reads_as_none(store: SqlStore) -> None:
    missing = str(uuid.uuid4())
    assert store.get_app(missing) is None
    assert store.get_credentials(missing, NOW) is None
    assert store.list_secrets(missing) == []


def test_app_and_first_secret_are_one_transaction(store: SqlStore) -> None:
    first, secret = add_app(store, "First")
    second = make_app("Second")
    # The secret id is taken: the secret insert fails, and the app must not be left behind.
    with pytest.raises(Exception, match=r"(?i)unique|duplicate|integrity"):
        store.create_app(second, make_secret(second, secret_id=secret.secret_id))
    assert store.get_app(second.client_id) is None
    assert [a.client_id for a in store.list_apps()] == [first.client_id]


def test_enable_and_disable(store: SqlStore) -> None:
    app, _ = add_app(store)
    assert store.set_app_enabled(app.client_id, False).enabled is False
    assert store.get_app(app.client_id) == App(
        app.client_id, app.name, app.scopes, app.token_ttl, False, app.created_at
    )
    assert store.set_app_enabled(app.client_id, True).enabled is True
    with pytest.raises(NotFound):
        store.set_app_enabled(str(uuid.uuid4()), False)


def test_replace_secrets_ends_the_old_ones(store: SqlStore) -> None:
    app, old = add_app(store)
    new = make_secret(app, created_at=NOW + 10)
    store.replace_secrets(app.client_id, new, NOW + 10)
    credentials = store.get_credentials(app.client_id, NOW + 10)
    assert credentials is not None
    assert [s.secret_id for s in credentials.secrets] == [new.secret_id]
    # Before the rotation instant the old secret was live, and it still is on record.
    assert {s.secret_id for s in store.list_secrets(app.client_id)} == {
        old.secret_id,
        new.secret_id,
    }
    with pytest.raises(NotFound):
        store.replace_secrets(str(uuid.uuid4()), make_secret(app), NOW)


def test_all_credentials_holds_every_app_with_live_secrets(store: SqlStore) -> None:
    first, first_secret = add_app(store, "One")
    second, _ = add_app(store, "Two")
    store.replace_secrets(second.client_id, make_secret(second, created_at=NOW), NOW)
    loaded = {c.app.client_id: c for c in store.all_credentials(NOW + 1)}
    assert set(loaded) == {first.client_id, second.client_id}
    assert loaded[first.client_id].secrets == (first_secret,)
    assert len(loaded[second.client_id].secrets) == 1


def test_customers(store: SqlStore) -> None:
    app, _ = add_app(store, "One")
    other, _ = add_app(store, "Two")
    customer = Customer(str(uuid.uuid4()), app.client_id, "user-1", NOW)
    store.create_customer(customer)
    assert store.get_customer(customer.customer_id) == customer
    assert store.list_customers(app.client_id) == [customer]
    assert store.list_customers(other.client_id) == []
    with pytest.raises(AlreadyExists):
        store.create_customer(Customer(str(uuid.uuid4()), app.client_id, "user-1", NOW))
    # The same app_user_id belongs to each app separately.
    store.create_customer(Customer(str(uuid.uuid4()), other.client_id, "user-1", NOW))
    with pytest.raises(NotFound):
        store.create_customer(Customer(str(uuid.uuid4()), str(uuid.uuid4()), "user-1", NOW))
    assert store.get_customer(str(uuid.uuid4())) is None


def test_first_active_key_is_stored_once(store: SqlStore, cipher: KeyCipher) -> None:
    first = new_stored_key("ES256", cipher, NOW)
    assert store.ensure_active_key(first) is True
    assert store.ensure_active_key(new_stored_key("ES256", cipher, NOW)) is False
    assert store.list_keys() == [first]


def test_rotation_retires_the_active_key(store: SqlStore, cipher: KeyCipher) -> None:
    first = new_stored_key("ES256", cipher, NOW)
    store.ensure_active_key(first)
    second = new_stored_key("EdDSA", cipher, NOW + 60)
    store.rotate_key(second, NOW + 60)
    keys = {k.kid: k for k in store.list_keys()}
    assert keys[second.kid] == second
    assert keys[first.kid].state == "retired"
    assert keys[first.kid].retired_at == NOW + 60
    assert keys[first.kid].encrypted_private_key == first.encrypted_private_key
    assert cipher.decrypt(first.kid, keys[first.kid].encrypted_private_key) is not None


def test_concurrent_first_starts_make_one_key(store: SqlStore, cipher: KeyCipher) -> None:
    candidates: list[StoredKey] = [new_stored_key("ES256", cipher, NOW) for _ in range(6)]
    barrier = threading.Barrier(len(candidates))
    results: list[bool] = []

    def start(candidate: StoredKey) -> None:
        barrier.wait()
        results.append(store.ensure_active_key(candidate))

    threads = [threading.Thread(target=start, args=(c,)) for c in candidates]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == [False] * 5 + [True]
    assert [k.state for k in store.list_keys()] == ["active"]


def test_change_feed_names_every_write_in_order(store: SqlStore, cipher: KeyCipher) -> None:
    start = store.latest_change_id()
    app, _ = add_app(store)
    store.set_app_enabled(app.client_id, False)
    customer = Customer(str(uuid.uuid4()), app.client_id, "user-1", NOW)
    store.create_customer(customer)
    key = new_stored_key("ES256", cipher, NOW)
    store.rotate_key(key, NOW)
    changes = store.changes_since(start)
    assert [(c.kind, c.entity_id) for c in changes] == [
        ("app", app.client_id),
        ("app", app.client_id),
        ("customer", customer.customer_id),
        ("key", key.kid),
    ]
    ids = [c.change_id for c in changes]
    assert ids == sorted(ids)
    assert store.latest_change_id() == ids[-1]
    assert store.changes_since(ids[-1]) == []


def test_failed_write_records_no_change(store: SqlStore) -> None:
    app, _ = add_app(store)
    before = store.latest_change_id()
    store.create_customer(Customer(str(uuid.uuid4()), app.client_id, "x", NOW))
    with pytest.raises(AlreadyExists):
        store.create_customer(Customer(str(uuid.uuid4()), app.client_id, "x", NOW))
    assert [c.kind for c in store.changes_since(before)] == ["customer"]


def test_unreachable_database_is_a_store_error() -> None:
    unreachable = SqlStore("postgresql://nobody@127.0.0.1:1/none")
    try:
        with pytest.raises(StoreError):
            unreachable.get_app(str(uuid.uuid4()))
    finally:
        unreachable.close()
