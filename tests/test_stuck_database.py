"""Stuck database connections (issue #11): a database that stops answering without closing its
connections (a vanished host, a hung proxy) must stall nothing for long.

A real server reaches PostgreSQL through a proxy this test owns (tests/faultproxy.py), which
black-holes every connection on demand: open, but nothing forwarded either way. The CLI
works on the real database port, past the proxy, as another node would. Shown: requests
that need the database answer 503 within LEANAUTH_DB_REQUEST_TIMEOUT and issue nothing;
tokens known in memory keep being served; once the partition heals the node reads the
change feed again within seconds and writes out what it queued meanwhile; and a node told
to stop during the partition stops on time.

Also here: the TCP deadlines of every PostgreSQL connection, the change listeners' own check
of a quiet connection, and SQLite's durable commits (issue #11, item 2).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import psycopg
import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from conftest import (
    RELAXED_THROTTLE,
    AppCredentials,
    Env,
    PostgresDatabases,
    Server,
    create_app,
    free_port,
    installation,
    new_token,
    request_token,
    start_server,
    token_form,
    wait_for,
    wait_until_known,
)
from faultproxy import FaultProxy
from leanauth import notify
from leanauth.cache import StoreCalls, StoreTimeout
from leanauth.notify import PostgresListener, RedisListener, libpq_conninfo
from leanauth.registry import time_ordered_uuid
from leanauth.store.engine import TCP_DEADLINES, EngineOptions, engine_for

# The node's database settings: short, so that each phase of a test takes seconds. A
# round trip then gets 1 + 2 s before its connection is dropped (EngineOptions.answer_timeout);
# libpq waits at least 2 s for a connection.
NODE_SETTINGS = {
    "LEANAUTH_DB_STATEMENT_TIMEOUT": "1",
    "LEANAUTH_DB_CONNECT_TIMEOUT": "2",
    **RELAXED_THROTTLE,
}
ANSWER_TIMEOUT = EngineOptions(statement_timeout=1).answer_timeout
# A node's stop: the drain (0 s in tests), LEANAUTH_SHUTDOWN_TIMEOUT (10 s), and 5 s more,
# after which the supervisor kills a worker still running.
KILLED_AFTER = 15.0
REQUEST_TIMEOUT = 2.0  # LEANAUTH_DB_REQUEST_TIMEOUT's default
# Scheduling on a loaded two-core machine: a request answered "within the bound" may come
# this much after it.
SLACK = 1.0
# From the end of a partition to the node's view being current again: the refresh that
# was waiting is answered at once (the proxy delivers what it held); at worst a refresh
# gave up just before and the next one connects anew.
RECOVERED_WITHIN = 5.0
# Logged when a refresh of the node's view gives up: at the answer deadline on a pooled
# connection (a new one gives up sooner, at the connection deadline).
REFRESH_FAILED = "registry refresh failed"


@dataclass
class Partitionable:
    env: Env  # the installation, as the CLI sees it: the real database
    server: Server  # the node: its database through the proxy
    proxy: FaultProxy
    app: AppCredentials


def through(url: str, port: int) -> str:
    """``url`` with its port replaced (the proxy's)."""
    parts = urlsplit(url)
    host = parts.netloc.rsplit(":", 1)[0] if ":" in parts.netloc else parts.netloc
    return urlunsplit(parts._replace(netloc=f"{host}:{port}"))


@pytest.fixture
def partitionable(tmp_path: Path, postgres: PostgresDatabases) -> Iterator[Partitionable]:
    url = postgres.create()
    real = urlsplit(url)
    for name in ("cli", "node"):
        (tmp_path / name).mkdir()
    env = installation(tmp_path / "cli", url, **NODE_SETTINGS)
    app = create_app(env, "--name", "Partitioned", "--scopes", "api,customer")
    with FaultProxy(real.hostname or "127.0.0.1", real.port or 5432) as proxy:
        node = Env(
            tmp_path / "node",
            extra={**env.extra, "LEANAUTH_DATABASE_URL": through(url, proxy.port)},
        )
        server = start_server(node)
        try:
            wait_until_known(server, app)
            yield Partitionable(env, server, proxy, app)
        finally:
            proxy.heal()
            server.stop()


def timed(call: Callable[[], httpx.Response]) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    response = call()
    return response, time.monotonic() - started


def customer_token(server: Server, app: AppCredentials, customer_id: str) -> httpx.Response:
    return request_token(server, app, f"customer.{customer_id}")


def token_events(env: Env, app: AppCredentials, outcome: str) -> list[dict[str, Any]]:
    """The app's token requests of this outcome in the audit trail (on the real database)."""
    events = env.cli("audit", "list", "--app", app.client_id, "--limit", "10000")
    return [e for e in events if e["kind"] == "token" and e["outcome"] == outcome]


def jti_of(response: httpx.Response) -> str:
    import jwt

    assert response.status_code == 200, response.text
    claims = jwt.decode(response.json()["access_token"], options={"verify_signature": False})
    return str(claims["jti"])


def test_during_a_black_hole_new_customers_get_503_in_time_and_known_ones_tokens(
    partitionable: Partitionable,
) -> None:
    env, server, proxy, app = (
        partitionable.env,
        partitionable.server,
        partitionable.proxy,
        partitionable.app,
    )
    known = env.cli("customers", "create", "--app", app.client_id, "--app-user-id", "known")
    known_id = known["customer_id"]
    wait_for(lambda: customer_token(server, app, known_id).status_code == 200)

    proxy.black_hole()
    # Made on the real database during the partition: the node cannot hear of it, and its
    # id is new enough to be worth a look-up. With it, ids of no customer at all, made now:
    # more look-ups at once than the requests' threads, so some wait in their queue.
    made = env.cli("customers", "create", "--app", app.client_id, "--app-user-id", "unseen")
    unseen = [made["customer_id"]] + [str(time_ordered_uuid()[0]) for _ in range(7)]
    with ThreadPoolExecutor(len(unseen)) as pool:
        answers = list(pool.map(lambda c: timed(lambda: customer_token(server, app, c)), unseen))
    for response, elapsed in answers:
        assert response.status_code == 503, response.text
        assert response.json()["error"] == "temporarily_unavailable"
        assert response.headers["retry-after"] == "1"
        assert response.headers["cache-control"] == "no-store"
        assert REQUEST_TIMEOUT - 0.1 <= elapsed <= REQUEST_TIMEOUT + SLACK, elapsed

    # Everything the node holds in memory is served as before, at once.
    for scope in ("api", f"customer.{known_id}"):
        response, elapsed = timed(lambda s=scope: request_token(server, app, s))
        assert response.status_code == 200, response.text
        assert elapsed < 0.5, elapsed
    livez = httpx.get(server.url + "/livez", timeout=5)
    assert livez.status_code == 200

    # The node's own requests to the database are cut at their deadlines, and it says so.
    wait_for(lambda: REFRESH_FAILED in server.log(), timeout=ANSWER_TIMEOUT + SLACK)

    proxy.heal()
    # Healed: the customer made during the partition gets its token.
    wait_for(
        lambda: customer_token(server, app, made["customer_id"]).status_code == 200,
        timeout=RECOVERED_WITHIN,
    )
    # The refusals reached the audit trail; no request given up on was issued a token.
    wanted = {f"customer.{c}" for c in unseen}

    def refused() -> set[str]:
        events = token_events(env, app, "temporarily_unavailable")
        return {e["detail"].get("scope") for e in events}

    wait_for(lambda: wanted <= refused(), timeout=RECOVERED_WITHIN)
    issued = [e["detail"].get("scope") for e in token_events(env, app, "issued")]
    # The one real customer's token: once, for the request made after the partition; none
    # for any request given up on.
    assert [s for s in issued if s in wanted] == [f"customer.{unseen[0]}"]


def test_once_the_partition_heals_the_change_feed_and_the_audit_trail_catch_up(
    partitionable: Partitionable,
) -> None:
    env, server, proxy, app = (
        partitionable.env,
        partitionable.server,
        partitionable.proxy,
        partitionable.app,
    )
    victim = create_app(env, "--name", "Disabled in the partition", "--scopes", "api")
    wait_until_known(server, victim)

    proxy.black_hole()
    started = time.monotonic()
    env.cli("apps", "disable", victim.client_id)
    # The node cannot know yet: it goes on from its view, and its audit records queue.
    during = [jti_of(request_token(server, app)) for _ in range(3)]
    assert request_token(server, victim).status_code == 200
    # Its stuck refresh is cut at a deadline and logged; /readyz stays up until the view
    # passes LEANAUTH_INTROSPECTION_MAX_STALENESS (10 s).
    wait_for(lambda: REFRESH_FAILED in server.log(), timeout=ANSWER_TIMEOUT + SLACK)
    assert time.monotonic() - started < ANSWER_TIMEOUT + 2 * SLACK
    time.sleep(1.0)  # a few more refreshes fail: the node is well into its retries

    proxy.heal()
    recovered = wait_for(
        lambda: request_token(server, victim).status_code == 401, timeout=RECOVERED_WITHIN
    )
    logging.getLogger(__name__).info("the disabled app was refused %.2fs after healing", recovered)
    assert request_token(server, victim).json()["error"] == "invalid_client"

    def audited() -> set[str]:
        return {e["detail"].get("jti") for e in token_events(env, app, "issued")}

    wait_for(lambda: set(during) <= audited(), timeout=RECOVERED_WITHIN)


def test_after_a_reset_the_node_connects_again(partitionable: Partitionable) -> None:
    """A host that comes back from a reboot answers the old connections with a reset."""
    env, server, proxy, app = (
        partitionable.env,
        partitionable.server,
        partitionable.proxy,
        partitionable.app,
    )
    proxy.black_hole()
    wait_for(lambda: REFRESH_FAILED in server.log(), timeout=ANSWER_TIMEOUT + SLACK)
    proxy.reset()
    proxy.heal()
    victim = create_app(env, "--name", "Disabled after the reset", "--scopes", "api")
    wait_for(lambda: request_token(server, victim).status_code == 200, timeout=RECOVERED_WITHIN)
    env.cli("apps", "disable", victim.client_id)
    wait_for(lambda: request_token(server, victim).status_code == 401, timeout=RECOVERED_WITHIN)
    assert new_token(server, app)
    # The change listener lost its connection too, and says when it listens again.
    wait_for(lambda: "postgres-listener: listening again" in server.log(), timeout=5.0)


def test_a_node_stops_on_time_while_its_database_is_black_holed(
    partitionable: Partitionable,
) -> None:
    server, proxy, app = partitionable.server, partitionable.proxy, partitionable.app
    for _ in range(3):
        new_token(server, app)  # audit records for the final flush
    proxy.black_hole()
    # A request waiting on the database when the signal comes, and the background jobs
    # stuck on theirs.
    pending = threading.Thread(
        target=customer_token, args=(server, app, str(time_ordered_uuid()[0])), daemon=True
    )
    pending.start()
    time.sleep(1.0)
    started = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    status = server.process.wait(timeout=30)
    elapsed = time.monotonic() - started
    # Status 0: every worker stopped on its own, none had to be killed. Here at most: the
    # pending request (2 s), the listener's stop (3 s), the final flush (an answer deadline
    # and two connection attempts: 3 + 2 + 2 s).
    assert status == 0, server.log()
    assert elapsed < KILLED_AFTER, elapsed
    assert "killed" not in server.log()
    pending.join(timeout=5)


def test_request_calls_wait_at_most_their_deadline_on_threads_of_their_own() -> None:
    """StoreCalls on its own: a call past its deadline is given up (its thread left to
    it), one still queued never runs, and past the queue's bound a call is refused at
    once. The request's context (its request id) reaches the thread."""
    request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id")
    stuck = threading.Event()
    ran: list[str] = []

    def hang(name: str) -> None:
        ran.append(name)
        stuck.wait(10)

    async def scenario() -> None:
        calls = StoreCalls(0.5, threads=1, max_waiting=2)
        started = time.monotonic()
        # One call takes the thread, two wait for it; the fourth finds the queue full.
        attempts = [calls.run(hang, name) for name in ("a", "b", "c", "d")]
        outcomes = await asyncio.gather(*attempts, return_exceptions=True)
        assert all(isinstance(o, StoreTimeout) for o in outcomes), outcomes
        assert "not answering" in str(outcomes[3])
        assert 0.5 <= time.monotonic() - started < 0.5 + SLACK
        # The queued calls were dropped with their requests; the stuck one holds its thread.
        assert ran == ["a"]
        stuck.set()
        request_id.set("r-1")
        assert await calls.run(request_id.get) == "r-1"
        assert ran == ["a"]
        calls.close()

    asyncio.run(scenario())


# The TCP deadlines of every PostgreSQL connection, and the listeners' checks


def tcp_options(fd: int) -> dict[str, int]:
    sock = socket.socket(fileno=os.dup(fd))
    try:
        return {
            "keepalives": sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
            "keepalives_idle": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
            "keepalives_interval": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
            "keepalives_count": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
            "tcp_user_timeout": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT),
        }
    finally:
        sock.close()


