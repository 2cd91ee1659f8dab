"""The storage contract: the same tests against SQLite and PostgreSQL (``database_url``)."""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Iterator

import pytest

from leanauth.keys import KeyCipher, new_stored_key
from leanauth.store import migrate
from leanauth.store.base import AlreadyExists, Conflict, NotFound, StoreError
from leanauth.store.models import (
    App,
    AuditEvent,
    ClientSecret,
    Customer,
    RevokedToken,
    StoredKey,
)
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


def make_secret(app: App, secret_id: str | None = None, created_at: int = NOW - 60) -> ClientSecret:
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
            migrate.require_current(fresh.schema_revision())
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
    with pytest.raises(AlreadyExists):
        store.create_app(second, make_secret(second, secret_id=secret.secret_id))
    assert store.get_app(second.client_id) is None
    assert [a.client_id for a in store.list_apps()] == [first.client_id]


def test_enable_and_disable(store: SqlStore) -> None:
    app, _ = add_app(store)
    assert store.update_app(app.client_id, enabled=False).enabled is False
    assert store.get_app(app.client_id) == App(
        app.client_id, app.name, app.scopes, app.token_ttl, False, app.created_at
    )
    assert store.update_app(app.client_id, enabled=True).enabled is True
    with pytest.raises(NotFound):
        store.update_app(str(uuid.uuid4()), enabled=False)


def test_rotate_secret_keeps_the_old_one_for_the_grace_period(store: SqlStore) -> None:
    app, old = add_app(store)
    new = make_secret(app, created_at=NOW + 10)
    store.rotate_secret(new, NOW + 10, NOW + 100, frozenset({old.secret_id}))
    live = store.get_credentials(app.client_id, NOW + 50)
    assert live is not None
    assert {s.secret_id for s in live.secrets} == {old.secret_id, new.secret_id}
    after = store.get_credentials(app.client_id, NOW + 100)
    assert after is not None
    assert [s.secret_id for s in after.secrets] == [new.secret_id]
    ended = {s.secret_id: s.expires_at for s in store.list_secrets(app.client_id)}
    assert ended == {old.secret_id: NOW + 100, new.secret_id: None}


def test_rotate_secret_with_no_grace_ends_the_old_one_now(store: SqlStore) -> None:
    app, old = add_app(store)
    new = make_secret(app)
    store.rotate_secret(new, NOW, NOW, frozenset({old.secret_id}))
    credentials = store.get_credentials(app.client_id, NOW)
    assert credentials is not None
    assert [s.secret_id for s in credentials.secrets] == [new.secret_id]


def test_at_most_two_live_secrets(store: SqlStore) -> None:
    app, old = add_app(store)
    second = make_secret(app)
    store.rotate_secret(second, NOW, NOW + 100, frozenset({old.secret_id}))
    with pytest.raises(Conflict, match="revoke one first"):
        store.rotate_secret(
            make_secret(app), NOW, NOW + 100, frozenset({old.secret_id, second.secret_id})
        )
    store.revoke_secret(app.client_id, old.secret_id, NOW + 1)
    store.rotate_secret(make_secret(app), NOW + 1, NOW + 100, frozenset({second.secret_id}))
    assert len(store.get_credentials(app.client_id, NOW + 2).secrets) == 2  # type: ignore[union-attr]


def test_a_rotation_that_lost_a_race_changes_nothing(store: SqlStore) -> None:
    app, old = add_app(store)
    seen = frozenset({old.secret_id})
    store.rotate_secret(make_secret(app), NOW, NOW, seen)
    loser = make_secret(app)
    with pytest.raises(Conflict, match="changed during the rotation"):
        store.rotate_secret(loser, NOW, NOW, seen)
    assert loser.secret_id not in {s.secret_id for s in store.list_secrets(app.client_id)}


