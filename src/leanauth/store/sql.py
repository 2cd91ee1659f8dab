"""The SQLAlchemy store: SQLite (the embedded default) and PostgreSQL share this code."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import Connection, Engine, create_engine, event, func, insert, select, text, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.pool import ConnectionPoolEntry

from leanauth.keys import StoredKey
from leanauth.scopes import SCOPE_CLASSES, ScopeClass
from leanauth.store import migrate, schema
from leanauth.store.base import AlreadyExists, ChangePublisher, NotFound, StoreError
from leanauth.store.models import App, Change, ChangeKind, ClientSecret, Credentials, Customer

# Change rows older than this are pruned: every process re-reads everything far more often.
CHANGE_RETENTION = 3600
NOTIFY_CHANNEL = "leanauth_changes"
PENDING_CHANGES = "leanauth_pending_changes"
CHANGE_FEED_LOCK_KEY = 0x6C61636866656564  # "lachfeed"


@dataclass(frozen=True)
class EngineOptions:
    pool_size: int = 5
    connect_timeout: float = 5.0
    statement_timeout: float = 5.0


def postgres_url(url: str) -> str:
    """Any spelling of a PostgreSQL URL, as SQLAlchemy's psycopg (3) dialect wants it."""
    if url.startswith("postgres://"):
        url = "postgresql://" + url.removeprefix("postgres://")
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    return url


def engine_for(url: str, options: EngineOptions | None = None) -> Engine:
    options = options or EngineOptions()
    if url.startswith("sqlite"):
        path = url.split(":///", 1)[1] if ":///" in url else ""
        if path and path != ":memory:":
            try:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreError(
                    f"cannot create the database's folder for {path}: {exc.strerror}"
                ) from None
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 10})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    statement_ms = int(options.statement_timeout * 1000)
    return create_engine(
        postgres_url(url),
        pool_size=options.pool_size,
        max_overflow=options.pool_size,
        pool_pre_ping=True,
        pool_timeout=options.connect_timeout,
        connect_args={
            "connect_timeout": max(1, round(options.connect_timeout)),
            "options": f"-c statement_timeout={statement_ms}",
            "application_name": "leanauth",
        },
    )


def _sqlite_pragmas(dbapi_connection: Any, _record: ConnectionPoolEntry) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets the server's readers run while the CLI writes; busy_timeout waits out locks.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


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
    )


def _secret(row: Any) -> ClientSecret:
    return ClientSecret(
        secret_id=row.secret_id,
        client_id=row.client_id,
        secret_hash=bytes(row.secret_hash),
        created_at=row.created_at,
        expires_at=row.expires_at,
    )


def _customer(row: Any) -> Customer:
    return Customer(row.customer_id, row.client_id, row.app_user_id, row.created_at)


def _key(row: Any) -> StoredKey:
    return StoredKey(
        kid=row.kid,
        alg=row.alg,
        state=row.state,
        encrypted_private_key=bytes(row.encrypted_private_key),
        public_jwk=orjson.loads(row.public_jwk),
        created_at=row.created_at,
        activated_at=row.activated_at,
        retired_at=row.retired_at,
    )


