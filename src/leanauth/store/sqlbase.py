"""What every part of the SQLAlchemy store shares: the engine, transactions with one error
mapping, schema migrations and the change feed that keeps other processes' caches fresh."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from sqlalchemy import Connection, Engine, func, insert, select, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DataError, IntegrityError, SQLAlchemyError

from leanauth import metrics
from leanauth.store import migrate, schema
from leanauth.store.base import (
    CHANGE_RETENTION,
    NOTIFY_CHANNEL,
    ChangePublisher,
    RejectedRecords,
    StoreError,
)
from leanauth.store.engine import EngineOptions, engine_for
from leanauth.store.models import Change, ChangeKind

PENDING_CHANGES = "leanauth_pending_changes"
CHANGE_FEED_LOCK_KEY = 0x6C61636866656564  # "lachfeed"

# The transaction of the :meth:`SqlBase.atomic` block running in this thread (or task), with
# the engine it belongs to: the store's calls made in the block run in it.
_ATOMIC: ContextVar[tuple[Engine, Connection] | None] = ContextVar("leanauth_atomic", default=None)


def first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


class SqlBase:
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
            raise StoreError(first_line(exc)) from exc

    def schema_revision(self) -> str | None:
        try:
            return migrate.current_revision(self.engine)
        except SQLAlchemyError as exc:
            raise StoreError(first_line(exc)) from exc

    def close(self) -> None:
        self.engine.dispose()
        if self._publish is not None:
            self._publish.close()

    @contextmanager
    def atomic(self) -> Iterator[None]:
        """The store calls made in the block, in this thread or task, share one transaction:
        they commit together when the block ends, or none does when it raises (an admin
        change and its audit record, say). A block inside another joins it."""
        if self._joined() is not None:
            yield
            return
        try:
            with self._transaction() as conn:
                token = _ATOMIC.set((self.engine, conn))
                try:
                    yield
                finally:
                    _ATOMIC.reset(token)
        except IntegrityError as exc:
            # Each call names the refusals it expects; one that reaches here was not expected.
            raise RejectedRecords(first_line(exc)) from exc

    def _joined(self) -> Connection | None:
        """The connection of the :meth:`atomic` block running here, if any."""
        current = _ATOMIC.get()
        return current[1] if current is not None and current[0] is self.engine else None

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        joined = self._joined()
        if joined is not None:
            # Inside atomic(): it sees the block's own writes; the block maps the errors.
            yield joined
            return
        try:
            with self.engine.connect() as conn:
                yield conn
        except SQLAlchemyError as exc:
            metrics.STORE_ERRORS.inc("read")
            raise StoreError(first_line(exc)) from exc

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        """One transaction (or the enclosing :meth:`atomic` block's); IntegrityError passes
        through for the caller to name."""
        joined = self._joined()
        if joined is not None:
            yield joined
            return
        with self._transaction() as conn:
            yield conn

    @contextmanager
    def _transaction(self) -> Iterator[Connection]:
        """Begin, commit, map the errors; publish the kinds of change once committed."""
        kinds: list[str] = []
        try:
            with self.engine.begin() as conn:
                conn.info[PENDING_CHANGES] = kinds
                try:
                    yield conn
                finally:
                    # A connection invalidated mid-transaction (the database went away) has
                    # no info left to clean, and asking would hide the real error.
                    if not conn.invalidated:
                        conn.info.pop(PENDING_CHANGES, None)
        except IntegrityError:
            raise
        except DataError as exc:
            raise RejectedRecords(first_line(exc)) from exc
        except SQLAlchemyError as exc:
            metrics.STORE_ERRORS.inc("write")
            raise StoreError(first_line(exc)) from exc
        if self._publish is not None:
            for kind in dict.fromkeys(kinds):
                self._publish(kind)

    @staticmethod
    def _upsert(conn: Connection, table: Any) -> postgresql.Insert | sqlite.Insert:
        """An INSERT that can take ON CONFLICT clauses, in the connection's dialect."""
        if conn.dialect.name == "postgresql":
            return postgresql.insert(table)
        return sqlite.insert(table)

    @staticmethod
    def _lock_row(conn: Connection, table: Any, column: Any, value: str) -> bool:
        """Lock one row for the rest of the transaction (a no-op update takes the row lock on
        PostgreSQL and the write lock on SQLite); False when the row does not exist."""
        return (
            conn.execute(table.update().where(column == value).values({column: value})).rowcount > 0
        )

    @staticmethod
    def _lock_change_feed(conn: Connection) -> None:
        """Readers follow the feed by change_id: this lock, held to the end of the
        transaction, makes ids commit in order, so a reader never sees id n+1 before id n is
        visible. (SQLite serialises writers anyway.)"""
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": CHANGE_FEED_LOCK_KEY})

    @classmethod
    def _record_change(cls, conn: Connection, kind: ChangeKind, entity_id: str) -> None:
        now = int(time.time())
        cls._lock_change_feed(conn)
        if conn.dialect.name == "postgresql":
            # NOTIFY is sent on commit.
            conn.execute(
                text("SELECT pg_notify(:channel, :kind)"), {"channel": NOTIFY_CHANNEL, "kind": kind}
            )
        conn.execute(insert(schema.changes).values(kind=kind, entity_id=entity_id, created_at=now))
        conn.info[PENDING_CHANGES].append(kind)
        conn.execute(
            schema.changes.delete().where(schema.changes.c.created_at < now - CHANGE_RETENTION)
        )

    def database_time(self) -> float | None:
        """PostgreSQL's clock (``clock_timestamp()``, not the transaction's start). SQLite has
        none of its own: it is a file read by this process, with this node's clock."""
        if self.engine.dialect.name != "postgresql":
            return None
        with self._read() as conn:
            now = conn.execute(text("SELECT extract(epoch FROM clock_timestamp())")).scalar_one()
        return float(now)

    def latest_change_id(self) -> int:
        with self._read() as conn:
            latest = select(func.coalesce(func.max(schema.changes.c.change_id), 0))
            return int(conn.execute(latest).scalar_one())

    def changes_since(self, change_id: int) -> Sequence[Change]:
        c = schema.changes.c
        with self._read() as conn:
            rows = conn.execute(
                select(schema.changes).where(c.change_id > change_id).order_by(c.change_id)
            )
            return [Change(r.change_id, r.kind, r.entity_id) for r in rows]
