"""Database engines for the SQLAlchemy store: SQLite (embedded) and PostgreSQL (psycopg 3).

Every wait on PostgreSQL has a deadline: connecting (``connect_timeout``), a statement on the
server (``statement_timeout``), a dead peer (TCP keepalive and ``tcp_user_timeout``), and any
one answer (:class:`~leanauth.store.pgconn.DeadlineConnection`). SQLite commits are synced
before they return.
"""

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

# A peer that vanished without closing its connections (a host gone, a partition that drops
# packets) is found by TCP itself within about 11 s, where the kernel's defaults wait two
# hours before a first keepalive probe and retransmit unacknowledged data for about 15
# minutes. Keepalive probes a connection after 5 s of silence, then every 2 s, and gives up
# after 3 unanswered probes (5 + 3 x 2 s); tcp_user_timeout (Linux) drops a connection whose
# data has gone unacknowledged for 10 s, and with keepalive on it also ends the probing once
# 10 s have passed without a word from the peer. Idle pooled connections and the LISTEN
# connection are checked this way (a probe is a few bytes every 5 s); a statement waiting
# for its answer has, besides, the answer deadline below.
TCP_DEADLINES: dict[str, int] = {
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 2,
    "keepalives_count": 3,
    "tcp_user_timeout": 10_000,  # milliseconds
}
# Seconds past the statement timeout a server that is there needs to cancel the statement and
# say so, and its answer to cross the network.
ANSWER_MARGIN = 2.0


@dataclass(frozen=True)
class EngineOptions:
    pool_size: int = 5
    connect_timeout: float = 5.0
    statement_timeout: float = 5.0

    @property
    def answer_timeout(self) -> float:
        """Longest wait for any one answer from PostgreSQL (a statement's result, a commit):
        a server that is there answers within its statement timeout, if only to say it
        cancelled the statement."""
        return self.statement_timeout + ANSWER_MARGIN


def postgres_connect_args(options: EngineOptions) -> dict[str, Any]:
    """libpq parameters of every PostgreSQL connection: how long to wait for it, how long
    a statement may run on the server, and how soon a dead peer is found."""
    statement_ms = int(options.statement_timeout * 1000)
    return {
        "connect_timeout": max(1, round(options.connect_timeout)),
        "options": f"-c statement_timeout={statement_ms}",
        "application_name": "leanauth",
        **TCP_DEADLINES,
    }


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
    engine = create_engine(
        postgres_url(url),
        pool_size=options.pool_size,
        max_overflow=options.pool_size,
        # No ping before each checkout: it doubled the round trips of the background writes
        # (measured). A connection found dead fails its statement once, SQLAlchemy then
        # discards the pool's connections, and the next use reconnects.
        pool_pre_ping=False,
        pool_recycle=300,
        pool_timeout=options.connect_timeout,
        connect_args=postgres_connect_args(options),
    )
    # psycopg is imported for PostgreSQL only: an SQLite command need not (about 80 ms).
    from leanauth.store.pgconn import deadline_connector  # noqa: PLC0415

    event.listen(engine, "do_connect", deadline_connector(options))
    return engine


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
    # FULL: a commit is synced to disk before it returns, so a change the API or the CLI
    # acknowledged survives a power loss or an OS crash. In WAL mode NORMAL syncs only at
    # checkpoints: the last commits before a crash could vanish after being acknowledged.
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.close()
