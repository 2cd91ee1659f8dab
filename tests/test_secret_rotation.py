"""Client-secret rotation with an overlap: both secrets work during the grace period, at
most two are live, a revocation ends one at once, and of two racing rotations one wins."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from conftest import (
    AppCredentials,
    Env,
    PostgresDatabases,
    Server,
    as_error_line,
    create_app,
    module_server,
    request_token,
    start_server,
    wait_for,
    wait_until_known,
)
from leanauth.cli import main as cli_main
from leanauth.store.sql import ROTATION_RACE_WINDOW
from secret_sweep import record_values

# A change made with the CLI reaches the server within this (refresh interval 0.2 s).
FRESH_WITHIN = 2.0
SECRET_FIELDS = {"secret_id", "created_at", "expires_at", "last_used_at", "live"}


# Room for the refusals these tests provoke: the brute-force throttle is tested elsewhere.
env, server = module_server(
    "secret-rotation",
    LEANAUTH_AUTH_FAILURE_LIMIT="1000 per minute",
    LEANAUTH_AUTH_FAILURE_ADDRESS_LIMIT="10000 per minute",
)


@pytest.fixture
def fresh_app(env: Env, server: Server) -> AppCredentials:
    created = create_app(env, "--name", "Rotation", "--scopes", "api")
    wait_until_known(server, created)
    return created


def with_secret(app: AppCredentials, secret: str) -> AppCredentials:
    return AppCredentials(app.client_id, secret, app.raw)


def status(server: Server, creds: AppCredentials) -> int:
    return request_token(server, creds).status_code


def assert_refused(server: Server, creds: AppCredentials) -> None:
    response = request_token(server, creds)
    assert response.status_code == 401, response.text
    assert response.json()["error"] == "invalid_client"


def secrets_of(env: Env, client_id: str) -> list[dict[str, Any]]:
    shown = env.cli("apps", "show", client_id)
    return list(shown["secrets"])


def one_line_error(stderr: str) -> str:
    """The CLI's failure: one ``error:`` line, last, and no traceback."""
    assert "Traceback" not in stderr, stderr
    lines = [as_error_line(line) for line in stderr.strip().splitlines()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, stderr
    assert lines[-1] == errors[0], stderr
    return errors[0]


def test_default_grace_keeps_both_secrets_working(
    env: Env, server: Server, fresh_app: AppCredentials
) -> None:
    old_id = fresh_app.raw["secret_id"]
    rotated = env.cli("apps", "rotate-secret", fresh_app.client_id)
    assert set(rotated) == {
        "client_id",
        "client_secret",
        "secret_id",
        "old_secrets_expire_at",
        "old_secrets_expire_at_utc",
    }
    assert rotated["client_id"] == fresh_app.client_id
    assert rotated["client_secret"].startswith("lsk_")
    assert rotated["client_secret"] != fresh_app.client_secret
    assert rotated["secret_id"] != old_id
    new = with_secret(fresh_app, rotated["client_secret"])

    wait_for(lambda: status(server, new) == 200, timeout=FRESH_WITHIN)
    # The server has taken the rotation in; the old secret still works (24 h grace).
    assert status(server, fresh_app) == 200
    time.sleep(0.5)
    assert status(server, fresh_app) == 200
    assert status(server, new) == 200

    secrets = {s["secret_id"]: s for s in secrets_of(env, fresh_app.client_id)}
    assert set(secrets) == {old_id, rotated["secret_id"]}
    assert secrets[old_id]["live"] is True
    assert secrets[rotated["secret_id"]]["live"] is True
    # The default grace is 24 h; the printed end is computed a moment after the stored one.
    assert rotated["old_secrets_expire_at"] - secrets[old_id]["expires_at"] in (0, 1)
    assert secrets[old_id]["expires_at"] - secrets[old_id]["created_at"] in range(86_400, 86_403)
    assert secrets[rotated["secret_id"]]["expires_at"] is None


def test_zero_grace_ends_the_old_secret_at_once(
    env: Env, server: Server, fresh_app: AppCredentials
) -> None:
    rotated = env.cli("apps", "rotate-secret", fresh_app.client_id, "--grace", "0")
    new = with_secret(fresh_app, rotated["client_secret"])

    wait_for(lambda: status(server, fresh_app) == 401, timeout=FRESH_WITHIN)
    assert_refused(server, fresh_app)
    wait_for(lambda: status(server, new) == 200, timeout=FRESH_WITHIN)

    secrets = {s["secret_id"]: s for s in secrets_of(env, fresh_app.client_id)}
    old = secrets[fresh_app.raw["secret_id"]]
    assert old["live"] is False
    assert old["expires_at"] <= int(time.time())
    assert secrets[rotated["secret_id"]]["live"] is True


def test_short_grace_works_then_ends(env: Env, server: Server, fresh_app: AppCredentials) -> None:
    rotated_at = time.time()
    rotated = env.cli("apps", "rotate-secret", fresh_app.client_id, "--grace", "3s")
    new = with_secret(fresh_app, rotated["client_secret"])
    wait_for(lambda: status(server, new) == 200, timeout=FRESH_WITHIN)

    # The old secret works until its grace ends (3 s after the rotation, in whole seconds:
    # no earlier than 2 s after it), then is refused.
    answers: list[tuple[float, int]] = []

    def old_refused() -> bool:
        # The time is read once the answer is in: the server checked the secret before it.
        code = status(server, fresh_app)
        answers.append((time.time() - rotated_at, code))
        return code != 200

    wait_for(old_refused, timeout=3.0 + FRESH_WITHIN + 1.0, interval=0.1)
    ended_after, code = answers[-1]
    assert code == 401
    assert ended_after >= 2.0, answers
    assert all(answer == 200 for _, answer in answers[:-1])
    assert_refused(server, fresh_app)
    assert status(server, new) == 200

    secrets = {s["secret_id"]: s for s in secrets_of(env, fresh_app.client_id)}
    assert secrets[fresh_app.raw["secret_id"]]["live"] is False
    assert secrets[rotated["secret_id"]]["live"] is True


def without_last_use(secrets: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in secret.items() if k != "last_used_at"} for secret in secrets]


