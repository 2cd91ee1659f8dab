"""Several nodes on one PostgreSQL (and optionally one Redis) behave as one server."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import jwt
import psycopg
import pytest

from conftest import (
    AppCredentials,
    Env,
    PostgresDatabases,
    Server,
    create_app,
    request_token,
    served_kids,
    start_server,
    wait_for,
)

# Polling is set far beyond the 1 s target: only a notification can make a node see a change
# in time.
SLOW_POLL = "30"


def cluster_env(tmp_path: Path, postgres: PostgresDatabases, **extra: str) -> Env:
    return Env(
        tmp_path,
        extra={
            "LEANAUTH_DATABASE_URL": postgres.create(),
            "LEANAUTH_KEY_ENCRYPTION_KEY": os.urandom(32).hex(),
            "LEANAUTH_REFRESH_INTERVAL": SLOW_POLL,
            "LEANAUTH_INTROSPECTION_MAX_STALENESS": str(2 * int(SLOW_POLL)),
            **extra,
        },
    )


def start_nodes(env: Env, count: int) -> list[Server]:
    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(lambda _: start_server(env), range(count)))


@pytest.fixture(params=["listen-notify", "redis"])
def nodes(
    request: pytest.FixtureRequest, tmp_path: Path, postgres: PostgresDatabases
) -> Iterator[tuple[Env, list[Server]]]:
    extra = {}
    if request.param == "redis":
        extra["LEANAUTH_REDIS_URL"] = request.getfixturevalue("redis_url")
    env = cluster_env(tmp_path, postgres, **extra)
    servers = start_nodes(env, 2)
    yield env, servers
    for server in servers:
        server.stop()


def token_kid(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return str(jwt.get_unverified_header(response.json()["access_token"])["kid"])


def test_every_node_sees_a_change_within_a_second(nodes: tuple[Env, list[Server]]) -> None:
    env, servers = nodes
    app = create_app(env, "--name", "Cluster app")
    for server in servers:
        wait_for(lambda s=server: request_token(s, app).status_code == 200, timeout=1.0)

    env.cli("apps", "disable", app.client_id)
    for server in servers:
        wait_for(lambda s=server: request_token(s, app).status_code == 401, timeout=1.0)

    env.cli("apps", "enable", app.client_id)
    for server in servers:
        wait_for(lambda s=server: request_token(s, app).status_code == 200, timeout=1.0)

    rotated = env.cli("apps", "rotate-secret", app.client_id, "--grace", "0")
    new = AppCredentials(app.client_id, rotated["client_secret"], rotated)
    for server in servers:
        wait_for(lambda s=server: request_token(s, app).status_code == 401, timeout=1.0)
        assert request_token(server, new).status_code == 200


def test_every_node_signs_with_a_rotated_key_within_a_second(
    nodes: tuple[Env, list[Server]],
) -> None:
    env, servers = nodes
    app = create_app(env, "--name", "Key app")
    for server in servers:
        wait_for(lambda s=server: request_token(s, app).status_code == 200, timeout=1.0)
    old_kid = token_kid(request_token(servers[0], app))

    new_kid = env.cli("keys", "rotate")["kid"]
    assert new_kid != old_kid
    for server in servers:
        wait_for(lambda s=server: token_kid(request_token(s, app)) == new_kid, timeout=1.0)
        assert served_kids(server) == {old_kid, new_kid}


def test_a_customer_created_on_one_node_works_on_every_node_at_once(
    nodes: tuple[Env, list[Server]],
) -> None:
    env, servers = nodes
    app = create_app(env, "--name", "Customer app")
    for server in servers:
        wait_for(lambda s=server: request_token(s, app).status_code == 200, timeout=1.0)
    customer = env.cli("customers", "create", "--app", app.client_id, "--app-user-id", "u1")
    for server in servers:
        response = request_token(server, app, scope=f"customer.{customer['customer_id']}")
        assert response.status_code == 200, response.text


def upgrade_at_once(env: Env, count: int, command: str = "db upgrade") -> None:
    """``leanauth COMMAND`` in ``count`` processes started together, as several nodes' deploy
    steps may run it: every one must succeed."""
    variables = {**os.environ, **env.vars}
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "leanauth", *command.split()],
            env=variables,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for _ in range(count)
    ]
    for process in processes:
        output, _ = process.communicate(timeout=60)
        assert process.returncode == 0, output.decode(errors="replace")


def test_nodes_upgraded_at_once_on_an_empty_database_migrate_once_and_make_one_key(
    tmp_path: Path, postgres: PostgresDatabases
) -> None:
    env = cluster_env(tmp_path, postgres)
    upgrade_at_once(env, 3)
    servers = start_nodes(env, 3)
    try:
        kids = [served_kids(server) for server in servers]
        assert len(kids[0]) == 1
        assert kids == [kids[0]] * 3
        with psycopg.connect(env.vars["LEANAUTH_DATABASE_URL"]) as conn:
            keys = conn.execute("SELECT count(*) FROM signing_keys").fetchone()
            versions = conn.execute("SELECT version_num FROM alembic_version").fetchall()
        assert keys == (1,)
        assert len(versions) == 1
    finally:
        for server in servers:
            server.stop()


def test_sqlite_installations_prepared_at_once_make_one_key(tmp_path: Path) -> None:
    env = Env(tmp_path)
    upgrade_at_once(env, 3, "init")
    servers = start_nodes(env, 3)
    try:
        kids = [served_kids(server) for server in servers]
        assert len(kids[0]) == 1
        assert kids == [kids[0]] * 3
    finally:
        for server in servers:
            server.stop()


def test_a_server_refuses_an_outdated_schema(tmp_path: Path, postgres: PostgresDatabases) -> None:
    env = cluster_env(tmp_path, postgres)
    env.cli("init")
    with psycopg.connect(env.vars["LEANAUTH_DATABASE_URL"], autocommit=True) as conn:
        conn.execute("UPDATE alembic_version SET version_num = '0003'")
    with pytest.raises(RuntimeError, match="leanauth db upgrade"):
        start_server(env)


def test_a_node_recovers_when_its_database_connections_are_cut(
    tmp_path: Path, postgres: PostgresDatabases
) -> None:
    """A failover or restart kills every connection: tokens keep being issued from memory,
    and database work (a customer lookup, the audit trail) resumes without a restart."""
    env = cluster_env(tmp_path, postgres, LEANAUTH_REFRESH_INTERVAL="0.2")
    server = start_server(env)
    try:
        app = create_app(env, "--name", "Failover app")
        wait_for(lambda: request_token(server, app).status_code == 200)
        name = env.vars["LEANAUTH_DATABASE_URL"].rsplit("/", 1)[1]
        with psycopg.connect(env.vars["LEANAUTH_DATABASE_URL"], autocommit=True) as admin:
            cut = admin.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid()",
                (name,),
            ).fetchone()
        assert cut is not None
        assert cut[0] >= 1
        assert request_token(server, app).status_code == 200
        customer = env.cli("customers", "create", "--app", app.client_id, "--app-user-id", "u9")
        scope = f"customer.{customer['customer_id']}"
        # At most one refusal while the pool finds its connections dead, then tokens again.
        statuses = [request_token(server, app, scope=scope).status_code for _ in range(3)]
        assert statuses[-1] == 200, statuses
        assert set(statuses) <= {200, 503}, statuses
        wait_for(
            lambda: any(
                e["outcome"] == "issued" and (e["detail"] or {}).get("scope") == scope
                for e in env.cli("audit", "list", "--app", app.client_id)
            ),
            timeout=5,
        )
    finally:
        server.stop()


def test_a_server_refuses_a_schema_one_migration_behind(tmp_path: Path) -> None:
    """A database left at an older revision: serve refuses with a one-line error naming the
    command, `db current` says it is behind, and `db upgrade` brings it to head."""
    from alembic import command

    from leanauth.store.migrate import _config, head_revision
    from leanauth.store.sql import SqlStore

    env = Env(tmp_path)
    store = SqlStore(env.vars["LEANAUTH_DATABASE_URL"])
    try:
        with store.engine.connect() as conn:
            command.upgrade(_config(conn), "0001")
            conn.commit()
    finally:
        store.close()
    with pytest.raises(RuntimeError, match="run `leanauth db upgrade`"):
        start_server(env)
    assert env.cli("db", "current") == {
        "revision": "0001",
        "head": head_revision(),
        "current": False,
        "state": "behind",
    }
    assert env.cli("db", "upgrade")["revision"] == head_revision()
    server = start_server(env)
    server.stop()
