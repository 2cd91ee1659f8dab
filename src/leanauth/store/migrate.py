"""Schema migrations (Alembic) for SQLite and PostgreSQL, applied once under a lock.

Only ``leanauth init`` and ``leanauth db upgrade`` migrate. Several nodes may run them at
once: the migration runs under a PostgreSQL advisory lock (or a file lock beside an SQLite
database), so exactly one applies it and the others find it done.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from sqlalchemy import Connection, Engine, inspect, text

from leanauth import __version__

# Alembic is imported where it is used: a server's workers never migrate, and it would cost
# each of them 12 MB (measured).
if TYPE_CHECKING:
    from alembic.config import Config

MIGRATIONS = Path(__file__).with_name("migrations")
VERSIONS = MIGRATIONS / "versions"
# An arbitrary, fixed key for pg_advisory_lock: "leanauth" in ASCII.
ADVISORY_LOCK_KEY = 0x6C65616E61757468


class SchemaOutdated(RuntimeError):
    """The database's schema is older than this code."""


class SchemaAhead(RuntimeError):
    """The database was migrated by a newer leanauth: its revision is unknown to this code.

    Nothing this code does can help (it would not know the tables), so no command runs on it:
    only a newer release, or a restored backup, can.
    """

    def __init__(self, revision: str) -> None:
        super().__init__(
            f"ahead: this is leanauth {__version__}, the database was upgraded by a newer "
            f"release (revision {revision})"
        )
        self.revision = revision


SchemaState = Literal["empty", "behind", "current", "ahead"]


def _config(connection: Connection | None = None) -> Config:
    from alembic.config import Config  # noqa: PLC0415 (see the imports)

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def known_revisions() -> frozenset[str]:
    """Every revision this code's migrations define (head and all before it).

    Each migration file is named after its revision, and revisions count up (revision
    "0004" is ``versions/0004_customer_directory.py``, down from "0003"), so the names say
    it: every command checks the schema, and reading Alembic's scripts would import Alembic
    for it (about 70 ms). tests/test_storage.py holds the two readings equal."""
    return frozenset(path.name.split("_", 1)[0] for path in VERSIONS.glob("[0-9]*_*.py"))


def head_revision() -> str:
    return max(known_revisions())


def schema_state(revision: str | None) -> SchemaState:
    """Where a database at ``revision`` stands against this code."""
    if revision is None:
        return "empty"
    if revision == head_revision():
        return "current"
    return "behind" if revision in known_revisions() else "ahead"


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at (Alembic's own table), or None for an empty one."""
    with engine.connect() as conn:
        if not inspect(conn).has_table("alembic_version"):
            return None
        revision = conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
        return None if revision is None else str(revision)


@contextmanager
def _migration_lock(engine: Engine) -> Iterator[Connection]:
    with engine.connect() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_lock(:key)"), {"key": ADVISORY_LOCK_KEY})
            conn.commit()
            try:
                yield conn
            finally:
                conn.rollback()
                conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": ADVISORY_LOCK_KEY})
                conn.commit()
            return
        database = engine.url.database
        if not database or database == ":memory:":
            yield conn
            return
        lock_path = Path(database).with_suffix(".migrate.lock")
        # For this user only, like the database beside it.
        fd = os.open(lock_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "a") as lock_file:
            fcntl.flock(lock_file, fcntl.LOCK_EX)
            try:
                yield conn
            finally:
                fcntl.flock(lock_file, fcntl.LOCK_UN)


def upgrade(engine: Engine) -> None:
    """Apply every pending migration (a no-op when the schema is current).

    Raises :class:`SchemaAhead` on a database a newer release migrated (Alembic would fail
    with a traceback). The revision is read under the lock, so a process never acts on a
    schema another one is migrating.
    """
    with _migration_lock(engine) as conn:
        from alembic import command  # noqa: PLC0415
        from alembic.runtime.migration import MigrationContext  # noqa: PLC0415

        current = MigrationContext.configure(conn).get_current_revision()
        if current is not None and schema_state(current) == "ahead":
            raise SchemaAhead(current)
        command.upgrade(_config(conn), "head")
        conn.commit()


def require_current(current: str | None) -> None:
    """Raise :class:`SchemaAhead` or :class:`SchemaOutdated` unless the schema revision
    ``current`` is this code's head."""
    head = head_revision()
    if current is not None and schema_state(current) == "ahead":
        raise SchemaAhead(current)
    if current != head:
        raise SchemaOutdated(
            f"the database schema is at revision {current or 'none'} but this leanauth needs "
            f"{head}: run `leanauth db upgrade`"
        )