def test_every_postgres_connection_finds_a_dead_peer_within_seconds(
    postgres: PostgresDatabases,
) -> None:
    """Read back from the kernel: the pool's connections and the listener's."""
    url = postgres.create()
    engine = engine_for(url)
    try:
        with engine.connect() as conn:
            driver = conn.connection.driver_connection
            assert isinstance(driver, psycopg.Connection)
            assert tcp_options(driver.pgconn.socket) == TCP_DEADLINES
            assert conn.execute(text("SHOW statement_timeout")).scalar() == "5s"
    finally:
        engine.dispose()
    listener = PostgresListener(libpq_conninfo(url), EngineOptions())
    with listener.connect() as conn:
        assert tcp_options(conn.pgconn.socket) == TCP_DEADLINES


def test_a_statement_without_an_answer_is_cut_at_its_deadline(
    postgres: PostgresDatabases,
) -> None:
    url = urlsplit(postgres.create())
    with FaultProxy(url.hostname or "127.0.0.1", url.port or 5432) as proxy:
        options = EngineOptions(connect_timeout=1, statement_timeout=0.5)
        engine = engine_for(through(urlunsplit(url), proxy.port), options)
        try:
            with engine.connect() as conn:
                assert conn.execute(text("SELECT 1")).scalar() == 1
            proxy.black_hole()
            started = time.monotonic()
            with (
                pytest.raises(OperationalError, match=r"did not answer within 2\.5s"),
                engine.connect() as conn,
            ):
                conn.execute(text("SELECT 1"))
            assert options.answer_timeout <= time.monotonic() - started < options.answer_timeout + 1
            proxy.heal()
            # The connection cut was dropped from the pool: the next one is a new one.
            with engine.connect() as conn:
                assert conn.execute(text("SELECT 2")).scalar() == 2
        finally:
            engine.dispose()