class SqlStore:
    """:class:`leanauth.store.base.Store` on SQLAlchemy Core."""

    def __init__(
        self,
        url: str,
        options: EngineOptions | None = None,
        publish: ChangePublisher | None = None,
    ) -> None:
        self.engine = engine_for(url, options)
        # Told the kind of each committed change (Redis pub/sub, when configured).
        self._publish = publish

    def upgrade_schema(self) -> None:
        try:
            migrate.upgrade(self.engine)
        except SQLAlchemyError as exc:
            raise StoreError(str(exc).splitlines()[0]) from exc

    def schema_revision(self) -> str | None:
        try:
            return migrate.current_revision(self.engine)
        except SQLAlchemyError as exc:
            raise StoreError(str(exc).splitlines()[0]) from exc

    def close(self) -> None:
        self.engine.dispose()
        if self._publish is not None:
            self._publish.close()

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        try:
            with self.engine.connect() as conn:
                yield conn
        except SQLAlchemyError as exc:
            raise StoreError(str(exc).splitlines()[0]) from exc

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        kinds: list[str] = []
        try:
            with self.engine.begin() as conn:
                conn.info[PENDING_CHANGES] = kinds
                try:
                    yield conn
                finally:
                    conn.info.pop(PENDING_CHANGES, None)
        except IntegrityError:
            raise
        except SQLAlchemyError as exc:
            raise StoreError(str(exc).splitlines()[0]) from exc
        if self._publish is not None:
            for kind in dict.fromkeys(kinds):
                self._publish(kind)

    @staticmethod
    def _record_change(conn: Connection, kind: ChangeKind, entity_id: str) -> None:
        now = int(time.time())
        if conn.dialect.name == "postgresql":
            # Readers follow the feed by change_id: the lock makes ids commit in order, so a
            # reader never sees id n+1 before id n is visible. NOTIFY is sent on commit.
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": CHANGE_FEED_LOCK_KEY})
            conn.execute(
                text("SELECT pg_notify(:channel, :kind)"), {"channel": NOTIFY_CHANNEL, "kind": kind}
            )
        conn.execute(insert(schema.changes).values(kind=kind, entity_id=entity_id, created_at=now))
        conn.info[PENDING_CHANGES].append(kind)
        conn.execute(
            schema.changes.delete().where(schema.changes.c.created_at < now - CHANGE_RETENTION)
        )

    # Apps and secrets

    def create_app(self, app: App, secret: ClientSecret) -> None:
        with self._write() as conn:
            conn.execute(
                insert(schema.apps).values(
                    client_id=app.client_id,
                    name=app.name,
                    scopes=_scopes_text(app.scopes),
                    token_ttl=app.token_ttl,
                    enabled=app.enabled,
                    created_at=app.created_at,
                )
            )
            self._insert_secret(conn, secret)
            self._record_change(conn, "app", app.client_id)

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

    def get_app(self, client_id: str) -> App | None:
        with self._read() as conn:
            row = conn.execute(
                select(schema.apps).where(schema.apps.c.client_id == client_id)
            ).first()
        return _app(row) if row else None

    def list_apps(self) -> Sequence[App]:
        with self._read() as conn:
            rows = conn.execute(
                select(schema.apps).order_by(schema.apps.c.created_at, schema.apps.c.name)
            )
            return [_app(r) for r in rows]

    def set_app_enabled(self, client_id: str, enabled: bool) -> App:
        with self._write() as conn:
            done = conn.execute(
                update(schema.apps)
                .where(schema.apps.c.client_id == client_id)
                .values(enabled=enabled)
            )
            if done.rowcount == 0:
                raise NotFound(f"no app {client_id}")
            self._record_change(conn, "app", client_id)
            row = conn.execute(
                select(schema.apps).where(schema.apps.c.client_id == client_id)
            ).one()
        return _app(row)

    def replace_secrets(self, client_id: str, secret: ClientSecret, now: int) -> None:
        secrets = schema.client_secrets.c
        with self._write() as conn:
            if (
                conn.execute(
                    select(schema.apps.c.client_id).where(schema.apps.c.client_id == client_id)
                ).first()
                is None
            ):
                raise NotFound(f"no app {client_id}")
            conn.execute(
                update(schema.client_secrets)
                .where(secrets.client_id == client_id)
                .where((secrets.expires_at.is_(None)) | (secrets.expires_at > now))
                .values(expires_at=now)
            )
            self._insert_secret(conn, secret)
            self._record_change(conn, "app", client_id)

    def list_secrets(self, client_id: str) -> Sequence[ClientSecret]:
        c = schema.client_secrets.c
        with self._read() as conn:
            rows = conn.execute(
                select(schema.client_secrets).where(c.client_id == client_id).order_by(c.created_at)
            )
            return [_secret(r) for r in rows]

    def get_credentials(self, client_id: str, now: int) -> Credentials | None:
        with self._read() as conn:
            row = conn.execute(
                select(schema.apps).where(schema.apps.c.client_id == client_id)
            ).first()
            if row is None:
                return None
            c = schema.client_secrets.c
            rows = conn.execute(select(schema.client_secrets).where(c.client_id == client_id))
            live = tuple(s for s in map(_secret, rows) if s.live_at(now))
        return Credentials(_app(row), live)

    def all_credentials(self, now: int) -> Sequence[Credentials]:
        with self._read() as conn:
            apps = [_app(r) for r in conn.execute(select(schema.apps))]
            by_app: dict[str, list[ClientSecret]] = {}
            for row in conn.execute(select(schema.client_secrets)):
                secret = _secret(row)
                if secret.live_at(now):
                    by_app.setdefault(secret.client_id, []).append(secret)
        return [Credentials(app, tuple(by_app.get(app.client_id, ()))) for app in apps]

    # Customers

    def create_customer(self, customer: Customer) -> None:
        try:
            with self._write() as conn:
                if (
                    conn.execute(
                        select(schema.apps.c.client_id).where(
                            schema.apps.c.client_id == customer.client_id
                        )
                    ).first()
                    is None
                ):
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
        with self._read() as conn:
            row = conn.execute(
                select(schema.customers).where(schema.customers.c.customer_id == customer_id)
            ).first()
        return _customer(row) if row else None

    def list_customers(self, client_id: str) -> Sequence[Customer]:
        c = schema.customers.c
        with self._read() as conn:
            rows = conn.execute(
                select(schema.customers)
                .where(c.client_id == client_id)
                .order_by(c.created_at, c.app_user_id)
            )
            return [_customer(r) for r in rows]

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
                state=key.state,
                encrypted_private_key=key.encrypted_private_key,
                public_jwk=orjson.dumps(key.public_jwk).decode(),
                created_at=key.created_at,
                activated_at=key.activated_at,
                retired_at=key.retired_at,
            )
        )

    def ensure_active_key(self, candidate: StoredKey) -> bool:
        keys = schema.signing_keys
        with self._write() as conn:
            self._lock_keys(conn)
            count = conn.execute(
                select(func.count()).select_from(keys).where(keys.c.state == "active")
            ).scalar_one()
            if count:
                return False
            self._insert_key(conn, candidate)
            self._record_change(conn, "key", candidate.kid)
            return True

    def rotate_key(self, new_key: StoredKey, now: int) -> None:
        keys = schema.signing_keys
        with self._write() as conn:
            self._lock_keys(conn)
            conn.execute(
                update(keys).where(keys.c.state == "active").values(state="retired", retired_at=now)
            )
            self._insert_key(conn, new_key)
            self._record_change(conn, "key", new_key.kid)

    def _lock_keys(self, conn: Connection) -> None:
        """Serialise key changes across processes (two first starts must not make two keys)."""
        if conn.dialect.name == "sqlite":
            # Take SQLite's write lock now rather than at the first write.
            conn.exec_driver_sql("UPDATE signing_keys SET kid = kid WHERE 0")
        else:
            conn.exec_driver_sql("LOCK TABLE signing_keys IN SHARE ROW EXCLUSIVE MODE")

    # Change feed

    def latest_change_id(self) -> int:
        with self._read() as conn:
            return int(
                conn.execute(
                    select(func.coalesce(func.max(schema.changes.c.change_id), 0))
                ).scalar_one()
            )

    def changes_since(self, change_id: int) -> Sequence[Change]:
        c = schema.changes.c
        with self._read() as conn:
            rows = conn.execute(
                select(schema.changes).where(c.change_id > change_id).order_by(c.change_id)
            )
            return [Change(r.change_id, r.kind, r.entity_id) for r in rows]
