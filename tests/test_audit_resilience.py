"""The audit trail under attack and outage: hostile request text is refused or bounded, a
record the database refuses is dropped alone, the queue stays within its bytes while the
database is away, and refusals cannot flood the log. On SQLite and PostgreSQL."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest

from conftest import (
    RELAXED_THROTTLE,
    AppCredentials,
    Env,
    PostgresDatabases,
    Server,
    create_app,
    installation,
    request_token,
    serving,
    wait_for,
    wait_until_known,
)
from leanauth.audit import AuditTrail
from leanauth.store.base import StoreError
from leanauth.store.engine import EngineOptions
from leanauth.store.sql import SqlStore

FLUSHED_WITHIN = 3.5
WRONG_SECRET = "lsk_" + "W" * 43


@contextmanager
def audited_server(
    tmp_path: Path, database_url: str, **extra: str
) -> Iterator[tuple[Env, Server, AppCredentials]]:
    env = installation(
        tmp_path, database_url, LEANAUTH_LOG_FORMAT="json", **RELAXED_THROTTLE, **extra
    )
    app = create_app(env, "--name", "Audited", "--scopes", "api")
    with serving(env) as server:
        wait_until_known(server, app)
        yield env, server, app


def post(server: Server, body: str) -> httpx.Response:
    headers = {"content-type": "application/x-www-form-urlencoded"}
    return httpx.post(server.token_url, content=body, headers=headers, timeout=10)


def audited_jtis(env: Env, app: AppCredentials) -> set[str]:
    events = env.cli("audit", "list", "--app", app.client_id)
    return {e["detail"]["jti"] for e in events if e["outcome"] == "issued"}


def issue_and_wait_audited(env: Env, server: Server, app: AppCredentials, timeout: float) -> None:
    response = request_token(server, app)
    assert response.status_code == 200, response.text
    claims = jwt.decode(response.json()["access_token"], options={"verify_signature": False})
    jti = claims["jti"]
    wait_for(lambda: jti in audited_jtis(env, app), timeout=timeout)


def log_records(server: Server) -> list[dict[str, Any]]:
    return [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]


def test_a_nul_in_a_request_is_refused_and_the_audit_trail_goes_on(
    tmp_path: Path, database_url: str
) -> None:
    """``client_id=x%00y`` once put a NUL into the audit batch; PostgreSQL refused it, the
    batch was retried forever, and every later event was lost."""
    with audited_server(tmp_path, database_url) as (env, server, app):
        for body in (
            "grant_type=client_credentials&scope=api&client_id=x%00y&client_secret=s",
            "grant_type=client_credentials&scope=api%00&client_id=x&client_secret=s",
            f"grant_type=client_credentials&scope=a%00pi&client_id={app.client_id}"
            f"&client_secret={app.client_secret}",
        ):
            response = post(server, body)
            assert response.status_code == 400, response.text
            assert response.json()["error"] == "invalid_request"
        issue_and_wait_audited(env, server, app, FLUSHED_WITHIN)


def test_attacker_text_is_bounded_in_the_audit_row_and_the_log(tmp_path: Path) -> None:
    """An unauthenticated request once wrote ~32 KB (its 16 KiB scope into the audit row and
    into the log line); what is kept of request text is bounded."""
    with audited_server(tmp_path, f"sqlite:///{tmp_path / 'leanauth.db'}") as (env, server, _):
        client_id, scope = "c" * 8000, "s" * 8000
        body = f"grant_type=client_credentials&scope={scope}&client_id={client_id}&client_secret=x"
        assert post(server, body).status_code == 401

        def refusal() -> dict[str, Any] | None:
            events = env.cli("audit", "list")
            return next((e for e in events if e["outcome"] == "invalid_client"), None)

        wait_for(lambda: refusal() is not None, timeout=FLUSHED_WITHIN)
        event = refusal()
        assert event is not None
        assert len(event["client_id"]) <= 64
        assert len(event["detail"]["scope"]) <= 128
        assert len(json.dumps(event)) < 2048
        lines = [line for line in server.log().splitlines() if "invalid_client" in line]
        assert lines
        assert all(len(line) < 2048 for line in lines), max(map(len, lines))


def test_refusals_cannot_flood_the_log(tmp_path: Path) -> None:
    """Anyone can cause refusals: past a hundred in one flush they are counted in one line
    instead of logged one by one. Every one still reaches the database."""
    database = f"sqlite:///{tmp_path / 'leanauth.db'}"
    with audited_server(tmp_path, database) as (env, server, app):
        body = (
            f"grant_type=client_credentials&scope=nonsense&client_id={app.client_id}"
            f"&client_secret={app.client_secret}"
        )
        refusals = 400
        with httpx.Client(timeout=10) as client, ThreadPoolExecutor(8) as pool:
            headers = {"content-type": "application/x-www-form-urlencoded"}
            statuses = list(
                pool.map(
                    lambda _: client.post(server.token_url, content=body, headers=headers),
                    range(refusals),
                )
            )
        assert {r.status_code for r in statuses} == {400}

        def audited() -> int:
            events = env.cli("audit", "list", "--app", app.client_id, "--limit", "5000")
            return sum(1 for e in events if e["outcome"] == "invalid_scope")

        wait_for(lambda: audited() == refusals, timeout=FLUSHED_WITHIN * 2)
        records = log_records(server)
        logged = sum(1 for r in records if '"invalid_scope"' in r["message"])
        assert logged < refusals
        assert any("were recorded but not logged" in r["message"] for r in records)


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_while_the_database_is_away_the_audit_queue_keeps_within_its_bytes(
    tmp_path: Path, postgres: PostgresDatabases
) -> None:
    url = postgres.create()
    with audited_server(tmp_path, url, LEANAUTH_AUDIT_QUEUE_MB="1") as (env, server, app):
        before = rss_bytes(server.process.pid)
        scope = "s" * 15_000
        with postgres.offline(url):
            with httpx.Client(timeout=10) as client, ThreadPoolExecutor(8) as pool:
                headers = {"content-type": "application/x-www-form-urlencoded"}

                def refused(_: int) -> int:
                    body = (
                        f"grant_type=client_credentials&scope={scope}"
                        f"&client_id={uuid.uuid4()}&client_secret=x"
                    )
                    return client.post(server.token_url, content=body, headers=headers).status_code

                assert set(pool.map(refused, range(3000))) == {401}
            # Tokens do not wait for the database.
            assert request_token(server, app).status_code == 200
            wait_for(lambda: "records were dropped" in server.log(), timeout=FLUSHED_WITHIN)
            grown = rss_bytes(server.process.pid) - before
        # 3000 requests of 15 KB each once grew the process by ~30 KB each.
        assert grown < 24 * 1024 * 1024, grown

        # Back online: what the queue kept is written (the rest was dropped), and new events
        # after it.
        def written() -> int:
            events = env.cli("audit", "list", "--limit", "10000")
            return sum(1 for e in events if e["outcome"] == "invalid_client")

        wait_for(lambda: written() > 500, timeout=15)
        assert written() < 3000
        issue_and_wait_audited(env, server, app, FLUSHED_WITHIN)


@pytest.fixture
def postgres_store(postgres: PostgresDatabases) -> Iterator[SqlStore]:
    store = SqlStore(postgres.create(), EngineOptions(connect_timeout=2))
    store.upgrade_schema()
    yield store
    store.close()


def test_a_record_the_database_refuses_is_dropped_alone(postgres_store: SqlStore) -> None:
    """A NUL (refused by PostgreSQL) in one record of a batch: the others are written, in
    order, and the refused one is counted."""
    trail = AuditTrail(postgres_store, "none")
    for n in range(20):
        client_id = "bad\x00id" if n in (3, 17) else f"client-{n}"
        trail.record("token", "issued", client_id, "127.0.0.1", {"n": n})
    assert trail.flush() == 18
    assert trail.rejected == 2
    assert trail.queued == 0
    written = postgres_store.list_audit_events()
    assert [e.detail["n"] for e in written if e.detail] == [
        n for n in range(20) if n not in (3, 17)
    ]


def test_an_unreachable_store_keeps_the_queue_and_a_full_queue_counts_its_drops(
    postgres: PostgresDatabases,
) -> None:
    url = postgres.create()
    store = SqlStore(url, EngineOptions(connect_timeout=2))
    store.upgrade_schema()
    try:
        trail = AuditTrail(store, "none", max_queued_bytes=64 * 1024)
        for n in range(500):
            trail.record("token", "invalid_client", f"c-{n}", "127.0.0.1", {"scope": "x" * 100})
        assert 0 < trail.queued < 500
        assert trail.dropped == 500 - trail.queued
        kept = trail.queued
        with postgres.offline(url), pytest.raises(StoreError):
            trail.flush()
        assert trail.queued == kept
        assert trail.flush() == kept
        assert len(store.list_audit_events(limit=1000)) == kept
    finally:
        store.close()
