"""The SQLAlchemy store: SQLite (the embedded default) and PostgreSQL share this code.

:class:`SqlStore` is the registry (apps, secrets, customers, signing keys) here, plus the
records of :mod:`leanauth.store.records` (revocations, usage, audit).
"""

from __future__ import annotations

import time
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import replace
from itertools import groupby
from operator import itemgetter
from typing import Any, Unpack

import orjson
from sqlalchemy import Connection, func, insert, select, tuple_, update
from sqlalchemy.exc import IntegrityError

from leanauth.keys import schedule
from leanauth.scopes import SCOPE_CLASSES, ScopeClass
from leanauth.store import schema
from leanauth.store.base import AlreadyExists, AppChanges, Conflict, NotFound
from leanauth.store.models import App, ClientSecret, Credentials, Customer, StoredKey
from leanauth.store.records import SqlRecords
from leanauth.store.sqlbase import CHANGE_FEED_LOCK_KEY, SqlBase

__all__ = ["CHANGE_FEED_LOCK_KEY", "SqlStore"]

MAX_LIVE_SECRETS = 2
# A secret issued this recently is not replaced by another rotation: two rotations started
# together would otherwise each end the secret the other just printed.
ROTATION_RACE_WINDOW = 2


# The rows naming an app that go with it (``delete_app``), children before the app itself.
_APP_ROWS = (
    ("secrets", schema.client_secrets),
    ("customers", schema.customers),
    ("revocations", schema.revoked_tokens),
    ("usage_windows", schema.app_usage),
)


def _scopes_text(scopes: frozenset[ScopeClass]) -> str:
    return ",".join(s for s in SCOPE_CLASSES if s in scopes)


def _scopes_set(text: str) -> frozenset[ScopeClass]:
    names = set(text.split(","))
    return frozenset(s for s in SCOPE_CLASSES if s in names)


def _app(row: Any) -> App:
    return App(
        client_id=row.client_id,
        name=row.name,
        scopes=_scopes_set(row.scopes),
        token_ttl=row.token_ttl,
        enabled=bool(row.enabled),
        created_at=row.created_at,
        introspect=bool(row.introspect),
        quota_hourly=row.quota_hourly,
        quota_daily=row.quota_daily,
        tokens_not_before=row.tokens_not_before,
    )


def _secret(row: Any) -> ClientSecret:
    return ClientSecret(
        secret_id=row.secret_id,
        client_id=row.client_id,
        secret_hash=bytes(row.secret_hash),
        created_at=row.created_at,
        expires_at=row.expires_at,
        last_used_at=row.last_used_at,
    )


def _customer(row: Any) -> Customer:
    return Customer(row.customer_id, row.client_id, row.app_user_id, row.created_at)


def _key(row: Any) -> StoredKey:
    return StoredKey(
        kid=row.kid,
        alg=row.alg,
        encrypted_private_key=bytes(row.encrypted_private_key),
        public_jwk=orjson.loads(row.public_jwk),
        created_at=row.created_at,
        activates_at=row.activates_at,
        revoked_at=row.revoked_at,
    )


def _live(now: int) -> Any:
    c = schema.client_secrets.c
    return c.expires_at.is_(None) | (c.expires_at > now)


MEMBERS_QUERY = (
    "SELECT client_id, string_agg(decode(replace(customer_id, '-', ''), 'hex'), ''::bytea"
    ' ORDER BY customer_id COLLATE "C") FROM customers GROUP BY client_id'
)


def _postgres_members(conn: Connection) -> Iterator[tuple[str, bytes]]:
    """Each app's keys, joined by PostgreSQL, streamed a few apps at a time in binary: a
    million customers are 16 MB that never sit in memory twice (hex text would double it)."""
    driver = conn.connection.driver_connection
    assert driver is not None
    with driver.cursor(name="leanauth_members", binary=True) as cursor:
        cursor.itersize = 20
        cursor.execute(MEMBERS_QUERY)
        yield from cursor


