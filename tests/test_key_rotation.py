"""Signing-key rotation without a broken token: a new key is published before it signs,
and every issued token's kid stays in the published JWKS for the token's whole life,
through rotations, immediate rotations, killed servers and killed `keys rotate` commands."""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest

from conftest import (
    AppCredentials,
    Env,
    PostgresDatabases,
    Server,
    create_app,
    installation,
    kid_of,
    module_app,
    module_server,
    new_token,
    request_token,
    serving,
    start_server,
    wait_for,
    wait_until_known,
)
from leanauth.store.sql import CHANGE_FEED_LOCK_KEY

PREPUBLISH = 3
RETIRED_FOR = 86_400 + 300
KEY_ENV = {"LEANAUTH_KEY_PREPUBLISH": str(PREPUBLISH), "LEANAUTH_JWKS_MAX_AGE": "1"}


env, server = module_server("key-rotation", **KEY_ENV)
app = module_app("--scopes", "api")


def fetch_jwks(server: Server) -> dict[str, Any]:
    response = httpx.get(server.url + "/oauth2/jwks", timeout=10)
    assert response.status_code == 200, response.text
    jwks: dict[str, Any] = response.json()
    return jwks


def kids(jwks: dict[str, Any]) -> set[str]:
    return {k["kid"] for k in jwks["keys"]}


def served_kids(server: Server) -> set[str]:
    return kids(fetch_jwks(server))


def verify(token: str, jwks: dict[str, Any], issuer: str) -> dict[str, Any]:
    """PyJWT's verification against one JWKS, the algorithm pinned by the key."""
    key = jwt.PyJWKSet.from_dict(jwks)[kid_of(token)]
    claims: dict[str, Any] = jwt.decode(
        token, key.key, algorithms=[key.algorithm_name], audience="urn:leanauth:api", issuer=issuer
    )
    return claims


def keys_by_kid(env: Env) -> dict[str, dict[str, Any]]:
    return {k["kid"]: k for k in env.cli("keys", "list")}


def test_a_rotated_key_is_published_first_then_signs(
    env: Env, server: Server, app: AppCredentials
) -> None:
    old = kid_of(new_token(server, app))
    rotated = env.cli("keys", "rotate")
    new = rotated["kid"]
    assert new != old
    assert rotated["state"] == "next"
    assert rotated["activates_at"] >= rotated["created_at"] + PREPUBLISH

    # Published within a second, while the old key still signs.
    wait_for(lambda: new in served_kids(server), timeout=1.0)
    assert time.time() < rotated["activates_at"], "the test machine was too slow to tell"
    assert kid_of(new_token(server, app)) == old
    assert {old, new} <= served_kids(server)

    # Then the new key signs; the old one stays published.
    wait_for(lambda: kid_of(new_token(server, app)) == new, timeout=PREPUBLISH + 1.5)
    jwks = fetch_jwks(server)
    assert {old, new} <= kids(jwks)
    verify(new_token(server, app), jwks, server.url)

    keys = keys_by_kid(env)
    assert keys[old]["state"] == "retired"
    assert keys[old]["retires_at"] == rotated["activates_at"]
    assert keys[old]["unpublished_at"] == keys[old]["retires_at"] + RETIRED_FOR
    assert keys[new]["state"] == "active"
    assert keys[new]["retires_at"] is None
    assert keys[new]["unpublished_at"] is None

    # A third key: next, active and retired side by side.
    following = env.cli("keys", "rotate")
    keys = keys_by_kid(env)
    assert keys[following["kid"]]["state"] == "next"
    assert keys[following["kid"]]["retires_at"] is None
    assert keys[new]["state"] == "active"
    assert keys[new]["retires_at"] == following["activates_at"]
    assert keys[new]["unpublished_at"] == following["activates_at"] + RETIRED_FOR
    assert keys[old]["state"] == "retired"
    assert keys[old]["unpublished_at"] == keys[old]["retires_at"] + RETIRED_FOR

    # A rotation while a key is still next queues behind it: every printed kid stays.
    queued = env.cli("keys", "rotate")
    keys = keys_by_kid(env)
    assert keys[following["kid"]]["state"] == "next"
    assert keys[queued["kid"]]["state"] == "next"
    assert queued["activates_at"] > following["activates_at"]
    assert keys[following["kid"]]["retires_at"] == queued["activates_at"]
    wait_for(
        lambda: served_kids(server) >= {old, new, following["kid"], queued["kid"]},
        timeout=1.0,
    )
    # --immediately replaces the waiting keys it saw (they signed nothing) and signs now.
    urgent = env.cli("keys", "rotate", "--immediately")
    keys = keys_by_kid(env)
    assert following["kid"] not in keys
    assert queued["kid"] not in keys
    wait_for(lambda: kid_of(new_token(server, app)) == urgent["kid"], timeout=2.0)