def test_at_most_two_live_secrets(env: Env, server: Server, fresh_app: AppCredentials) -> None:
    first = env.cli("apps", "rotate-secret", fresh_app.client_id)
    before = secrets_of(env, fresh_app.client_id)

    refused = env.cli("apps", "rotate-secret", fresh_app.client_id, expect_ok=False)
    assert refused.exit_code == 1
    assert refused.stdout == ""
    error = one_line_error(refused.stderr)
    assert "revoke one first" in error
    # The refused rotation changed nothing (last use is the server's to write, meanwhile).
    assert without_last_use(secrets_of(env, fresh_app.client_id)) == without_last_use(before)

    # With one of them revoked, a rotation works again (once the window in which another
    # rotation counts as racing this one has passed).
    env.cli("apps", "revoke-secret", fresh_app.client_id, fresh_app.raw["secret_id"])
    time.sleep(ROTATION_RACE_WINDOW)
    again = env.cli("apps", "rotate-secret", fresh_app.client_id, "--grace", "0")
    ids = [s["secret_id"] for s in secrets_of(env, fresh_app.client_id)]
    assert sorted(ids) == sorted(
        [fresh_app.raw["secret_id"], first["secret_id"], again["secret_id"]]
    )
    live = [s["secret_id"] for s in secrets_of(env, fresh_app.client_id) if s["live"]]
    assert live == [again["secret_id"]]
    wait_for(
        lambda: status(server, with_secret(fresh_app, again["client_secret"])) == 200,
        timeout=FRESH_WITHIN,
    )