def _sqlite_members(conn: Connection) -> Iterator[tuple[str, bytes]]:
    """Each app's keys from rows read in index order, grouped and decoded by C code
    (groupby, join, fromhex) on the driver's own cursor: a million customers of 10,000 apps
    load in 1.3-1.9 s, where SQLAlchemy's rows and a loop in Python took 2.4-3 s (measured)."""
    driver = conn.connection.driver_connection
    assert driver is not None
    # The driver's own cursor: SQLAlchemy's rows cost more than the read itself here.
    rows = driver.cursor()
    rows.execute("SELECT client_id, customer_id FROM customers ORDER BY client_id, customer_id")
    current: str | None = None
    keys = bytearray()
    # A batch at a time: a million id strings held at once would cost ~100 MB of a worker's
    # memory for good (the allocator keeps it), for 16 MB of keys.
    while batch := rows.fetchmany(20_000):
        for client_id, group in groupby(batch, key=itemgetter(0)):
            if client_id != current:
                if current is not None:
                    yield current, bytes(keys)
                current, keys = client_id, bytearray()
            keys += bytes.fromhex("".join(map(itemgetter(1), group)).replace("-", ""))
    if current is not None:
        yield current, bytes(keys)


class SqlRegistry(SqlBase):
    # Apps

    def create_app(self, app: App, secret: ClientSecret) -> None:
        """The app and its first secret: one transaction."""
        try:
            with self._write() as conn:
                conn.execute(
                    insert(schema.apps).values(
                        client_id=app.client_id,
                        name=app.name,
                        scopes=_scopes_text(app.scopes),
                        token_ttl=app.token_ttl,
                        enabled=app.enabled,
                        created_at=app.created_at,
                        introspect=app.introspect,
                        quota_hourly=app.quota_hourly,
                        quota_daily=app.quota_daily,
                    )
                )
                self._insert_secret(conn, secret)
                self._record_change(conn, "app", app.client_id)
        except IntegrityError as exc:
            raise AlreadyExists(f"app {app.client_id} or its secret id exists already") from exc

    def get_app(self, client_id: str) -> App | None:
        with self._read() as conn:
            return self._app_in(conn, client_id)

    @staticmethod
    def _app_in(conn: Connection, client_id: str) -> App | None:
        row = conn.execute(select(schema.apps).where(schema.apps.c.client_id == client_id)).first()
        return _app(row) if row else None

    def list_apps(self) -> Sequence[App]:
        order = (schema.apps.c.created_at, schema.apps.c.name)
        with self._read() as conn:
            return [_app(r) for r in conn.execute(select(schema.apps).order_by(*order))]

    def update_app(self, client_id: str, **changes: Unpack[AppChanges]) -> App:
        values: dict[str, object] = dict(changes)
        if "scopes" in changes:
            values["scopes"] = _scopes_text(changes["scopes"])
        with self._write() as conn:
            done = conn.execute(
                update(schema.apps).where(schema.apps.c.client_id == client_id).values(values)
            )
            if done.rowcount == 0:
                raise NotFound(f"no app {client_id}")
            self._record_change(conn, "app", client_id)
            app = self._app_in(conn, client_id)
        assert app is not None
        return app

    def delete_app(self, client_id: str) -> dict[str, int]:
        """The app and every row that names it, in one transaction; not its audit records
        (the trail keeps history) nor its change rows (other nodes must still read them)."""
        with self._write() as conn:
            if not self._lock_app_for_delete(conn, client_id):
                raise NotFound(f"no app {client_id}")
            removed: dict[str, int] = {}
            for name, table in _APP_ROWS:
                done = conn.execute(table.delete().where(table.c.client_id == client_id))
                removed[name] = int(done.rowcount)
            conn.execute(schema.apps.delete().where(schema.apps.c.client_id == client_id))
            # One change for the app: each node drops it, and with it every way its customers
            # could get a token (they are named by the app's own credentials).
            self._record_change(conn, "app", client_id)
        return removed

    @classmethod
    def _lock_app_for_delete(cls, conn: Connection, client_id: str) -> bool:
        """Lock the app's row against new rows naming it; False when there is none. On
        PostgreSQL FOR UPDATE, which (unlike the no-op update of ``_lock_row``) makes a
        customer being inserted meanwhile wait for this delete, then fail on its foreign
        key, instead of this delete failing on it. SQLite serialises writers anyway."""
        apps = schema.apps
        if conn.dialect.name != "postgresql":
            return cls._lock_row(conn, apps, apps.c.client_id, client_id)
        query = select(apps.c.client_id).where(apps.c.client_id == client_id).with_for_update()
        return conn.execute(query).first() is not None

    # Secrets

    @staticmethod
    def _insert_secret(conn: Connection, secret: ClientSecret) -> None:
        conn.execute(
            insert(schema.client_secrets).values(
                secret_id=secret.secret_id,
                client_id=secret.client_id,
                secret_hash=secret.secret_hash,
                created_at=secret.created_at,
                expires_at=secret.expires_at,
            )
        )

    def rotate_secret(
        self,
        secret: ClientSecret,
        now: int,
        old_expires_at: int,
        expected_live: frozenset[str],
    ) -> None:
        """Add ``secret``; the app's live secrets end at ``old_expires_at`` at the latest.

        ``expected_live`` is the set of live secret ids the caller saw: if another rotation
        changed it meanwhile, this one fails with :class:`Conflict` and changes nothing, so
        no freshly shown secret is silently replaced.
        """
        c = schema.client_secrets.c
        with self._write() as conn:
            if not self._lock_row(conn, schema.apps, schema.apps.c.client_id, secret.client_id):
                raise NotFound(f"no app {secret.client_id}")
            live_query = select(c.secret_id, c.expires_at).where(
                c.client_id == secret.client_id, _live(now)
            )
            live = {row.secret_id: row.expires_at for row in conn.execute(live_query)}
            if frozenset(live) != expected_live:
                raise Conflict("the app's secrets changed during the rotation; run it again")
            if len(live) >= MAX_LIVE_SECRETS:
                raise Conflict(
                    f"the app has {len(live)} live secrets already: "
                    "revoke one first (apps revoke-secret)"
                )
            if self._rotated_a_moment_ago(conn, secret.client_id, now):
                raise Conflict(
                    "another rotation issued a secret for this app a moment ago: "
                    "check `apps show`, then run it again if it is still needed"
                )
            for secret_id, expires_at in live.items():
                ends = old_expires_at if expires_at is None else min(expires_at, old_expires_at)
                conn.execute(
                    update(schema.client_secrets)
                    .where(c.secret_id == secret_id)
                    .values(expires_at=ends)
                )
            self._insert_secret(conn, secret)
            self._record_change(conn, "app", secret.client_id)

    @staticmethod
    def _rotated_a_moment_ago(conn: Connection, client_id: str, now: int) -> bool:
        """Whether a rotation (not the app's creation) issued a secret in the race window."""
        c = schema.client_secrets.c
        issued = select(func.count(), func.max(c.created_at)).where(c.client_id == client_id)
        count, newest = conn.execute(issued).one()
        return bool(count > 1 and newest is not None and newest > now - ROTATION_RACE_WINDOW)

    def revoke_secret(self, client_id: str, secret_id: str, now: int) -> None:
        """End one secret now (it may already be in its grace period)."""
        c = schema.client_secrets.c
        with self._write() as conn:
            done = conn.execute(
                update(schema.client_secrets)
                .where(c.client_id == client_id, c.secret_id == secret_id, _live(now))
                .values(expires_at=now)
            )
            if done.rowcount == 0:
                raise NotFound(f"app {client_id} has no live secret {secret_id}")
            self._record_change(conn, "app", client_id)

    def record_secret_use(self, last_used: Mapping[str, int]) -> None:
        """Batch of secret id → last use time, written off the hot path."""
        if not last_used:
            return
        c = schema.client_secrets.c
        with self._write() as conn:
            for secret_id, used_at in sorted(last_used.items()):
                conn.execute(
                    update(schema.client_secrets)
                    .where(c.secret_id == secret_id)
                    .where(c.last_used_at.is_(None) | (c.last_used_at < used_at))
                    .values(last_used_at=used_at)
                )

    def list_secrets(self, client_id: str) -> Sequence[ClientSecret]:
        c = schema.client_secrets.c
        query = select(schema.client_secrets).where(c.client_id == client_id)
        with self._read() as conn:
            return [_secret(r) for r in conn.execute(query.order_by(c.created_at, c.secret_id))]

    def get_credentials(self, client_id: str, now: int) -> Credentials | None:
        c = schema.client_secrets.c
        with self._read() as conn:
            app = self._app_in(conn, client_id)
            if app is None:
                return None
            rows = conn.execute(select(schema.client_secrets).where(c.client_id == client_id))
            live = tuple(s for s in map(_secret, rows) if s.live_at(now))
        return Credentials(app, live)

    def all_credentials(self, now: int) -> Sequence[Credentials]:
        with self._read() as conn:
            apps = [_app(r) for r in conn.execute(select(schema.apps))]
            by_app: dict[str, list[ClientSecret]] = {}
            for row in conn.execute(select(schema.client_secrets).where(_live(now))):
                secret = _secret(row)
                by_app.setdefault(secret.client_id, []).append(secret)
        return [Credentials(app, tuple(by_app.get(app.client_id, ()))) for app in apps]

    # Customers

    def create_customer(self, customer: Customer) -> None:
        try:
            with self._write() as conn:
                if self._app_in(conn, customer.client_id) is None:
                    raise NotFound(f"no app {customer.client_id}")
                conn.execute(
                    insert(schema.customers).values(
                        customer_id=customer.customer_id,
                        client_id=customer.client_id,
                        app_user_id=customer.app_user_id,
                        created_at=customer.created_at,
                    )
                )
                self._record_change(conn, "customer", customer.customer_id)
        except IntegrityError as exc:
            raise AlreadyExists(f"app_user_id {customer.app_user_id!r} already exists") from exc

    def get_customer(self, customer_id: str) -> Customer | None:
        c = schema.customers.c
        with self._read() as conn:
            row = conn.execute(select(schema.customers).where(c.customer_id == customer_id)).first()
        return _customer(row) if row else None

    def get_customers(self, customer_ids: Collection[str]) -> Sequence[Customer]:
        """The customers among ``customer_ids`` that exist (the change feed's batches)."""
        c = schema.customers.c
        found: list[Customer] = []
        ids = sorted(customer_ids)
        with self._read() as conn:
            for start in range(0, len(ids), 500):
                query = select(schema.customers).where(c.customer_id.in_(ids[start : start + 500]))
                found += [_customer(r) for r in conn.execute(query)]
        return found

    def find_customer(self, client_id: str, app_user_id: str) -> Customer | None:
        c = schema.customers.c
        query = select(schema.customers).where(
            c.client_id == client_id, c.app_user_id == app_user_id
        )
        with self._read() as conn:
            row = conn.execute(query).first()
        return _customer(row) if row else None

    def delete_customer(self, client_id: str, customer_id: str) -> None:
        c = schema.customers.c
        with self._write() as conn:
            done = conn.execute(
                schema.customers.delete().where(
                    c.client_id == client_id, c.customer_id == customer_id
                )
            )
            if done.rowcount == 0:
                raise NotFound(f"app {client_id} has no customer {customer_id}")
            self._record_change(conn, "customer", customer_id)

    def customer_members(self) -> Iterator[tuple[str, bytes]]:
        """Every app's customer ids as sorted 16-byte keys, one ``bytes`` an app (for the
        directory each worker holds). PostgreSQL joins them itself; SQLite's rows are joined
        here, read in index order a batch at a time."""
        with self._read() as conn:
            if conn.dialect.name == "postgresql":
                yield from _postgres_members(conn)
                return
            yield from _sqlite_members(conn)

    def list_customers(
        self, client_id: str, limit: int | None = None, after: str | None = None
    ) -> Sequence[Customer]:
        """An app's customers in creation order; ``after`` a customer id, for paging."""
        c = schema.customers.c
        query = select(schema.customers).where(c.client_id == client_id)
        if after is not None:
            anchor = select(c.created_at).where(c.customer_id == after).scalar_subquery()
            query = query.where(tuple_(c.created_at, c.customer_id) > tuple_(anchor, after))
        query = query.order_by(c.created_at, c.customer_id)
        if limit is not None:
            query = query.limit(limit)
        with self._read() as conn:
            return [_customer(r) for r in conn.execute(query)]

    # Signing keys

    def list_keys(self) -> Sequence[StoredKey]:
        with self._read() as conn:
            return [_key(r) for r in conn.execute(select(schema.signing_keys))]

    @staticmethod
    def _insert_key(conn: Connection, key: StoredKey) -> None:
        conn.execute(
            insert(schema.signing_keys).values(
                kid=key.kid,
                alg=key.alg,
                encrypted_private_key=key.encrypted_private_key,
                public_jwk=orjson.dumps(key.public_jwk).decode(),
                created_at=key.created_at,
                activates_at=key.activates_at,
            )
        )

    def ensure_signing_key(self, candidate: StoredKey) -> bool:
        """Store ``candidate`` unless a key exists; True if it was stored. Several processes
        starting at once on an empty database store exactly one."""
        keys = schema.signing_keys
        with self._write() as conn:
            self._lock_keys(conn)
            if conn.execute(select(func.count()).select_from(keys)).scalar_one():
                return False
            self._insert_key(conn, candidate)
            self._record_change(conn, "key", candidate.kid)
            return True

    def rotate_key(
        self,
        new_key: StoredKey,
        now: int,
        created_before: int | None = None,
        keep_within: int = 0,
        seen_waiting: frozenset[str] | None = None,
    ) -> StoredKey | None:
        """Add ``new_key`` (it signs from its ``activates_at``) in one transaction.

        Every kid a rotation printed goes on existing: a new key waits behind the keys already
        waiting (it activates strictly after every remaining key, so the order of keys never
        rests on a tie), whichever of several racing rotations commits first. An urgent key
        (activating within ``keep_within`` seconds of the clock read inside the transaction:
        ``keys rotate --immediately``) replaces the waiting keys, which signed nothing, if
        they are those the caller saw (``seen_waiting``); else it fails with
        :class:`Conflict` and changes nothing. A key activating within ``keep_within`` is
        never dropped: a node whose clock runs a little ahead may already sign with it. With
        ``created_before``, rotate only if no key is newer than that (automatic rotation: of
        several nodes due at once, one rotates). Returns the key as stored, or None when no
        rotation was due.
        """
        keys = schema.signing_keys
        with self._write() as conn:
            self._lock_keys(conn)
            # Every lock this transaction needs is taken before the clock is read, so what it
            # decides from the clock still holds when it commits.
            self._lock_change_feed(conn)
            if created_before is not None:
                newest = conn.execute(select(func.max(keys.c.created_at))).scalar_one()
                if newest is not None and newest >= created_before:
                    return None
            # The caller's clock was read before the key was made (RSA takes a while).
            now = max(now, int(time.time()))
            if new_key.activates_at <= now + keep_within:
                self._replace_waiting_keys(conn, now + keep_within, seen_waiting)
            latest = conn.execute(select(func.max(keys.c.activates_at))).scalar_one()
            if latest is not None and new_key.activates_at <= latest:
                new_key = replace(new_key, activates_at=latest + 1)
            self._insert_key(conn, new_key)
            self._record_change(conn, "key", new_key.kid)
            return new_key

    @staticmethod
    def _replace_waiting_keys(
        conn: Connection, after: int, seen_waiting: frozenset[str] | None
    ) -> None:
        """Drop the keys waiting to activate after ``after`` (they signed nothing) for an
        urgent key. One the caller did not see is another rotation's, committed meanwhile:
        its kid was printed and must go on existing, so this rotation fails instead."""
        keys = schema.signing_keys
        waiting = keys.c.activates_at > after
        if seen_waiting is not None:
            unseen = set(conn.execute(select(keys.c.kid).where(waiting)).scalars()) - seen_waiting
            if unseen:
                raise Conflict(
                    f"another rotation published key {min(unseen)} meanwhile; it stands "
                    "(see `leanauth keys list`) and this one changed nothing"
                )
        conn.execute(keys.delete().where(waiting))

    def revoke_key(
        self, kid: str, now: int, replacement: StoredKey
    ) -> tuple[StoredKey, StoredKey | None]:
        """Revoke key ``kid`` in one transaction: it leaves the JWKS and verifies nothing. If
        it was the key signing now, ``replacement`` is stored to sign from this moment, so
        there is never a moment without a usable signing key. Returns the revoked key and
        the replacement, if one was needed. Revoking a revoked key changes nothing."""
        keys = schema.signing_keys
        with self._write() as conn:
            self._lock_keys(conn)
            self._lock_change_feed(conn)
            now = max(now, int(time.time()))
            stored = {k.kid: k for k in map(_key, conn.execute(select(keys)))}
            if kid not in stored:
                raise NotFound(f"no signing key {kid}")
            if stored[kid].revoked:
                return stored[kid], None
            revoked = stored[kid] = replace(stored[kid], revoked_at=now)
            conn.execute(keys.update().where(keys.c.kid == kid).values(revoked_at=now))
            self._record_change(conn, "key", kid)
            signing = [p for p in schedule(stored.values()) if p.state(now) == "active"]
            if signing:
                return revoked, None
            replacement = replace(replacement, created_at=now, activates_at=now)
            self._insert_key(conn, replacement)
            self._record_change(conn, "key", replacement.kid)
            return revoked, replacement

    @staticmethod
    def _lock_keys(conn: Connection) -> None:
        """Serialise key changes across processes."""
        if conn.dialect.name == "sqlite":
            # Take SQLite's write lock now rather than at the first write.
            conn.exec_driver_sql("UPDATE signing_keys SET kid = kid WHERE 0")
        else:
            conn.exec_driver_sql("LOCK TABLE signing_keys IN SHARE ROW EXCLUSIVE MODE")


class SqlStore(SqlRegistry, SqlRecords):
    """:class:`leanauth.store.base.Store` on SQLAlchemy Core."""