def test_every_token_verifies_for_its_whole_life_through_rotations(
    env: Env, server: Server, app: AppCredentials
) -> None:
    """~7 s of tokens and JWKS fetches through two rotations and one immediate rotation:
    each token verifies against the JWKS of its moment and the JWKS at the end, and (but for
    the immediate rotation) its key was in a JWKS fetched a max-age (1 s) before it."""
    initial = fetch_jwks(server)
    published_at: dict[str, float] = dict.fromkeys(kids(initial), float("-inf"))
    issued: list[tuple[float, str]] = []
    rotations: list[dict[str, Any]] = []
    immediate: dict[str, Any] = {}
    plan = [(0.0, False), (PREPUBLISH + 0.3, False), (PREPUBLISH + 1.3, True)]
    start = time.monotonic()
    while (elapsed := time.monotonic() - start) < PREPUBLISH + 3.7:
        if plan and elapsed >= plan[0][0]:
            _, at_once = plan.pop(0)
            if at_once:
                immediate = env.cli("keys", "rotate", "--immediately")
            else:
                rotations.append(env.cli("keys", "rotate"))
        asked = time.monotonic()
        token = new_token(server, app)
        jwks = fetch_jwks(server)
        fetched = time.monotonic()
        for kid in kids(jwks):
            published_at.setdefault(kid, fetched)
        verify(token, jwks, server.url)
        issued.append((asked, token))
        time.sleep(0.02)

    final = fetch_jwks(server)
    for asked, token in issued:
        verify(token, final, server.url)
        kid = kid_of(token)
        if kid != immediate["kid"]:
            assert published_at[kid] <= asked - 1.0, "a key signed before it was pre-published"

    # The keys signed in order, never going back; the pending key that the immediate
    # rotation replaced never signed.
    old = kid_of(issued[0][1])
    order = [kid_of(token) for _, token in issued]
    sequence = [kid for i, kid in enumerate(order) if i == 0 or order[i - 1] != kid]
    assert sequence == [old, rotations[0]["kid"], immediate["kid"]]
    assert rotations[1]["kid"] not in kids(final)
    assert {old, rotations[0]["kid"], immediate["kid"]} <= kids(final)


