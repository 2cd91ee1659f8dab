"""Brute-force defence for client authentication (RFC 6749 §2.3.1), against real servers.

Failed authentications are counted per (client id, source) and per source; past a limit the
pair's (or the source's) failures get 429 ``too_many_requests`` with ``Retry-After`` until the
window ends. The secret is checked first, so correct credentials are never refused: not from
the attacker's address, not from behind the same load balancer. Every test here fails from
source addresses of its own (the whole of 127.0.0.0/8 is loopback), so the per-address
counters of one test never reach into another's.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote_plus

import httpx
import pytest

from conftest import (
    AppCredentials,
    Env,
    PostgresDatabases,
    Server,
    create_app,
    free_port,
    serving,
    start_server,
    wait_for,
)
from secret_sweep import record_values

PAIR_LIMIT = 5
ADDRESS_LIMIT = 20
LIMITS = {
    "LEANAUTH_AUTH_FAILURE_LIMIT": f"{PAIR_LIMIT} per minute",
    "LEANAUTH_AUTH_FAILURE_ADDRESS_LIMIT": f"{ADDRESS_LIMIT} per minute",
}
WRONG_SECRET = "lsk_" + "A" * 43
TOO_MANY = "too_many_requests"

# Source addresses handed out one per use. The second octet is random per run, so counters
# left in Redis by an earlier run (they live a minute) never meet this run's.
_RUN_OCTET = random.randint(1, 254)
_addresses = itertools.count(1)


def fresh_address() -> str:
    n = next(_addresses)
    return f"127.{_RUN_OCTET}.{n // 250}.{n % 250 + 1}"


def post(
    url: str,
    data: dict[str, str],
    *,
    source: str,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    """POST a form from the given loopback source address."""
    transport = httpx.HTTPTransport(local_address=source)
    with httpx.Client(transport=transport, timeout=10) as client:
        response = client.post(url, data=data, headers=headers)
    if response.status_code == 200 and url.endswith("/oauth2/token"):
        # For the secret sweep: no token a test saw may turn up in a log.
        record_values(response.json())
    return response


def basic(client_id: str, secret: str) -> str:
    raw = f"{quote_plus(client_id)}:{quote_plus(secret)}".encode()
    return "Basic " + base64.b64encode(raw).decode()


def attempt(
    server: Server,
    client_id: str,
    secret: str,
    *,
    source: str,
    use_basic: bool = False,
    forwarded_for: str | None = None,
    path: str = "/oauth2/token",
) -> httpx.Response:
    """One client authentication at an OAuth endpoint (a token request by default)."""
    headers = {"X-Forwarded-For": forwarded_for} if forwarded_for else {}
    form = {"grant_type": "client_credentials", "scope": "api"}
    if path != "/oauth2/token":
        form = {"token": "not-a-token"}
    if use_basic:
        headers["Authorization"] = basic(client_id, secret)
    else:
        form |= {"client_id": client_id, "client_secret": secret}
    return post(server.url + path, form, source=source, headers=headers)


def assert_invalid_client(response: httpx.Response) -> None:
    assert response.status_code == 401, response.text
    assert response.json()["error"] == "invalid_client"
    assert response.headers["www-authenticate"].startswith("Basic")


def assert_throttled(response: httpx.Response) -> None:
    assert response.status_code == 429, response.text
    assert response.json()["error"] == TOO_MANY
    assert response.json()["error_description"]
    retry_after = response.headers["retry-after"]
    assert retry_after.isdigit(), retry_after
    assert 1 <= int(retry_after) <= 60
    assert response.headers["cache-control"] == "no-store"


def assert_failed_or_throttled(response: httpx.Response) -> None:
    """One failure more than the limit's worth: refused either way (401 or, since the limit
    is spent, 429; the exact boundary has a test of its own)."""
    if response.status_code == 429:
        assert_throttled(response)
    else:
        assert_invalid_client(response)


def block(
    server: Server,
    client_id: str,
    *,
    source: str,
    forwarded_for: str | None = None,
    limit: int = PAIR_LIMIT,
) -> None:
    """Fail with a wrong secret until the server throttles (the exact boundary is tested on
    its own; here a block is only the means)."""
    for _ in range(limit + 2):
        response = attempt(
            server, client_id, WRONG_SECRET, source=source, forwarded_for=forwarded_for
        )
        if response.status_code == 429:
            assert_throttled(response)
            return
        assert_invalid_client(response)
    pytest.fail(f"no 429 after {limit + 2} failed authentications")


def wait_known(server: Server, creds: AppCredentials) -> None:
    """Wait until the server knows a new app; the 401s of the wait come from an address
    used for nothing else."""
    source = fresh_address()
    wait_for(
        lambda: (
            attempt(server, creds.client_id, creds.client_secret, source=source).status_code == 200
        ),
        interval=0.1,
    )


@pytest.fixture(scope="module")
def throttled_env(tmp_path_factory: pytest.TempPathFactory) -> Env:
    return Env(tmp_path_factory.mktemp("throttle"), extra=LIMITS)


@pytest.fixture(scope="module")
def throttled(throttled_env: Env) -> Iterator[Server]:
    with serving(throttled_env) as running:
        yield running


@pytest.fixture
def app_a(throttled_env: Env, throttled: Server) -> AppCredentials:
    created = create_app(throttled_env, "--name", "Throttled app", "--scopes", "api")
    wait_known(throttled, created)
    return created


# One (client id, address) pair


def assert_token(response: httpx.Response) -> None:
    assert response.status_code == 200, response.text
    assert response.json()["token_type"] == "Bearer"


def test_the_pair_limit_is_exact_and_the_right_secret_still_works(
    throttled: Server, app_a: AppCredentials
) -> None:
    source = fresh_address()
    for _ in range(PAIR_LIMIT):
        assert_invalid_client(attempt(throttled, app_a.client_id, WRONG_SECRET, source=source))
    # The limit's worth of failures is spent: the next failure is refused with 429...
    assert_throttled(attempt(throttled, app_a.client_id, WRONG_SECRET, source=source))
    # ...but the right secret, from the very same address, is never refused by the throttle.
    assert_token(attempt(throttled, app_a.client_id, app_a.client_secret, source=source))
    assert_token(
        attempt(throttled, app_a.client_id, app_a.client_secret, source=source, use_basic=True)
    )
    assert_throttled(attempt(throttled, app_a.client_id, WRONG_SECRET, source=source))


def test_a_blocked_pair_still_takes_the_right_secret_and_the_app_works_from_elsewhere(
    throttled: Server, app_a: AppCredentials
) -> None:
    attacker, real = fresh_address(), fresh_address()
    block(throttled, app_a.client_id, source=attacker)
    assert_throttled(attempt(throttled, app_a.client_id, WRONG_SECRET, source=attacker))
    assert_throttled(
        attempt(throttled, app_a.client_id, WRONG_SECRET, source=attacker, use_basic=True)
    )
    assert_token(attempt(throttled, app_a.client_id, app_a.client_secret, source=attacker))
    for use_basic in (False, True):
        response = attempt(
            throttled, app_a.client_id, app_a.client_secret, source=real, use_basic=use_basic
        )
        assert response.status_code == 200, response.text
    # The attacker's address is blocked for this client id only (the address limit is far).
    other = create_app(throttled.env, "--name", "Other app", "--scopes", "api")
    wait_known(throttled, other)
    response = attempt(throttled, other.client_id, other.client_secret, source=attacker)
    assert response.status_code == 200, response.text


def test_wrong_basic_headers_and_wrong_body_secrets_both_count(
    throttled: Server, app_a: AppCredentials
) -> None:
    source = fresh_address()
    for _ in range(3):
        assert_invalid_client(
            attempt(throttled, app_a.client_id, WRONG_SECRET, source=source, use_basic=True)
        )
    for _ in range(PAIR_LIMIT - 3):
        assert_invalid_client(attempt(throttled, app_a.client_id, WRONG_SECRET, source=source))
    assert_failed_or_throttled(attempt(throttled, app_a.client_id, WRONG_SECRET, source=source))
    # Neither kind alone (3 each) reached the limit; together they did.
    assert_throttled(
        attempt(throttled, app_a.client_id, WRONG_SECRET, source=source, use_basic=True)
    )


def test_failures_at_revocation_and_introspection_count_toward_the_same_limit(
    throttled: Server, app_a: AppCredentials
) -> None:
    source = fresh_address()
    for path in ("/oauth2/revoke", "/oauth2/introspect", "/oauth2/revoke"):
        assert_invalid_client(
            attempt(throttled, app_a.client_id, WRONG_SECRET, source=source, path=path)
        )
    for _ in range(PAIR_LIMIT - 3):
        assert_invalid_client(attempt(throttled, app_a.client_id, WRONG_SECRET, source=source))
    assert_failed_or_throttled(attempt(throttled, app_a.client_id, WRONG_SECRET, source=source))
    # Three token-endpoint failures alone are far from the limit.
    for path in ("/oauth2/revoke", "/oauth2/introspect"):
        assert_throttled(
            attempt(throttled, app_a.client_id, WRONG_SECRET, source=source, path=path)
        )
        response = attempt(
            throttled, app_a.client_id, app_a.client_secret, source=source, path=path
        )
        assert response.status_code == 200, response.text


# One address, many client ids


def test_the_address_limit_is_exact(throttled: Server) -> None:
    source = fresh_address()
    for _ in range(ADDRESS_LIMIT):
        assert_invalid_client(attempt(throttled, str(uuid.uuid4()), WRONG_SECRET, source=source))
    assert_throttled(attempt(throttled, str(uuid.uuid4()), WRONG_SECRET, source=source))


def test_a_blocked_address_is_refused_for_any_client_id_and_other_addresses_are_not(
    throttled: Server, app_a: AppCredentials
) -> None:
    source, elsewhere = fresh_address(), fresh_address()
    for _ in range(ADDRESS_LIMIT + 2):
        # Each client id fails once: no pair comes near its own limit.
        response = attempt(throttled, str(uuid.uuid4()), WRONG_SECRET, source=source)
        if response.status_code == 429:
            break
        assert_invalid_client(response)
    assert_throttled(response)
    assert_throttled(attempt(throttled, str(uuid.uuid4()), WRONG_SECRET, source=source))
    assert_throttled(attempt(throttled, app_a.client_id, WRONG_SECRET, source=source))
    # A blocked address is a blocked address for failures only.
    assert_token(attempt(throttled, app_a.client_id, app_a.client_secret, source=source))
    assert_token(
        attempt(throttled, app_a.client_id, app_a.client_secret, source=source, use_basic=True)
    )
    assert_token(attempt(throttled, app_a.client_id, app_a.client_secret, source=elsewhere))
    assert_invalid_client(attempt(throttled, str(uuid.uuid4()), WRONG_SECRET, source=elsewhere))


# X-Forwarded-For


def test_without_trusted_proxies_x_forwarded_for_is_ignored(
    throttled: Server, app_a: AppCredentials
) -> None:
    peer = fresh_address()
    block(throttled, app_a.client_id, source=peer, forwarded_for="198.51.100.7")
    # Another forwarded address from the same peer is the same (blocked) source.
    for forwarded in ("198.51.100.8", None):
        response = attempt(
            throttled, app_a.client_id, WRONG_SECRET, source=peer, forwarded_for=forwarded
        )
        assert_throttled(response)
    assert_invalid_client(attempt(throttled, app_a.client_id, WRONG_SECRET, source=fresh_address()))


@pytest.fixture(scope="module")
def behind_proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Env]]:
    env = Env(
        tmp_path_factory.mktemp("proxied"),
        extra={**LIMITS, "LEANAUTH_TRUSTED_PROXIES": "127.0.0.1"},
    )
    running = start_server(env)
    yield running, env
    running.stop()


def test_with_trusted_proxies_x_forwarded_for_decides_the_source(
    behind_proxy: tuple[Server, Env],
) -> None:
    server, env = behind_proxy
    app = create_app(env, "--name", "Proxied app", "--scopes", "api")
    wait_known(server, app)
    proxy = "127.0.0.1"
    block(server, app.client_id, source=proxy, forwarded_for="198.51.100.7")

    def wrong_secret(forwarded_for: str | None, source: str = proxy) -> httpx.Response:
        return attempt(
            server, app.client_id, WRONG_SECRET, source=source, forwarded_for=forwarded_for
        )

    assert_throttled(wrong_secret("198.51.100.7"))
    # The nearest hop that is not a trusted proxy is the client.
    assert_throttled(wrong_secret("203.0.113.9, 198.51.100.7"))
    assert_throttled(wrong_secret("[198.51.100.7]:4711"))
    # Another client behind the same proxy is another pair, and so is the proxy itself.
    assert_invalid_client(wrong_secret("198.51.100.8"))
    assert_invalid_client(wrong_secret(None))
    # A peer that is not a trusted proxy cannot choose its source by the header.
    assert_invalid_client(wrong_secret("198.51.100.7", source="127.0.0.2"))
    # The blocked client's right secret still works.
    response = attempt(
        server, app.client_id, app.client_secret, source=proxy, forwarded_for="198.51.100.7"
    )
    assert_token(response)


# Cluster-wide, with Redis


@pytest.fixture(scope="module")
def redis_nodes(
    tmp_path_factory: pytest.TempPathFactory, postgres: PostgresDatabases, redis_url: str
) -> Iterator[tuple[Env, list[Server]]]:
    env = Env(
        tmp_path_factory.mktemp("throttle-cluster"),
        extra={
            **LIMITS,
            "LEANAUTH_DATABASE_URL": postgres.create(),
            "LEANAUTH_KEY_ENCRYPTION_KEY": os.urandom(32).hex(),
            "LEANAUTH_REDIS_URL": redis_url,
        },
    )
    env.cli("init")
    with ThreadPoolExecutor(2) as pool:
        servers = list(pool.map(lambda _: start_server(env), range(2)))
    yield env, servers
    for server in servers:
        server.stop()


def node_has_blocked(server: Server, client_id: str | None, source: str) -> bool:
    """Whether the node has logged a block of this pair (or, for a client id of its own,
    of this source): read from its log, since asking by a failure would count one more."""
    log = server.log()
    return (
        f"blocked for pair/{client_id}/{source} " in log or f"blocked for address/{source} " in log
    )


def cluster_app(env: Env, servers: list[Server]) -> AppCredentials:
    app = create_app(env, "--name", "Cluster throttled app", "--scopes", "api")
    for server in servers:
        wait_known(server, app)
    return app


def test_failures_on_one_node_count_toward_the_limit_on_another(
    redis_nodes: tuple[Env, list[Server]],
) -> None:
    env, (node_a, node_b) = redis_nodes
    app = cluster_app(env, [node_a, node_b])
    source = fresh_address()
    for _ in range(PAIR_LIMIT - 1):
        assert_invalid_client(attempt(node_a, app.client_id, WRONG_SECRET, source=source))
    assert_invalid_client(attempt(node_b, app.client_id, WRONG_SECRET, source=source))
    # Past the limit in all, but only a few failures on node B: B refuses the pair (failures
    # are counted in Redis in the background, so the block may take a failure or two more).
    wait_for(
        lambda: attempt(node_b, app.client_id, WRONG_SECRET, source=source).status_code == 429,
        timeout=1.0,
    )
    assert_throttled(attempt(node_a, app.client_id, WRONG_SECRET, source=source))
    assert_token(attempt(node_b, app.client_id, app.client_secret, source=source))


def test_a_block_on_one_node_reaches_the_other_within_a_second(
    redis_nodes: tuple[Env, list[Server]],
) -> None:
    env, (node_a, node_b) = redis_nodes
    app = cluster_app(env, [node_a, node_b])
    source, elsewhere = fresh_address(), fresh_address()
    block(node_a, app.client_id, source=source)
    # Node B saw no failure of this pair; it hears of the block (a first failure on B would
    # start B's own count at 1, far from the limit).
    wait_for(lambda: node_has_blocked(node_b, app.client_id, source), timeout=1.0)
    assert_throttled(attempt(node_b, app.client_id, WRONG_SECRET, source=source))
    for node in (node_a, node_b):
        assert_token(attempt(node, app.client_id, app.client_secret, source=source))
        assert_invalid_client(attempt(node, app.client_id, WRONG_SECRET, source=elsewhere))


def test_a_blocked_address_on_one_node_is_blocked_on_the_other(
    redis_nodes: tuple[Env, list[Server]],
) -> None:
    env, (node_a, node_b) = redis_nodes
    app = cluster_app(env, [node_a, node_b])
    source = fresh_address()
    for i in range(ADDRESS_LIMIT + 2):
        node = (node_a, node_b)[i % 2]
        response = attempt(node, str(uuid.uuid4()), WRONG_SECRET, source=source)
        if response.status_code == 429:
            break
        assert_invalid_client(response)
    assert_throttled(response)
    for node in (node_a, node_b):
        wait_for(lambda n=node: node_has_blocked(n, None, source), timeout=1.0)
        assert_token(attempt(node, app.client_id, app.client_secret, source=source))


def test_an_installation_on_another_redis_database_hears_no_block(
    redis_nodes: tuple[Env, list[Server]], redis_url: str, tmp_path: Path
) -> None:
    """Blocks and change notifications travel on pub/sub channels, which Redis shares across
    its databases: an installation on another database of the same server must not take
    this one's blocks."""
    _, (node_a, _) = redis_nodes
    base, database = redis_url.rsplit("/", 1)
    elsewhere_url = f"{base}/{int(database) - 1}"
    other = Env(tmp_path, extra={**LIMITS, "LEANAUTH_REDIS_URL": elsewhere_url})
    with serving(other) as node_c:
        app = create_app(other, "--name", "Elsewhere", "--scopes", "api")
        wait_known(node_c, app)
        source = fresh_address()
        for _ in range(ADDRESS_LIMIT + 2):
            response = attempt(node_a, str(uuid.uuid4()), WRONG_SECRET, source=source)
            if response.status_code == 429:
                break
        assert_throttled(response)
        # Node A's installation hears its own block at once (the test above); node C never.
        time.sleep(1.0)
        assert not node_has_blocked(node_c, None, source)
        assert_invalid_client(attempt(node_c, app.client_id, WRONG_SECRET, source=source))


