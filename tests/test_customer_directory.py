"""Customer tokens from the directory every worker holds: customers created a moment ago on
another node are found on first try, removed and foreign ones are refused, unknown ids cost
the database nothing, and the view never empties while it reloads."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest

from conftest import (
    RELAXED_THROTTLE,
    AppCredentials,
    Env,
    PostgresDatabases,
    Server,
    create_app,
    installation,
    new_token,
    request_token,
    serving,
    start_server,
    wait_for,
    wait_until_known,
)
from leanauth.bootstrap import open_runtime
from leanauth.cache import RegistryCache
from leanauth.directory import NewIdLookups, id_key
from leanauth.registry import time_ordered_uuid
from leanauth.settings import Settings

# Polling slower than a test's requests: a node learns of a new customer only by a
# notification (PostgreSQL) or by asking the store (a possibly new id).
POLL_SECONDS = 5
SLOW_POLL = {
    "LEANAUTH_REFRESH_INTERVAL": str(POLL_SECONDS),
    "LEANAUTH_INTROSPECTION_MAX_STALENESS": str(2 * POLL_SECONDS),
}


def create_customer(server: Server, app: AppCredentials, app_user_id: str) -> str:
    response = httpx.post(
        server.url + "/customers/v1/",
        json={"app_user_id": app_user_id},
        headers={"Authorization": f"Bearer {new_token(server, app)}"},
        timeout=10,
    )
    assert response.status_code == 201, response.text
    return str(response.json()["customer_id"])


def customer_token_status(server: Server, app: AppCredentials, customer_id: str) -> int:
    return request_token(server, app, f"customer.{customer_id}").status_code


Nodes = tuple[Env, list[Server], AppCredentials, AppCredentials]


@pytest.fixture(params=["sqlite", "postgresql"])
def two_nodes(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Nodes]:
    """Two servers on one database, each polling the change feed only every 5 s, and two
    apps they know from the start."""
    if request.param == "sqlite":
        env = Env(tmp_path, extra={**SLOW_POLL, **RELAXED_THROTTLE})
    else:
        databases: PostgresDatabases = request.getfixturevalue("postgres")
        env = installation(tmp_path, databases.create(), **SLOW_POLL, **RELAXED_THROTTLE)
    app = create_app(env, "--name", "Directory app")
    other = create_app(env, "--name", "Other app")
    nodes = [start_server(env), start_server(env)]
    try:
        for node in nodes:
            wait_until_known(node, app)
            wait_until_known(node, other)
        yield env, nodes, app, other
    finally:
        for node in nodes:
            node.stop()


def test_a_customer_created_on_one_node_gets_a_token_on_the_other_at_once(
    two_nodes: Nodes,
) -> None:
    _, (node_a, node_b), app, _ = two_nodes
    for n in range(5):
        customer_id = create_customer(node_a, app, f"new-user-{n}")
        assert customer_token_status(node_b, app, customer_id) == 200
        assert customer_token_status(node_a, app, customer_id) == 200


def test_a_customer_created_by_the_cli_gets_a_token_at_once(
    two_nodes: Nodes,
) -> None:
    env, nodes, app, _ = two_nodes
    customer_id = env.cli("customers", "create", "--app", app.client_id, "--app-user-id", "cli")[
        "customer_id"
    ]
    for node in nodes:
        assert customer_token_status(node, app, customer_id) == 200


def test_a_removed_customer_is_refused_on_every_node(
    two_nodes: Nodes,
) -> None:
    env, nodes, app, _ = two_nodes
    customer_id = create_customer(nodes[0], app, "soon-removed")
    for node in nodes:
        assert customer_token_status(node, app, customer_id) == 200
    env.cli("customers", "delete", "--app", app.client_id, customer_id)
    # PostgreSQL notifies at once; two SQLite servers hear of it at their next poll.
    timeout = 1.0 if "postgresql" in env.vars["LEANAUTH_DATABASE_URL"] else POLL_SECONDS + 1.0
    for node in nodes:
        wait_for(lambda n=node: customer_token_status(n, app, customer_id) == 400, timeout)


def test_a_customer_of_another_app_is_refused_even_when_new(
    two_nodes: Nodes,
) -> None:
    _, (node_a, node_b), app, other = two_nodes
    theirs = create_customer(node_a, other, "theirs")
    response = request_token(node_b, app, f"customer.{theirs}")
    assert response.status_code == 400, response.text
    assert response.json()["error"] == "invalid_scope"
    assert customer_token_status(node_b, other, theirs) == 200


def database_transactions(url: str) -> int:
    name = url.rsplit("/", 1)[1]
    base = url.rsplit("/", 1)[0]
    with psycopg.connect(f"{base}/postgres", autocommit=True) as conn:
        row = conn.execute(
            "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = %s",
            (name,),
        ).fetchone()
    assert row is not None
    return int(row[0])


def test_unknown_customer_ids_cost_the_database_nothing(
    tmp_path: Path, postgres: PostgresDatabases
) -> None:
    """An authenticated app hammering random customer ids: an id made before the directory's
    last update is answered from memory; a possibly new one is asked about once, and an app
    may cause only so many such look-ups."""
    url = postgres.create()
    env = installation(tmp_path, url, **SLOW_POLL, **RELAXED_THROTTLE)
    app = create_app(env, "--name", "Hammering app")
    with serving(env) as server, httpx.Client(timeout=10) as client:
        wait_until_known(server, app)

        def refused(customer_id: str) -> int:
            form = {
                "grant_type": "client_credentials",
                "client_id": app.client_id,
                "client_secret": app.client_secret,
                "scope": f"customer.{customer_id}",
            }
            return client.post(server.token_url, data=form).status_code

        old_ids = [str(uuid.uuid4()) for _ in range(300)]
        old_ids += [str(uuid.UUID(int=(1 << 79) | (0x7 << 76) | n)) for n in range(100)]
        time.sleep(1.5)  # let the start-up's own writes settle
        before = database_transactions(url)
        assert {refused(customer_id) for customer_id in old_ids} == {400}
        # The background flush writes a few transactions a second; 400 look-ups would show.
        assert database_transactions(url) - before < 40

        new_id = str(time_ordered_uuid()[0])
        before = database_transactions(url)
        assert {refused(new_id) for _ in range(50)} == {400}
        assert database_transactions(url) - before < 30


def test_new_id_lookups_are_bounded() -> None:
    lookups = NewIdLookups(per_second=3, remembered=100)
    for n in range(1000):
        lookups.remember_missing(n.to_bytes(16, "big"))
    assert not lookups.known_missing((0).to_bytes(16, "big"))
    assert lookups.known_missing((999).to_bytes(16, "big"))
    assert [lookups.allow("app", 1000.0) for _ in range(5)] == [True] * 3 + [False] * 2
    assert lookups.allow("app", 1001.0)
    assert lookups.allow("other", 1000.0)


def test_the_view_never_empties_while_it_reloads(tmp_path: Path) -> None:
    """A full load is built aside and swapped in whole: a look-up during a reload finds every
    customer, and a customer added meanwhile is not lost by the swap."""
    env = Env(tmp_path)
    app = create_app(env, "--name", "Reloaded app")
    settings = Settings.from_env(env.vars)
    runtime = open_runtime(settings)
    try:
        customers = [f"reload-{n}" for n in range(300)]
        ids = [
            env.cli("customers", "create", "--app", app.client_id, "--app-user-id", u)[
                "customer_id"
            ]
            for u in customers[:30]
        ]
        cache = RegistryCache(runtime.store, runtime.cipher, 1.0)
        cache.load()
        stop = threading.Event()

        def reload_again_and_again() -> None:
            while not stop.is_set():
                cache.load()

        reloader = threading.Thread(target=reload_again_and_again)
        reloader.start()
        try:
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline:
                for customer_id in ids:
                    assert cache.directory.owner(id_key(customer_id), app.client_id) is True
        finally:
            stop.set()
            reloader.join()
        # A customer created after the load, and read from the feed, stays known.
        late = env.cli("customers", "create", "--app", app.client_id, "--app-user-id", "late")
        cache.apply_changes()
        assert cache.directory.owner(id_key(late["customer_id"]), app.client_id) is True
    finally:
        runtime.store.close()


def test_refused_scopes_past_the_limit_get_429_and_the_right_ones_still_work(
    tmp_path: Path,
) -> None:
    env = Env(tmp_path, extra={"LEANAUTH_SCOPE_FAILURE_LIMIT": "5 per minute"})
    app = create_app(env, "--name", "Scope failures")
    customer_id = env.cli("customers", "create", "--app", app.client_id, "--app-user-id", "u")[
        "customer_id"
    ]
    with serving(env) as server:
        wait_until_known(server, app)
        for _ in range(5):
            assert customer_token_status(server, app, str(uuid.uuid4())) == 400
        response = request_token(server, app, f"customer.{uuid.uuid4()}")
        assert response.status_code == 429, response.text
        assert response.json()["error"] == "too_many_requests"
        assert int(response.headers["retry-after"]) >= 1
        assert request_token(server, app, "nonsense").status_code == 429
        # Requests that are right are never refused by the limit.
        assert customer_token_status(server, app, customer_id) == 200
        assert request_token(server, app).status_code == 200