def test_a_server_killed_before_the_new_key_activates_signs_with_it_after_restart(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    env = Env(tmp_path_factory.mktemp("key-kill-server"), extra=KEY_ENV)
    first = start_server(env)
    try:
        created = create_app(env, "--name", "Restarted", "--scopes", "api")
        wait_until_known(first, created)
        before = new_token(first, created)
        old = kid_of(before)
        rotated = env.cli("keys", "rotate")
        first.process.send_signal(signal.SIGKILL)
        first.process.wait(timeout=10)
        assert time.time() < rotated["activates_at"], "the test machine was too slow to tell"
    finally:
        first.stop()

    time.sleep(max(0.0, rotated["activates_at"] - time.time()) + 0.1)
    # Restarted where it was (tokens name their issuer: the address).
    second = start_server(env, first.port)
    try:
        after = new_token(second, created)
        assert kid_of(after) == rotated["kid"]
        jwks = fetch_jwks(second)
        assert {old, rotated["kid"]} <= kids(jwks)
        verify(before, jwks, second.url)
        verify(after, jwks, second.url)
    finally:
        second.stop()


def test_killing_keys_rotate_at_any_moment_breaks_no_token(
    env: Env, server: Server, app: AppCredentials
) -> None:
    command = [sys.executable, "-m", "leanauth", "keys", "rotate", "--json"]
    variables = {**os.environ, **env.vars}
    started = time.monotonic()
    subprocess.run(command, env=variables, capture_output=True, check=True, timeout=60)
    full_run = time.monotonic() - started

    seed = random.randrange(1_000_000)
    rng = random.Random(seed)
    delays = [0.0, 0.05, 0.1, 0.2, 0.4] + [full_run * rng.uniform(0.5, 1.0) for _ in range(4)]
    issued = [new_token(server, app)]
    for delay in delays:
        process = subprocess.Popen(
            command, env=variables, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
        issued.append(new_token(server, app))
        jwks = fetch_jwks(server)
        missing = {kid_of(token) for token in issued} - kids(jwks)
        assert not missing, f"kill after {delay:.3f} s (seed {seed}): kids not published"
        for token in issued:
            verify(token, jwks, server.url)

    database = env.data_dir / "leanauth.db"
    with sqlite3.connect(database) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    states = [k["state"] for k in env.cli("keys", "list")]
    assert states.count("active") == 1
    # A rotation queues its key behind the keys still waiting (a second apart here), so a
    # burst of rotations leaves several pending: they activate in turn, one at a time.
    pending = states.count("next")
    wait_for(lambda: "next" not in keys_by_state(env), timeout=pending + 5)
    assert keys_by_state(env).count("active") == 1
    fresh = new_token(server, app)
    verify(fresh, fetch_jwks(server), server.url)


def keys_by_state(env: Env) -> list[str]:
    return [k["state"] for k in env.cli("keys", "list")]


def test_automatic_rotation_when_the_key_is_old(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    env = Env(tmp_path_factory.mktemp("key-auto"), extra={"LEANAUTH_KEY_ROTATION_DAYS": "1"})
    env.cli("init")
    database = env.data_dir / "leanauth.db"
    with sqlite3.connect(database) as conn:
        (original,) = [row[0] for row in conn.execute("SELECT kid FROM signing_keys")]
        conn.execute("UPDATE signing_keys SET created_at = ?", (int(time.time()) - 2 * 86_400,))

    # Two servers due at once: one of them rotates.
    with ThreadPoolExecutor(2) as pool:
        servers = list(pool.map(lambda _: start_server(env), range(2)))
    try:
        wait_for(lambda: len(env.cli("keys", "list")) >= 2, timeout=5.0)
        keys = keys_by_kid(env)
        assert len(keys) == 2
        (new,) = set(keys) - {original}
        assert keys[new]["state"] in ("next", "active")
        assert abs(keys[new]["created_at"] - time.time()) < 10

        events = [e for e in env.cli("audit", "list") if e["outcome"] == "key.rotate"]
        assert len(events) == 1
        (event,) = events
        assert event["kind"] == "admin"
        assert event["client_id"] is None
        assert event["source"] == "server"
        assert event["detail"]["kid"] == new
        assert event["detail"]["activates_at"] == keys[new]["activates_at"]

        created = create_app(env, "--name", "Auto", "--scopes", "api")
        for running in servers:
            wait_for(
                lambda running=running: (
                    request_token(running, created).status_code == 200
                    and kid_of(new_token(running, created)) == new
                ),
                timeout=4.0,
            )
            assert {original, new} <= served_kids(running)
        assert len(env.cli("keys", "list")) == 2
    finally:
        for running in servers:
            running.stop()


def test_a_rotation_that_commits_after_the_pending_key_activated_keeps_it_published(
    tmp_path: Path, postgres: PostgresDatabases
) -> None:
    """`keys rotate` replaces a key still waiting to activate. If that rotation commits only
    after the waiting key activated (here the test holds the change-feed lock the rotation
    needs last, to make the window wide), the key has signed tokens meanwhile: it must stay
    published, and the tokens must keep verifying."""
    import psycopg

    url = postgres.create()
    env = Env(
        tmp_path,
        extra={
            **KEY_ENV,
            "LEANAUTH_DATABASE_URL": url,
            "LEANAUTH_KEY_ENCRYPTION_KEY": os.urandom(32).hex(),
        },
    )
    running = start_server(env)
    try:
        created = create_app(env, "--name", "Late rotation", "--scopes", "api")
        wait_until_known(running, created)
        pending = env.cli("keys", "rotate")
        name = url.rsplit("/", 1)[1]
        command = [sys.executable, "-m", "leanauth", "keys", "rotate", "--json"]
        with psycopg.connect(url, autocommit=True) as holder:
            holder.execute("SELECT pg_advisory_lock(%s)", (CHANGE_FEED_LOCK_KEY,))
            late = subprocess.Popen(
                command,
                env={**os.environ, **env.vars},
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            try:
                wait_for(lambda: lock_waiters(holder, name) == 1, timeout=30, interval=0.02)
                assert time.time() < pending["activates_at"], "too slow to tell"
                # The waiting key activates and signs while the rotation has not committed.
                issued: list[str] = []

                def signed_by_pending() -> bool:
                    issued.append(new_token(running, created))
                    return kid_of(issued[-1]) == pending["kid"]

                wait_for(signed_by_pending, timeout=PREPUBLISH + 2.0, interval=0.05)
            finally:
                holder.execute("SELECT pg_advisory_unlock(%s)", (CHANGE_FEED_LOCK_KEY,))
            out, err = late.communicate(timeout=60)
        assert late.returncode == 0, err
        replacing = json.loads(out)
        wait_for(lambda: replacing["kid"] in served_kids(running), timeout=2.0)
        jwks = fetch_jwks(running)
        assert pending["kid"] in kids(jwks), "a key that signed tokens left the JWKS"
        for token in issued:
            verify(token, jwks, running.url)
        # And the key that signs now is never an older one again.
        assert kid_of(new_token(running, created)) in (pending["kid"], replacing["kid"])
    finally:
        running.stop()


def lock_waiters(conn: Any, database: str) -> int:
    row = conn.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = %s"
        " AND application_name = 'leanauth' AND wait_event_type = 'Lock'",
        (database,),
    ).fetchone()
    return int(row[0]) if row else 0


def test_a_key_activates_on_time_while_the_database_is_unreachable(
    tmp_path: Path, postgres: PostgresDatabases
) -> None:
    """Keys activate with time, not with a change: a node that cannot reach its database at
    the moment still switches to the new key (it used to go on signing with the old one)."""
    url = postgres.create()
    env = installation(tmp_path, url, **KEY_ENV)
    app = create_app(env, "--name", "Outage rotation", "--scopes", "api")
    with serving(env) as server:
        wait_until_known(server, app)
        new_kid = env.cli("keys", "rotate")["kid"]
        wait_for(lambda: new_kid in served_kids(server))
        assert kid_of(new_token(server, app)) != new_kid
        with postgres.offline(url):
            wait_for(lambda: kid_of(new_token(server, app)) == new_kid, timeout=PREPUBLISH + 2)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_racing_rotations_never_print_a_kid_that_does_not_exist(
    tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    """Ten `keys rotate` at once: one or more win, the others fail with one line and change
    nothing, and every kid one of them printed is a key that exists."""
    if backend == "sqlite":
        env = Env(tmp_path, extra={"LEANAUTH_KEY_PREPUBLISH": "600"})
    else:
        url = request.getfixturevalue("postgres").create()
        env = installation(tmp_path, url, LEANAUTH_KEY_PREPUBLISH="600")
    env.cli("init")
    variables = {**os.environ, **env.vars}
    command = [sys.executable, "-m", "leanauth", "keys", "rotate", "--json"]

    def rotate(_: int) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            command, env=variables, capture_output=True, text=True, timeout=60, check=False
        )

    with ThreadPoolExecutor(10) as pool:
        results = list(pool.map(rotate, range(10)))
    printed = [json.loads(r.stdout)["kid"] for r in results if r.returncode == 0]
    failures = [r.stderr for r in results if r.returncode != 0]
    assert printed, failures
    assert all(len(f.strip().splitlines()) == 1 for f in failures), failures
    stored = {key["kid"]: key for key in env.cli("keys", "list")}
    assert set(printed) <= set(stored)
    assert all("another rotation published key" in f for f in failures), failures
    # Nothing but the initial key and what was printed.
    assert len(stored) == 1 + len(printed)
