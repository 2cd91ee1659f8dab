"""Change notifications between nodes, so caches refresh in milliseconds rather than at the
next poll: PostgreSQL ``LISTEN/NOTIFY``, or Redis pub/sub when ``LEANAUTH_REDIS_URL`` is set.

A notification only says "look now": the change itself is read from the store's change
feed, so a lost notification costs at most one polling interval.

A listener's connection is quiet most of the time, so quiet says nothing about whether the
server is still there: TCP keepalive finds a vanished host, and a listener that has heard
nothing for ``PING_INTERVAL`` seconds asks the server for an answer, which must come within
a deadline, or the connection is dropped and made again (and the cache told to look, since a
change may have been missed meanwhile).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from leanauth.safetext import without_password
from leanauth.settings import Settings
from leanauth.store.base import NOTIFY_CHANNEL
from leanauth.store.engine import EngineOptions

if TYPE_CHECKING:
    import psycopg

log = logging.getLogger("leanauth.notify")

# REDIS_IMPORTED: redis is imported where it is used, by the Redis listener and publisher:
# every command and worker imports this module, and most run without LEANAUTH_REDIS_URL
# (importing redis costs about 40 ms).

RECONNECT_DELAY = 1.0
# Seconds of silence after which a listener checks that its server still answers.
PING_INTERVAL = 5.0
# Redis: seconds to connect and to read an answer once it has begun; a ping unanswered
# this long after it was sent drops the connection.
REDIS_TIMEOUT = 5.0
# Redis connections find a vanished host as PostgreSQL ones do (leanauth.store.engine's
# TCP_DEADLINES says why these values): keepalive after 5 s of silence, then every 2 s,
# 3 probes; data unacknowledged for 10 s drops the connection (Linux).
REDIS_KEEPALIVE: dict[int, int] = {
    option: value
    for name, value in (
        ("TCP_KEEPIDLE", 5),
        ("TCP_KEEPINTVL", 2),
        ("TCP_KEEPCNT", 3),
        ("TCP_USER_TIMEOUT", 10_000),
    )
    if (option := getattr(socket, name, None)) is not None
}


class ChangeListener(Protocol):
    def start(self, wake: Callable[[], None]) -> None: ...
    def stop(self) -> None: ...


class _ListenerThread:
    """Runs ``listen_once`` in a daemon thread, reconnecting after failures until stopped."""

    name = "listener"
    # The server listened to (for error messages, which must not show its password).
    url = ""

    def __init__(self) -> None:
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._failed = False

    def start(self, wake: Callable[[], None]) -> None:
        self._thread = threading.Thread(
            target=self._run, args=(wake,), name=f"leanauth-{self.name}", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=3)

    def _run(self, wake: Callable[[], None]) -> None:
        while not self._stopping.is_set():
            try:
                self.listen_once(wake, self._stopping)
            except Exception as exc:
                self._failed = True
                log.warning("%s: %s; reconnecting", self.name, without_password(str(exc), self.url))
                wake()  # something may have been missed while disconnected
                self._stopping.wait(RECONNECT_DELAY)

    def listen_once(self, wake: Callable[[], None], stopping: threading.Event) -> None:
        raise NotImplementedError

    def listening(self, wake: Callable[[], None]) -> None:
        """Called by ``listen_once`` once it listens: says so after a failure, and has the
        cache catch up on anything committed before listening began."""
        if self._failed:
            self._failed = False
            log.warning("%s: listening again", self.name)
        wake()


class PostgresListener(_ListenerThread):
    name = "postgres-listener"

    def __init__(self, conninfo: str, options: EngineOptions) -> None:
        super().__init__()
        self._conninfo = self.url = conninfo
        self._options = options

    def connect(self) -> psycopg.Connection[Any]:
        """The listening connection, with the store's deadlines: connecting, TCP keepalive
        and tcp_user_timeout, and an answer deadline for each statement."""
        from leanauth.store.pgconn import connect_postgres  # noqa: PLC0415 (PostgreSQL only)

        return connect_postgres(self._conninfo, self._options, autocommit=True)

    def listen_once(self, wake: Callable[[], None], stopping: threading.Event) -> None:
        with self.connect() as conn:
            conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
            self.listening(wake)
            heard = time.monotonic()
            while not stopping.is_set():
                for _ in conn.notifies(timeout=1.0):
                    heard = time.monotonic()
                    wake()
                if time.monotonic() - heard >= PING_INTERVAL:
                    # Answered within the connection's deadline, or it is dropped.
                    conn.execute("SELECT 1")
                    heard = time.monotonic()


def redis_channel(url: str, name: str) -> str:
    """The pub/sub channel ``name`` of the installation on Redis database ``url``. Keys live
    in one of Redis's numbered databases but channels are server-wide: two installations
    sharing a Redis server, each on a database of its own, would otherwise hear each other's
    blocks and changes. Database 0 keeps the bare name."""
    from redis.connection import parse_url  # noqa: PLC0415 (see REDIS_IMPORTED)

    database = int(parse_url(url).get("db", 0))  # type: ignore[no-untyped-call]
    return name if database == 0 else f"{name}:{database}"


class RedisSubscriber(_ListenerThread):
    """Calls ``on_message(payload)`` for each message on a Redis pub/sub channel."""

    name = "redis-subscriber"

    def __init__(self, url: str, channel: str, on_message: Callable[[bytes], None]) -> None:
        super().__init__()
        self._url = self.url = url
        self._channel = channel
        self._on_message = on_message

    def listen_once(self, wake: Callable[[], None], stopping: threading.Event) -> None:
        import redis  # noqa: PLC0415 (see REDIS_IMPORTED)

        client = redis.Redis.from_url(
            self._url,
            socket_connect_timeout=REDIS_TIMEOUT,
            socket_timeout=REDIS_TIMEOUT,
            socket_keepalive=True,
            socket_keepalive_options=REDIS_KEEPALIVE,
        )
        pubsub = client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
        try:
            pubsub.subscribe(self._channel)
            self.listening(wake)
            heard = pinged = time.monotonic()
            while not stopping.is_set():
                message = pubsub.get_message(timeout=1.0)
                now = time.monotonic()
                if message is not None:
                    heard = now
                    if message["type"] == "message":
                        self._on_message(message["data"])
                elif pinged > heard and now - pinged > REDIS_TIMEOUT:
                    raise TimeoutError(f"no answer from Redis within {REDIS_TIMEOUT:g}s")
                elif now - max(heard, pinged) >= PING_INTERVAL:
                    pubsub.ping()  # the pong comes back as a message
                    pinged = now
        finally:
            pubsub.close()
            client.close()


class RedisListener(RedisSubscriber):
    """Change notifications over Redis: any message on the channel means "look now"."""

    name = "redis-listener"

    def __init__(self, url: str) -> None:
        super().__init__(url, redis_channel(url, NOTIFY_CHANNEL), lambda _: None)

    def start(self, wake: Callable[[], None]) -> None:
        self._on_message = lambda _: wake()
        super().start(wake)


class RedisPublisher:
    """Publishes committed changes on Redis; a failure is logged, never raised (the
    periodic poll still carries the change). The write that made the change waits for the
    publish, so a Redis that is down or hangs is given half a second, then left alone for
    a while: other nodes then learn of changes by polling."""

    TIMEOUT = 0.5
    RETRY_AFTER = 5.0

    def __init__(self, url: str) -> None:
        import redis  # noqa: PLC0415 (see REDIS_IMPORTED)

        self._client = redis.Redis.from_url(
            url, socket_connect_timeout=self.TIMEOUT, socket_timeout=self.TIMEOUT
        )
        self._failures = (redis.RedisError, OSError)
        self._channel = redis_channel(url, NOTIFY_CHANNEL)
        self._down_until = 0.0

    def __call__(self, kind: str) -> None:
        if time.monotonic() < self._down_until:
            return
        try:
            self._client.publish(self._channel, kind)
        except self._failures as exc:
            self._down_until = time.monotonic() + self.RETRY_AFTER
            log.warning("could not publish a change notification: %s", type(exc).__name__)

    def close(self) -> None:
        self._client.close()


def listener_for(settings: Settings) -> ChangeListener | None:
    if settings.redis_url:
        return RedisListener(settings.redis_url)
    if settings.database_url.startswith(("postgresql", "postgres")):
        options = EngineOptions(
            settings.db_pool_size, settings.db_connect_timeout, settings.db_statement_timeout
        )
        return PostgresListener(libpq_conninfo(settings.database_url), options)
    return None


def libpq_conninfo(url: str) -> str:
    """A libpq URL from a SQLAlchemy one (without the ``+driver`` part)."""
    scheme, rest = url.split("://", 1)
    return "postgresql://" + rest if scheme.startswith("postgres") else url
