"""A node whose clock is off from the database's says so, in its log and in /readyz.

Real servers on one PostgreSQL installation, two of them under libfaketime (their clocks
shifted, the database's not): +10 s is past LEANAUTH_MAX_CLOCK_SKEW (5 s) but within the
30 s tokens allow between nodes, so the node is ready with a warning; +45 s is past that
too, so it is not ready. The log lines for a clock that comes back are checked on the
check itself, with a database whose clock the test sets."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator

import httpx
import pytest

from conftest import (
    Env,
    PostgresDatabases,
    Server,
    free_port,
    installation,
    launch,
    needs_faketime,
    shifted_clock,
    wait_for,
)
from leanauth.clock import ClockCheck
from leanauth.owntokens import TOKEN_TIME_LEEWAY

AHEAD = re.compile(r"this node's clock is (\d+\.\d)s ahead of the database's")


def launch_shifted(env: Env, offset: str | None) -> Server:
    """``leanauth serve`` on ``env``, its clock shifted by ``offset`` (``+10s``), started
    without waiting for it (conftest's start_server waits for a ready node: one whose
    clock is far off never is)."""
    return launch(env, free_port(), **(shifted_clock(offset) if offset else {}))


def measured_readiness(server: Server) -> httpx.Response:
    """/readyz once the node has measured its clock (its first check runs at start)."""
    answer: list[httpx.Response] = []

    def measured() -> bool:
        assert server.process.poll() is None, server.log()
        try:
            response = httpx.get(server.url + "/readyz", timeout=2)
        except httpx.HTTPError:
            return False
        answer[:] = [response]
        return "clock_offset" in response.json()

    wait_for(measured, timeout=30, interval=0.1)
    return answer[0]


@pytest.fixture(scope="module")
def nodes(
    tmp_path_factory: pytest.TempPathFactory, postgres: PostgresDatabases
) -> Iterator[dict[str, Server]]:
    env = installation(tmp_path_factory.mktemp("clock-database"), postgres.create())
    running = {"real": launch_shifted(env, None), "ahead": launch_shifted(env, "+10s")}
    running["far ahead"] = launch_shifted(env, "+45s")
    try:
        yield running
    finally:
        for server in running.values():
            server.stop()


@needs_faketime
def test_a_node_on_the_databases_time_has_no_warning(nodes: dict[str, Server]) -> None:
    server = nodes["real"]
    response = measured_readiness(server)
    body = response.json()
    assert response.status_code == 200, body
    assert abs(body["clock_offset"]) < 1
    assert "warnings" not in body
    assert "this node's clock" not in server.log()


@needs_faketime
def test_a_node_ahead_past_the_bound_warns_and_stays_ready(nodes: dict[str, Server]) -> None:
    server = nodes["ahead"]
    response = measured_readiness(server)
    body = response.json()
    assert response.status_code == 200, body
    assert body["status"] == "ok"
    assert 9 < body["clock_offset"] < 11
    (warning,) = body["warnings"]
    assert AHEAD.search(warning), warning
    assert "LEANAUTH_MAX_CLOCK_SKEW" in warning
    wait_for(lambda: AHEAD.search(server.log()) is not None)
    (logged,) = AHEAD.findall(server.log())
    assert 9 < float(logged) < 11
    # Its tokens are good: 10 s is within what the token checks allow.
    assert httpx.get(server.url + "/livez", timeout=5).status_code == 200


@needs_faketime
def test_a_node_ahead_past_the_token_leeway_is_not_ready(nodes: dict[str, Server]) -> None:
    server = nodes["far ahead"]
    response = measured_readiness(server)
    body = response.json()
    assert response.status_code == 503, body
    assert body["status"] == "unavailable"
    assert body["reason"].startswith("clock "), body
    assert "ahead of the database's" in body["reason"]
    assert f"{TOKEN_TIME_LEEWAY}s" in body["reason"]
    assert 44 < body["clock_offset"] < 46
    healthz = httpx.get(server.url + "/healthz", timeout=5)
    assert healthz.status_code == 503
    wait_for(lambda: "not ready until its time is synchronised" in server.log())
    assert httpx.get(server.url + "/livez", timeout=5).status_code == 200


class DatabaseClock:
    """A store whose database clock is this process's, shifted by ``behind`` seconds."""

    def __init__(self) -> None:
        self.behind = 0.0

    def database_time(self) -> float:
        return time.time() - self.behind


def test_the_log_says_when_the_clock_passes_the_bound_and_when_it_is_back(
    caplog: pytest.LogCaptureFixture,
) -> None:
    database = DatabaseClock()
    check = ClockCheck(database, max_skew=5, leeway=TOKEN_TIME_LEEWAY)
    caplog.set_level(logging.WARNING, "leanauth.clock")

    def check_at(offset: float) -> list[str]:
        database.behind = offset
        caplog.clear()
        check.check()
        return [r.getMessage() for r in caplog.records]

    assert check_at(0.5) == []
    assert check.report() == {"clock_offset": pytest.approx(0.5, abs=0.05)}
    (ahead,) = check_at(7.3)
    assert "this node's clock is 7.3s ahead of the database's" in ahead
    assert check_at(7.4) == []
    assert check.not_ready() is None
    assert check.report()["warnings"]
    (far,) = check_at(-40)
    assert "40.0s behind the database's" in far
    assert "not ready" in far
    reason = check.not_ready()
    assert reason is not None
    assert reason.startswith("clock 40.0s behind")
    assert "warnings" not in check.report()
    (back,) = check_at(1)
    assert "back within LEANAUTH_MAX_CLOCK_SKEW 5s" in back
    assert check.not_ready() is None
    assert "warnings" not in check.report()


def test_a_database_without_a_clock_of_its_own_is_not_checked() -> None:
    class SqliteLike:
        def database_time(self) -> None:
            return None

    check = ClockCheck(SqliteLike(), max_skew=5, leeway=TOKEN_TIME_LEEWAY)
    check.check()
    assert check.offset is None
    assert check.report() == {}
    assert check.not_ready() is None


def test_a_slow_answer_is_no_measure() -> None:
    class SlowDatabase:
        def database_time(self) -> float:
            time.sleep(0.05)
            return time.time() - 20

    # A 50 ms round trip cannot tell a skew of 40 ms, however far off the answer looks.
    check = ClockCheck(SlowDatabase(), max_skew=0.04, leeway=TOKEN_TIME_LEEWAY)
    check.check()
    assert check.offset is None