def test_an_unreachable_redis_leaves_the_local_count_in_charge(tmp_path: Path) -> None:
    """With Redis down the cluster-wide count is lost for a while, never the limit: each
    process still counts failures itself (it used to fail open)."""
    dead_redis = f"redis://127.0.0.1:{free_port()}/0"
    env = Env(tmp_path, extra={**LIMITS, "LEANAUTH_REDIS_URL": dead_redis})
    app = create_app(env, "--name", "No Redis app", "--scopes", "api")
    with serving(env) as server:
        wait_known(server, app)
        source = fresh_address()
        for _ in range(PAIR_LIMIT):
            assert_invalid_client(attempt(server, app.client_id, WRONG_SECRET, source=source))
        assert_throttled(attempt(server, app.client_id, WRONG_SECRET, source=source))
        assert_token(attempt(server, app.client_id, app.client_secret, source=source))


@contextmanager
def silent_redis() -> Iterator[str]:
    """A "Redis" that accepts connections and never answers: the way a hung server looks."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=128)
    listener.settimeout(0.1)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                accepted.append(listener.accept()[0])

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"redis://127.0.0.1:{listener.getsockname()[1]}/0"
    finally:
        stop.set()
        thread.join()
        for connection in accepted:
            connection.close()
        listener.close()


def test_a_redis_that_never_answers_holds_no_request_and_the_limit_still_holds(
    tmp_path: Path,
) -> None:
    cli_env = Env(tmp_path, extra=LIMITS)
    app = create_app(cli_env, "--name", "Hung Redis app", "--scopes", "api")
    with silent_redis() as url:
        env = Env(tmp_path, extra={**LIMITS, "LEANAUTH_REDIS_URL": url})
        with serving(env) as server:
            wait_known(server, app)
            source = fresh_address()
            started = time.monotonic()
            for _ in range(PAIR_LIMIT):
                assert_invalid_client(attempt(server, app.client_id, WRONG_SECRET, source=source))
            assert_throttled(attempt(server, app.client_id, WRONG_SECRET, source=source))
            assert_token(attempt(server, app.client_id, app.client_secret, source=source))
            # Seven requests; a worker used to wait seconds on Redis for each failure.
            assert time.monotonic() - started < 3.0


def test_behind_a_load_balancer_failures_never_lock_out_the_real_app(
    throttled: Server, app_a: AppCredentials
) -> None:
    """Without LEANAUTH_TRUSTED_PROXIES every client has the balancer's address: an attacker
    who knows a client id (it is in every customer token's ``sub``) spends the pair's and the
    address's allowance, and the real app, behind the same balancer, still gets its tokens."""
    balancer = fresh_address()
    for _ in range(PAIR_LIMIT + 1):
        attempt(throttled, app_a.client_id, WRONG_SECRET, source=balancer)
    for _ in range(ADDRESS_LIMIT + 1):
        attempt(throttled, str(uuid.uuid4()), WRONG_SECRET, source=balancer)
    assert_throttled(attempt(throttled, app_a.client_id, WRONG_SECRET, source=balancer))
    assert_throttled(attempt(throttled, str(uuid.uuid4()), WRONG_SECRET, source=balancer))
    for use_basic in (False, True):
        assert_token(
            attempt(
                throttled,
                app_a.client_id,
                app_a.client_secret,
                source=balancer,
                use_basic=use_basic,
            )
        )


def audited_sources(env: Env, app: AppCredentials) -> set[str]:
    return {e["source"] or "" for e in env.cli("audit", "list", "--app", app.client_id)}


@pytest.fixture(scope="module")
def dual_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Env]]:
    """A server listening on ``::`` with two workers (one dual-stack socket): IPv4 clients
    arrive as ``::ffff:a.b.c.d``."""
    env = Env(
        tmp_path_factory.mktemp("dual-stack"),
        extra={
            **LIMITS,
            "LEANAUTH_TRUSTED_PROXIES": "127.0.0.1",
            "LEANAUTH_HOST": "::",
            # Required on an address that is not loopback.
            "LEANAUTH_ISSUER": "https://auth.example.test",
        },
    )
    running = start_server(env, None, "--workers", "2")
    try:
        yield running, env
    finally:
        running.stop()