def test_revoke_secret_ends_it_at_once(env: Env, server: Server, fresh_app: AppCredentials) -> None:
    rotated = env.cli("apps", "rotate-secret", fresh_app.client_id)
    new = with_secret(fresh_app, rotated["client_secret"])
    wait_for(lambda: status(server, new) == 200, timeout=FRESH_WITHIN)
    assert status(server, fresh_app) == 200

    revoked = env.cli("apps", "revoke-secret", fresh_app.client_id, fresh_app.raw["secret_id"])
    assert revoked == {
        "client_id": fresh_app.client_id,
        "secret_id": fresh_app.raw["secret_id"],
        "revoked": True,
    }
    wait_for(lambda: status(server, fresh_app) == 401, timeout=FRESH_WITHIN)
    assert_refused(server, fresh_app)
    assert status(server, new) == 200

    secrets = {s["secret_id"]: s for s in secrets_of(env, fresh_app.client_id)}
    assert secrets[fresh_app.raw["secret_id"]]["live"] is False
    assert secrets[fresh_app.raw["secret_id"]]["expires_at"] <= int(time.time())
    assert secrets[rotated["secret_id"]]["live"] is True

    # Revoking it again, or revoking an unknown secret id, is a one-line error.
    for secret_id in (fresh_app.raw["secret_id"], "sec_0000000000000000"):
        result = env.cli("apps", "revoke-secret", fresh_app.client_id, secret_id, expect_ok=False)
        assert result.exit_code == 1
        assert result.stdout == ""
        assert secret_id in one_line_error(result.stderr)
    assert status(server, new) == 200


def test_show_lists_secret_facts_and_last_use_never_the_secret(env: Env, server: Server) -> None:
    created = create_app(env, "--name", "Last use", "--scopes", "api")
    (unused,) = secrets_of(env, created.client_id)
    assert set(unused) == SECRET_FIELDS
    assert unused["secret_id"] == created.raw["secret_id"]
    assert unused["last_used_at"] is None
    assert unused["expires_at"] is None
    assert unused["live"] is True
    assert unused["created_at"] == created.raw["created_at"]

    used_from = int(time.time())
    wait_until_known(server, created)
    # Recorded off the hot path, in batches once a second.
    wait_for(lambda: secrets_of(env, created.client_id)[0]["last_used_at"] is not None, timeout=3.5)
    (used,) = secrets_of(env, created.client_id)
    assert used_from <= used["last_used_at"] <= int(time.time())

    rotated = env.cli("apps", "rotate-secret", created.client_id, "--grace", "1h")
    new = with_secret(created, rotated["client_secret"])
    by_id = {s["secret_id"]: s for s in secrets_of(env, created.client_id)}
    assert by_id[rotated["secret_id"]]["last_used_at"] is None
    new_used_from = int(time.time())
    wait_for(lambda: status(server, new) == 200, timeout=FRESH_WITHIN)
    wait_for(
        lambda: (
            secrets_of_by_id(env, created.client_id)[rotated["secret_id"]]["last_used_at"]
            is not None
        ),
        timeout=3.5,
    )
    by_id = secrets_of_by_id(env, created.client_id)
    assert new_used_from <= by_id[rotated["secret_id"]]["last_used_at"] <= int(time.time())
    assert by_id[created.raw["secret_id"]]["last_used_at"] >= used["last_used_at"]

    shown = env.cli("apps", "show", created.client_id)
    assert [set(s) for s in shown["secrets"]] == [SECRET_FIELDS, SECRET_FIELDS]
    text = json.dumps(shown)
    for secret in (created.client_secret, rotated["client_secret"]):
        assert secret not in text
        assert secret.removeprefix("lsk_") not in text
    # The text output, for people: secret ids and times, never the secret.
    plain = CliRunner().invoke(cli_main, ["apps", "show", created.client_id], env=env.vars)
    assert plain.exit_code == 0
    assert created.raw["secret_id"] in plain.output
    for secret in (created.client_secret, rotated["client_secret"]):
        assert secret.removeprefix("lsk_") not in plain.output


def secrets_of_by_id(env: Env, client_id: str) -> dict[str, dict[str, Any]]:
    return {s["secret_id"]: s for s in secrets_of(env, client_id)}


