"""Database engines for the SQLAlchemy store: SQLite (embedded) and PostgreSQL (psycopg 3)."""

from __future__ import annotations

import contextlib
import os
import shlex
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, make_url
from sqlalchemy.pool import ConnectionPoolEntry

from leanauth.store.base import StoreError


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
        path = sqlite_file(url)
        if path is not None:
            _create_private_file(path)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 10})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    statement_ms = int(options.statement_timeout * 1000)
    return create_engine(
        postgres_url(url),
        pool_size=options.pool_size,
        max_overflow=options.pool_size,
        # No ping before each checkout: it doubled the round trips of the background writes
        # (measured). A connection found dead fails its statement once, SQLAlchemy then
        # discards the pool's connections, and the next use reconnects.
        pool_pre_ping=False,
        pool_recycle=300,
        pool_timeout=options.connect_timeout,
        connect_args={
            "connect_timeout": max(1, round(options.connect_timeout)),
            "options": f"-c statement_timeout={statement_ms}",
            "application_name": "leanauth",
        },
    )


def sqlite_file(url: str) -> Path | None:
    """The database file of an SQLite URL; None for an in-memory database or another one."""
    if not url.startswith("sqlite"):
        return None
    database = make_url(url).database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None  # in memory, or an SQLite URI filename, which SQLite itself resolves
    return Path(database)


def fsync_directory(folder: Path) -> None:
    """Make a new name in ``folder`` survive a crash (a file is synced, its name is not)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _create_private_file(path: Path) -> None:
    """Create the database file, and its folder, for this user only (0600, 0700): it holds
    customers' ids and the audit trail. SQLite would create it with the umask's mode (often
    0644); it gives its -wal and -shm files the database file's mode. Files and folders that
    exist keep theirs (:func:`exposed_database_warning` tells the operator at start)."""
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not path.exists():
            with contextlib.suppress(FileExistsError):  # another process made it first
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError as exc:
        raise StoreError(f"cannot create the database file {path}: {exc.strerror}") from None


def exposed_database_warning(url: str) -> str | None:
    """A warning for the log when an SQLite database file is open to its group or to others
    (made by an older leanauth or by hand); None when it is not, or is no file."""
    path = sqlite_file(url)
    if path is None:
        return None
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return None
    if not mode & 0o077:
        return None
    return (
        f"the database file {path} is open to other users (mode {mode:o}) and holds "
        f"customers' app_user_ids and the audit trail: run `chmod 600 {shlex.quote(str(path))}*`"
        " (the database and its -wal and -shm files)"
    )


def _sqlite_pragmas(dbapi_connection: Any, _record: ConnectionPoolEntry) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets the server's readers run while the CLI writes; busy_timeout waits out locks.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()
