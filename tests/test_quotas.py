"""Per-app token quotas per UTC hour and day, and the usage counts behind them, against
real servers (one SQLite node, and two nodes sharing one PostgreSQL database)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import (
    RELAXED_THROTTLE,
    AppCredentials,
    Env,
    PostgresDatabases,
    Server,
    create_app,
    request_token,
    serving,
    start_server,
    wait_for,
)

# Waiting for a new app sends failing requests; the throttle must not mind them.


def away_from_the_hour_edge(margin: float = 20.0) -> None:
    """Quotas count per UTC hour: do not start a test that would straddle two hours."""
    left = 3600 - time.time() % 3600
    if left < margin:
        time.sleep(left + 0.5)


def wait_known(server: Server, creds: AppCredentials) -> None:
    """Wait until the server knows a new app without spending its quota: a known app asking
    for an unknown scope gets 400 invalid_scope (an unknown app gets 401)."""
    wait_for(lambda: request_token(server, creds, scope="nonsense").status_code == 400)


def assert_over_quota(response: httpx.Response, quota: int, per: str) -> None:
    assert response.status_code == 429, response.text
    body = response.json()
    assert body["error"] == "too_many_requests"
    assert f"{quota} tokens per {per}" in body["error_description"]
    assert response.headers["cache-control"] == "no-store"
    retry_after = response.headers["retry-after"]
    assert retry_after.isdigit(), retry_after
    # Until the window (the UTC hour or day) ends.
    window = 3600 if per == "hour" else 86_400
    left = window - time.time() % window
    assert 1 <= int(retry_after) <= window + 1
    assert abs(int(retry_after) - left) <= 3


def usage(env: Env, creds: AppCredentials) -> dict[str, Any]:
    return dict(env.cli("apps", "show", creds.client_id)["usage"])


@pytest.fixture(scope="module")
def quota_env(tmp_path_factory: pytest.TempPathFactory) -> Env:
    return Env(tmp_path_factory.mktemp("quotas"), extra=RELAXED_THROTTLE)


@pytest.fixture(scope="module")
def node(quota_env: Env) -> Iterator[Server]:
    with serving(quota_env) as running:
        yield running


def new_app(env: Env, server: Server, *options: str) -> AppCredentials:
    created = create_app(env, "--name", "Quota app", "--scopes", "api", *options)
    wait_known(server, created)
    return created


def test_an_hourly_quota_refuses_the_token_after_the_last(quota_env: Env, node: Server) -> None:
    away_from_the_hour_edge()
    app = new_app(quota_env, node, "--quota-hourly", "3")
    assert app.raw["quota_hourly"] == 3
    for _ in range(3):
        response = request_token(node, app)
        assert response.status_code == 200, response.text
    assert_over_quota(request_token(node, app), 3, "hour")
    assert_over_quota(request_token(node, app), 3, "hour")


def test_a_daily_quota_refuses_the_token_after_the_last(quota_env: Env, node: Server) -> None:
    away_from_the_hour_edge()
    app = new_app(quota_env, node, "--quota-daily", "2")
    assert app.raw["quota_daily"] == 2
    for _ in range(2):
        response = request_token(node, app)
        assert response.status_code == 200, response.text
    assert_over_quota(request_token(node, app), 2, "day")


def test_the_stricter_of_two_quotas_applies(quota_env: Env, node: Server) -> None:
    away_from_the_hour_edge()
    app = new_app(quota_env, node, "--quota-hourly", "5", "--quota-daily", "2")
    for _ in range(2):
        assert request_token(node, app).status_code == 200
    assert_over_quota(request_token(node, app), 2, "day")


def test_an_app_without_a_quota_is_not_limited(quota_env: Env, node: Server) -> None:
    app = new_app(quota_env, node)
    assert app.raw["quota_hourly"] is None
    assert app.raw["quota_daily"] is None
    with httpx.Client(timeout=10) as client:
        form = {
            "grant_type": "client_credentials",
            "client_id": app.client_id,
            "client_secret": app.client_secret,
            "scope": "api",
        }
        statuses = [client.post(node.token_url, data=form).status_code for _ in range(40)]
    assert statuses == [200] * 40


def test_set_quota_changes_and_removes_a_quota_on_the_running_server(
    quota_env: Env, node: Server
) -> None:
    away_from_the_hour_edge(margin=40)
    app = new_app(quota_env, node, "--quota-hourly", "2")
    for _ in range(2):
        assert request_token(node, app).status_code == 200
    assert_over_quota(request_token(node, app), 2, "hour")

    # Raised: the running server allows more within about two seconds (the refusals while
    # waiting do not count).
    changed = quota_env.cli("apps", "set-quota", app.client_id, "--quota-hourly", "4")
    assert changed["quota_hourly"] == 4
    wait_for(lambda: request_token(node, app).status_code == 200, timeout=2.0)
    assert request_token(node, app).status_code == 200
    assert_over_quota(request_token(node, app), 4, "hour")

    # Lowered below what was used: refused at once.
    quota_env.cli("apps", "set-quota", app.client_id, "--quota-hourly", "1")
    wait_for(
        lambda: "1 tokens per hour" in request_token(node, app).json().get("error_description", ""),
        timeout=2.0,
    )

    # Removed (no option): not limited any more.
    removed = quota_env.cli("apps", "set-quota", app.client_id)
    assert removed["quota_hourly"] is None
    assert removed["quota_daily"] is None
    wait_for(lambda: request_token(node, app).status_code == 200, timeout=2.0)
    for _ in range(5):
        assert request_token(node, app).status_code == 200
    shown = quota_env.cli("apps", "show", app.client_id)
    assert shown["quota_hourly"] is None
    assert shown["quota_daily"] is None


def test_usage_counts_issued_tokens_and_no_refusals(quota_env: Env, node: Server) -> None:
    away_from_the_hour_edge()
    app = new_app(quota_env, node, "--quota-hourly", "3")
    assert usage(quota_env, app) == {"this_hour": 0, "today": 0}
    wrong = AppCredentials(app.client_id, "lsk_" + "x" * 43, {})
    for _ in range(3):
        assert request_token(node, wrong).status_code == 401
        assert request_token(node, app, scope="customer.nonsense").status_code == 400
    assert request_token(node, app, scope="customer").status_code == 400
    for _ in range(3):
        assert request_token(node, app).status_code == 200
    for _ in range(3):
        assert request_token(node, app).status_code == 429
    # Written once a second.
    wait_for(lambda: usage(quota_env, app) == {"this_hour": 3, "today": 3}, timeout=3.0)
    time.sleep(1.5)
    assert usage(quota_env, app) == {"this_hour": 3, "today": 3}


def test_usage_is_counted_without_a_quota_too(quota_env: Env, node: Server) -> None:
    away_from_the_hour_edge()
    app = new_app(quota_env, node)
    for _ in range(4):
        assert request_token(node, app).status_code == 200
    wait_for(lambda: usage(quota_env, app) == {"this_hour": 4, "today": 4}, timeout=3.0)


# Two nodes on one PostgreSQL database


@pytest.fixture(scope="module")
def pg_nodes(
    tmp_path_factory: pytest.TempPathFactory, postgres: PostgresDatabases
) -> Iterator[tuple[Env, list[Server]]]:
    env = Env(
        tmp_path_factory.mktemp("quota-cluster"),
        extra={
            **RELAXED_THROTTLE,
            "LEANAUTH_DATABASE_URL": postgres.create(),
            "LEANAUTH_KEY_ENCRYPTION_KEY": os.urandom(32).hex(),
        },
    )
    env.cli("init")
    with ThreadPoolExecutor(2) as pool:
        servers = list(pool.map(lambda _: start_server(env), range(2)))
    yield env, servers
    for server in servers:
        server.stop()


def test_a_quota_holds_across_two_nodes(pg_nodes: tuple[Env, list[Server]]) -> None:
    env, servers = pg_nodes
    away_from_the_hour_edge(margin=40)
    app = create_app(env, "--name", "Cluster quota app", "--scopes", "api", "--quota-hourly", "10")
    for server in servers:
        wait_known(server, app)
    statuses: list[int] = []
    for i in range(18):
        response = request_token(servers[i % 2], app)
        assert response.status_code in (200, 429), response.text
        statuses.append(response.status_code)
        time.sleep(0.3)
    issued = statuses.count(200)
    # Totals are shared once a second: at most a flush interval's tokens over.
    assert 10 <= issued <= 12, statuses
    # Once the totals are shared, both nodes refuse.
    time.sleep(1.5)
    for server in servers:
        assert_over_quota(request_token(server, app), 10, "hour")
    wait_for(lambda: usage(env, app)["this_hour"] == issued, timeout=3.0)


def test_usage_outlives_a_restart_and_the_quota_with_it(tmp_path: Path) -> None:
    away_from_the_hour_edge()
    env = Env(tmp_path, extra=RELAXED_THROTTLE)
    app = create_app(env, "--name", "Restarted app", "--scopes", "api", "--quota-hourly", "3")
    server = start_server(env)
    try:
        for _ in range(3):
            assert request_token(server, app).status_code == 200
    finally:
        # At once: what the last second's requests counted is written on the way out.
        server.stop()
    assert usage(env, app) == {"this_hour": 3, "today": 3}
    server = start_server(env)
    try:
        assert_over_quota(request_token(server, app), 3, "hour")
    finally:
        server.stop()