def rotate_command(client_id: str) -> list[str]:
    command = [sys.executable, "-m", "leanauth", "apps", "rotate-secret", client_id]
    return [*command, "--grace", "0", "--json"]


def test_racing_rotations_one_wins(env: Env, server: Server, fresh_app: AppCredentials) -> None:
    """Four rotations launched at once: one wins; the others fail, changing nothing."""
    command = rotate_command(fresh_app.client_id)
    variables = {**os.environ, **env.vars}
    processes = [
        subprocess.Popen(
            command, env=variables, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(4)
    ]
    outcomes = [(p, *p.communicate(timeout=60)) for p in processes]

    winners = [(out, err) for p, out, err in outcomes if p.returncode == 0]
    losers = [(p.returncode, out, err) for p, out, err in outcomes if p.returncode != 0]
    for out, _ in winners:
        record_values(json.loads(out))
    # (Exit codes and stderr only in the message: stdout holds the new secrets.)
    codes = sorted(p.returncode for p, _, _ in outcomes)
    assert codes == [0, 1, 1, 1], [(p.returncode, err) for p, _, err in outcomes]
    for _, out, err in losers:
        assert out == ""
        one_line_error(err)

    won = json.loads(winners[0][0])
    secrets = secrets_of(env, fresh_app.client_id)
    assert [(s["secret_id"], s["live"]) for s in secrets] == [
        (fresh_app.raw["secret_id"], False),
        (won["secret_id"], True),
    ]
    winner = with_secret(fresh_app, won["client_secret"])
    wait_for(lambda: status(server, winner) == 200, timeout=FRESH_WITHIN)
    wait_for(lambda: status(server, fresh_app) == 401, timeout=FRESH_WITHIN)
    assert_refused(server, fresh_app)


def test_rotations_that_overlap_on_postgresql_one_wins(
    tmp_path: Path, postgres: PostgresDatabases
) -> None:
    """The same race with the overlap forced: the test holds the app's row lock while four
    rotations start, so all four read the same live secret before any of them can commit."""
    import psycopg

    url = postgres.create()
    env = Env(
        tmp_path,
        extra={
            "LEANAUTH_DATABASE_URL": url,
            "LEANAUTH_KEY_ENCRYPTION_KEY": os.urandom(32).hex(),
        },
    )
    created = create_app(env, "--name", "Race", "--scopes", "api")
    name = url.rsplit("/", 1)[1]
    with psycopg.connect(url) as holder, psycopg.connect(url, autocommit=True) as watcher:
        holder.execute("UPDATE apps SET name = name WHERE client_id = %s", (created.client_id,))
        processes = [
            subprocess.Popen(
                rotate_command(created.client_id),
                env={**os.environ, **env.vars},
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(4)
        ]

        def all_waiting() -> bool:
            row = watcher.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = %s"
                " AND application_name = 'leanauth' AND wait_event_type = 'Lock'",
                (name,),
            ).fetchone()
            return row is not None and row[0] == 4

        try:
            wait_for(all_waiting, timeout=30, interval=0.1)
        finally:
            holder.rollback()
        outputs = [p.communicate(timeout=60) for p in processes]
        outcomes = [(p.returncode, *output) for p, output in zip(processes, outputs, strict=True)]

    winners = [json.loads(out) for code, out, _ in outcomes if code == 0]
    for won in winners:
        record_values(won)
    codes = sorted(code for code, _, _ in outcomes)
    assert codes == [0, 1, 1, 1], [(code, err) for code, _, err in outcomes]
    losers = [(code, out, err) for code, out, err in outcomes if code != 0]
    for _, out, err in losers:
        assert out == ""
        assert "secrets changed during the rotation" in one_line_error(err)
    secrets = secrets_of(env, created.client_id)
    assert [(s["secret_id"], s["live"]) for s in secrets] == [
        (created.raw["secret_id"], False),
        (winners[0]["secret_id"], True),
    ]
    running = start_server(env)
    try:
        assert status(running, with_secret(created, winners[0]["client_secret"])) == 200
        assert_refused(running, created)
    finally:
        running.stop()
