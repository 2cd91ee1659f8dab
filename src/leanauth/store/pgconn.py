"""PostgreSQL connections with a deadline on every answer (psycopg 3), for the store's pool
and the change listener. A module of its own: only PostgreSQL installations import psycopg."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import psycopg
from psycopg.abc import PQGen

from leanauth.store.engine import EngineOptions, postgres_connect_args

RV = TypeVar("RV")


class DeadlineConnection(psycopg.Connection[Any]):
    """A psycopg connection that waits at most ``answer_timeout`` seconds for each answer.

    TCP finds a vanished host, but not a peer that keeps the connection open and stops
    answering (a hung proxy or pooler between here and the database, a frozen server): a
    thread waiting on such a connection would wait forever, holding a pooled connection and
    a worker thread. Past the deadline the connection is closed and the call fails with
    :class:`psycopg.OperationalError`; SQLAlchemy sees a closed connection, counts it as a
    disconnect and replaces the pool's connections."""

    answer_timeout: float = EngineOptions().answer_timeout

    def wait(self, gen: PQGen[RV], interval: float = 0.1, timeout: float | None = None) -> RV:
        # Every round trip of a connection (execute, fetch, commit, rollback) goes through
        # wait(); a caller that gives its own timeout (notifies()) handles its expiry itself.
        # wait() and _WaitTimeout are psycopg's internals (3.3, pinned): should they change,
        # tests/test_stuck_database.py fails. The interval is psycopg's own default.
        if timeout is not None:
            return super().wait(gen, interval, timeout)
        try:
            return super().wait(gen, interval, self.answer_timeout)
        except psycopg.errors._WaitTimeout:
            # Halfway through a round trip the connection is of no further use.
            self.pgconn.finish()
            raise psycopg.OperationalError(
                f"the database did not answer within {self.answer_timeout:g}s; connection closed"
            ) from None


def connect_postgres(conninfo: str, options: EngineOptions, **kwargs: Any) -> DeadlineConnection:
    """A connection with the engine's deadlines (connecting, TCP, answers), outside the
    pool: the change listener's."""
    conn = DeadlineConnection.connect(conninfo, **{**postgres_connect_args(options), **kwargs})
    conn.answer_timeout = options.answer_timeout
    return conn


def deadline_connector(
    options: EngineOptions,
) -> Callable[[Any, Any, list[Any], dict[str, Any]], DeadlineConnection]:
    """A ``do_connect`` hook for SQLAlchemy: what the dialect would do (psycopg.connect),
    with :class:`DeadlineConnection`."""

    def connect(
        _dialect: Any, _record: Any, cargs: list[Any], cparams: dict[str, Any]
    ) -> DeadlineConnection:
        conn = DeadlineConnection.connect(*cargs, **cparams)
        conn.answer_timeout = options.answer_timeout
        return conn

    return connect