def test_racing_rotations_one_wins(store: SqlStore) -> None:
    app, old = add_app(store)
    seen = frozenset({old.secret_id})
    barrier = threading.Barrier(4)
    outcomes: list[str] = []

    def rotate() -> None:
        barrier.wait()
        try:
            store.rotate_secret(make_secret(app), NOW, NOW, seen)
            outcomes.append("won")
        except Conflict:
            outcomes.append("conflict")

    threads = [threading.Thread(target=rotate) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["conflict"] * 3 + ["won"]
    assert len(store.list_secrets(app.client_id)) == 2


def test_revoke_and_unknown_secrets(store: SqlStore) -> None:
    app, old = add_app(store)
    with pytest.raises(NotFound):
        store.revoke_secret(app.client_id, "sec_missing", NOW)
    with pytest.raises(NotFound):
        store.rotate_secret(make_secret(make_app()), NOW, NOW, frozenset())
    store.revoke_secret(app.client_id, old.secret_id, NOW)
    assert store.get_credentials(app.client_id, NOW).secrets == ()  # type: ignore[union-attr]
    with pytest.raises(NotFound):  # not live any more
        store.revoke_secret(app.client_id, old.secret_id, NOW)


def test_secret_use_is_recorded_as_the_latest(store: SqlStore) -> None:
    app, secret = add_app(store)
    store.record_secret_use({secret.secret_id: NOW + 5})
    store.record_secret_use({secret.secret_id: NOW + 3})
    assert store.list_secrets(app.client_id)[0].last_used_at == NOW + 5


def test_all_credentials_holds_every_app_with_live_secrets(store: SqlStore) -> None:
    first, first_secret = add_app(store, "One")
    second, second_secret = add_app(store, "Two")
    store.rotate_secret(make_secret(second), NOW, NOW, frozenset({second_secret.secret_id}))
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


def test_customer_members_are_each_apps_sorted_keys(store: SqlStore) -> None:
    """What every worker's customer directory is loaded from: per app, its customer ids as
    16-byte keys in byte order, in one bytes."""
    app, _ = add_app(store, "One")
    other, _ = add_app(store, "Two")
    add_app(store, "No customers")
    ids = {app.client_id: [str(uuid.uuid4()) for _ in range(40)], other.client_id: []}
    ids[other.client_id] = [str(uuid.uuid4())]
    for client_id, customer_ids in ids.items():
        for n, customer_id in enumerate(customer_ids):
            store.create_customer(Customer(customer_id, client_id, f"u-{n}", NOW))
    members = dict(store.customer_members())
    assert set(members) == set(ids)
    for client_id, customer_ids in ids.items():
        assert members[client_id] == b"".join(sorted(uuid.UUID(c).bytes for c in customer_ids))


def test_customers_are_read_in_batches_and_deleted(store: SqlStore) -> None:
    app, _ = add_app(store, "One")
    other, _ = add_app(store, "Two")
    mine = [Customer(str(uuid.uuid4()), app.client_id, f"u-{n}", NOW) for n in range(3)]
    for customer in mine:
        store.create_customer(customer)
    asked = [mine[0].customer_id, mine[2].customer_id, str(uuid.uuid4())]
    assert sorted(store.get_customers(asked), key=lambda c: c.app_user_id) == [mine[0], mine[2]]
    before = store.latest_change_id()
    with pytest.raises(NotFound):
        store.delete_customer(other.client_id, mine[0].customer_id)
    store.delete_customer(app.client_id, mine[0].customer_id)
    assert store.get_customer(mine[0].customer_id) is None
    changes = store.changes_since(before)
    assert [(c.kind, c.entity_id) for c in changes] == [("customer", mine[0].customer_id)]
    with pytest.raises(NotFound):
        store.delete_customer(app.client_id, mine[0].customer_id)


def test_first_key_is_stored_once(store: SqlStore, cipher: KeyCipher) -> None:
    first = new_stored_key("ES256", cipher, NOW)
    assert store.ensure_signing_key(first) is True
    assert store.ensure_signing_key(new_stored_key("ES256", cipher, NOW)) is False
    assert store.list_keys() == [first]


def test_rotation_adds_a_key_and_keeps_the_old(store: SqlStore, cipher: KeyCipher) -> None:
    first = new_stored_key("ES256", cipher, NOW)
    store.ensure_signing_key(first)
    second = new_stored_key("EdDSA", cipher, NOW + 60, activates_at=NOW + 660)
    assert store.rotate_key(second, NOW + 60) == second
    assert {k.kid: k for k in store.list_keys()} == {first.kid: first, second.kid: second}
    assert cipher.decrypt(second.kid, second.encrypted_private_key) is not None


def test_a_newer_rotation_replaces_a_key_still_waiting(store: SqlStore, cipher: KeyCipher) -> None:
    first = new_stored_key("ES256", cipher, NOW)
    store.ensure_signing_key(first)
    waiting = new_stored_key("ES256", cipher, NOW + 60, activates_at=NOW + 660)
    store.rotate_key(waiting, NOW + 60)
    urgent = new_stored_key("ES256", cipher, NOW + 120, activates_at=NOW + 120)
    store.rotate_key(urgent, NOW + 120)
    assert {k.kid for k in store.list_keys()} == {first.kid, urgent.kid}


def test_a_rotation_never_ties_with_the_active_key(store: SqlStore, cipher: KeyCipher) -> None:
    first = new_stored_key("ES256", cipher, NOW)
    store.ensure_signing_key(first)
    stored = store.rotate_key(new_stored_key("ES256", cipher, NOW), NOW)
    assert stored is not None
    assert stored.activates_at == NOW + 1


def test_due_rotation_happens_once(store: SqlStore, cipher: KeyCipher) -> None:
    store.ensure_signing_key(new_stored_key("ES256", cipher, NOW))
    due_before = NOW + 100
    first = new_stored_key("ES256", cipher, NOW + 200)
    second = new_stored_key("ES256", cipher, NOW + 200)
    assert store.rotate_key(first, NOW + 200, created_before=due_before) == first
    assert store.rotate_key(second, NOW + 200, created_before=due_before) is None
    assert len(store.list_keys()) == 2


def test_concurrent_first_starts_make_one_key(store: SqlStore, cipher: KeyCipher) -> None:
    candidates: list[StoredKey] = [new_stored_key("ES256", cipher, NOW) for _ in range(6)]
    barrier = threading.Barrier(len(candidates))
    results: list[bool] = []

    def start(candidate: StoredKey) -> None:
        barrier.wait()
        results.append(store.ensure_signing_key(candidate))

    threads = [threading.Thread(target=start, args=(c,)) for c in candidates]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == [False] * 5 + [True]
    assert len(store.list_keys()) == 1


def test_change_feed_names_every_write_in_order(store: SqlStore, cipher: KeyCipher) -> None:
    start = store.latest_change_id()
    app, _ = add_app(store)
    store.update_app(app.client_id, enabled=False)
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


def test_audit_events_round_trip(store: SqlStore) -> None:
    events = [
        AuditEvent(NOW * 1000 + i, "token", "issued", "app-a", "127.0.0.1", {"jti": f"j{i}"})
        for i in range(3)
    ] + [AuditEvent(NOW * 1000 + 5, "admin", "app.create", "app-b", "cli", None)]
    store.add_audit_events(events)
    listed = store.list_audit_events()
    assert [(e.at_ms, e.kind, e.outcome, e.client_id, e.source, e.detail) for e in listed] == [
        tuple(e[:6]) for e in events
    ]
    assert [e.detail for e in store.list_audit_events("app-a")] == [
        {"jti": "j0"},
        {"jti": "j1"},
        {"jti": "j2"},
    ]
    assert [e.at_ms for e in store.list_audit_events(since_ms=NOW * 1000 + 2)] == [
        NOW * 1000 + 2,
        NOW * 1000 + 5,
    ]
    assert [e.at_ms for e in store.list_audit_events(limit=2)] == [NOW * 1000 + 2, NOW * 1000 + 5]


def test_revoked_tokens(store: SqlStore) -> None:
    live = RevokedToken("jti-live", "app-a", NOW + 100, NOW)
    assert store.revoke_token(live) is True
    assert store.revoke_token(live) is False
    assert store.get_revoked("jti-live") == live
    assert store.get_revoked("jti-unknown") is None
    store.revoke_token(RevokedToken("jti-old", "app-a", NOW + 10, NOW))
    assert {r.jti for r in store.list_revoked(NOW + 50)} == {"jti-live"}


def test_usage_adds_up_and_keeps_only_named_windows(store: SqlStore) -> None:
    store.add_usage({("app-a", "h:2027011500"): 3, ("app-a", "d:20270115"): 3}, ["h:2027011500"])
    store.add_usage({("app-a", "h:2027011500"): 2, ("app-b", "h:2027011500"): 1}, ["h:2027011500"])
    assert store.usage(["h:2027011500", "d:20270115"]) == {
        ("app-a", "h:2027011500"): 5,
        ("app-b", "h:2027011500"): 1,
    }
    assert store.usage(["h:2027011500"], "app-b") == {("app-b", "h:2027011500"): 1}


def test_old_audit_events_are_pruned(store: SqlStore) -> None:
    store.add_audit_events(
        [AuditEvent(at, "token", "issued", "app-a", "127.0.0.1", None) for at in (10, 20, 30)]
    )
    assert store.prune_audit_events(25) == 2
    assert [e.at_ms for e in store.list_audit_events()] == [30]


def test_find_customer_by_app_user_id(store: SqlStore) -> None:
    app, _ = add_app(store, "One")
    other, _ = add_app(store, "Two")
    mine = Customer(str(uuid.uuid4()), app.client_id, "user-1", NOW)
    theirs = Customer(str(uuid.uuid4()), other.client_id, "user-1", NOW)
    store.create_customer(mine)
    store.create_customer(theirs)
    assert store.find_customer(app.client_id, "user-1") == mine
    assert store.find_customer(other.client_id, "user-1") == theirs
    # Exact: neither another case nor another app's id matches.
    assert store.find_customer(app.client_id, "USER-1") is None
    assert store.find_customer(app.client_id, "user-2") is None
    assert store.find_customer(str(uuid.uuid4()), "user-1") is None


def test_update_app_name_and_scopes(store: SqlStore) -> None:
    app, _ = add_app(store)
    before = store.latest_change_id()
    updated = store.update_app(app.client_id, name="Renamed", scopes=frozenset({"customer"}))
    assert updated.name == "Renamed"
    assert updated.scopes == frozenset({"customer"})
    assert store.get_app(app.client_id) == updated
    assert store.update_app(app.client_id, token_ttl=900).scopes == frozenset({"customer"})
    assert [(c.kind, c.entity_id) for c in store.changes_since(before)] == [
        ("app", app.client_id),
        ("app", app.client_id),
    ]


def test_delete_app_takes_its_rows_and_leaves_its_audit_trail(store: SqlStore) -> None:
    app, first = add_app(store, "Doomed")
    kept, kept_secret = add_app(store, "Kept")
    store.rotate_secret(make_secret(app), NOW, NOW + 60, frozenset({first.secret_id}))
    for client_id in (app.client_id, kept.client_id):
        store.create_customer(Customer(str(uuid.uuid4()), client_id, "user-1", NOW))
        store.revoke_token(RevokedToken(f"jti-{client_id}", client_id, NOW + 100, NOW))
        store.add_usage({(client_id, "h:2027011500"): 2}, ["h:2027011500"])
        store.add_audit_events([AuditEvent(NOW * 1000, "admin", "app.create", client_id)])
    before = store.latest_change_id()

    removed = store.delete_app(app.client_id)

    assert removed == {"secrets": 2, "customers": 1, "revocations": 1, "usage_windows": 1}
    assert store.get_app(app.client_id) is None
    assert store.get_credentials(app.client_id, NOW) is None
    assert store.list_secrets(app.client_id) == []
    assert store.list_customers(app.client_id) == []
    assert store.find_customer(app.client_id, "user-1") is None
    assert store.get_revoked(f"jti-{app.client_id}") is None
    assert store.usage(["h:2027011500"], app.client_id) == {}
    # The audit trail keeps history.
    assert [e.outcome for e in store.list_audit_events(app.client_id)] == ["app.create"]
    # One change: every node drops the app.
    assert [(c.kind, c.entity_id) for c in store.changes_since(before)] == [("app", app.client_id)]
    # The other app is untouched.
    assert [a.client_id for a in store.list_apps()] == [kept.client_id]
    assert store.list_secrets(kept.client_id) == [kept_secret]
    assert store.find_customer(kept.client_id, "user-1") is not None
    assert store.get_revoked(f"jti-{kept.client_id}") is not None
    assert store.usage(["h:2027011500"], kept.client_id) == {(kept.client_id, "h:2027011500"): 2}
    assert dict(store.customer_members()).keys() == {kept.client_id}
    with pytest.raises(NotFound):
        store.delete_app(app.client_id)
    assert len(store.changes_since(before)) == 1