class Wakes:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


@pytest.mark.parametrize("backend", ["postgresql", "redis"])
def test_a_listener_on_a_silent_connection_reconnects_and_wakes_the_cache(
    backend: str,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A listener's connection is quiet by nature: it asks for an answer after
    PING_INTERVAL s of silence, and without one (in the answer deadline) reconnects."""
    monkeypatch.setattr(notify, "PING_INTERVAL", 0.5)
    monkeypatch.setattr(notify, "REDIS_TIMEOUT", 1.0)
    url = urlsplit(
        request.getfixturevalue("postgres").create()
        if backend == "postgresql"
        else request.getfixturevalue("redis_url")
    )
    with FaultProxy(url.hostname or "127.0.0.1", url.port or 0) as proxy:
        proxied = through(urlunsplit(url), proxy.port)
        listener: notify.ChangeListener
        if backend == "postgresql":
            options = EngineOptions(connect_timeout=1, statement_timeout=0.5)
            listener = PostgresListener(libpq_conninfo(proxied), options)
        else:
            listener = RedisListener(proxied)
        wakes = Wakes()
        caplog.set_level(logging.INFO, logger="leanauth.notify")
        listener.start(wakes)
        try:
            wait_for(lambda: wakes.count >= 1)  # listening: the cache is told to catch up
            time.sleep(4 * notify.PING_INTERVAL)  # a quiet server that answers its pings
            assert "reconnecting" not in caplog.text
            proxy.black_hole()
            # Detected within the ping interval and the answer deadline: 0.5 + 2.5 s (PG), 0.5 + 1 s
            # (Redis).
            silent = wait_for(lambda: "reconnecting" in caplog.text, timeout=3.0 + 2 * SLACK)
            assert silent < 3.0 + 2 * SLACK
            woken = wakes.count
            assert woken >= 2  # told to look: a change may have been missed
            proxy.heal()
            wait_for(lambda: "listening again" in caplog.text, timeout=5.0)
            assert wakes.count > woken
        finally:
            listener.stop()


# SQLite: a change the API acknowledged is on disk (issue #11, item 2)


def test_sqlite_commits_are_synced_before_they_return(tmp_path: Path) -> None:
    """WAL with synchronous=NORMAL syncs only at checkpoints: a power loss could take the
    last acknowledged commits. Every connection leanauth opens uses FULL."""
    engine = engine_for(f"sqlite:///{tmp_path / 'leanauth.db'}")
    try:
        for _ in range(2):  # each connection of the pool, not only the first
            with engine.connect() as conn:
                assert conn.execute(text("PRAGMA synchronous")).scalar() == 2  # FULL
                assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
            engine.dispose()
    finally:
        engine.dispose()


def test_a_customer_the_api_acknowledged_survives_kill_9_of_the_node(tmp_path: Path) -> None:
    """The whole process group killed right after the 201: the customer is in the database.
    (This shows the acknowledgement comes after the commit; that the commit reached the disk,
    not only the page cache, only a power loss could show: the test above shows the setting
    that makes it so.)"""
    env = Env(tmp_path)
    app = create_app(env, "--name", "Durable", "--scopes", "api")
    env.prepare()
    port = free_port()
    log_path = tmp_path / "server.log"
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "leanauth", "serve"],
            env={**os.environ, **env.vars, "LEANAUTH_PORT": str(port)},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, killed whole below
        )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: ready(base), timeout=30)
        wait_for(lambda: token_status(base, app) == 200)
        token = httpx.post(base + "/oauth2/token", data=token_form(app), timeout=10).json()
        headers = {"authorization": f"Bearer {token['access_token']}"}
        created = []
        for n in range(5):
            response = httpx.post(
                base + "/customers/v1/", json={"app_user_id": f"durable-{n}"}, headers=headers
            )
            assert response.status_code == 201, response.text
            created.append(response.json()["customer_id"])
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    with sqlite3.connect(tmp_path / "leanauth.db") as conn:
        stored = {row[0] for row in conn.execute("SELECT customer_id FROM customers")}
    assert set(created) <= stored


def ready(base: str) -> bool:
    try:
        return httpx.get(base + "/readyz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def token_status(base: str, app: AppCredentials) -> int:
    return httpx.post(base + "/oauth2/token", data=token_form(app), timeout=10).status_code
