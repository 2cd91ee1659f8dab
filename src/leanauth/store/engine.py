"""Database engines for the SQLAlchemy store: SQLite (embedded) and PostgreSQL (psycopg 3)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
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


def _sqlite_pragmas(dbapi_connection: Any, _record: ConnectionPoolEntry) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets the server's readers run while the CLI writes; busy_timeout waits out locks.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()