def test_trusted_proxies_match_ipv4_mapped_peers(dual_stack: tuple[Server, Env]) -> None:
    """The proxy (127.0.0.1, seen as ``::ffff:127.0.0.1``) is trusted, so the forwarded
    address is the source; and addresses are kept in one spelling, IPv4 as IPv4."""
    server, env = dual_stack
    app = create_app(env, "--name", "Dual-stack app", "--scopes", "api")
    wait_known(server, app)
    for forwarded in ("198.51.100.21", None):
        response = attempt(
            server, app.client_id, WRONG_SECRET, source="127.0.0.1", forwarded_for=forwarded
        )
        assert_invalid_client(response)
    wait_for(lambda: {"198.51.100.21", "127.0.0.1"} <= audited_sources(env, app))
    assert not any(s.startswith("::ffff:") for s in audited_sources(env, app))


def test_ipv6_sources_are_counted_per_64(behind_proxy: tuple[Server, Env]) -> None:
    server, env = behind_proxy
    app = create_app(env, "--name", "IPv6 app", "--scopes", "api")
    wait_known(server, app)
    prefix = f"2001:db8:{random.randint(1, 0xFFFF):x}:1"
    block(server, app.client_id, source="127.0.0.1", forwarded_for=f"{prefix}::1")
    # Another address of the same /64 is the same source; the next /64 is another.
    for host in ("::2", ":ffff:ffff:ffff:ffff"):
        response = attempt(
            server, app.client_id, WRONG_SECRET, source="127.0.0.1", forwarded_for=prefix + host
        )
        assert_throttled(response)
    other = prefix[:-1] + "2::1"
    response = attempt(server, app.client_id, WRONG_SECRET, source="127.0.0.1", forwarded_for=other)
    assert_invalid_client(response)
    # The audit trail keeps the whole address, not the /64.
    wait_for(lambda: f"{prefix}::2" in audited_sources(env, app))
