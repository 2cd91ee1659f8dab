"""Safe configuration and upgrades, through the real CLI and the real server:

1. only ``init`` and ``db upgrade`` make a database (or a key-encryption key file): a
   mistyped database URL is refused, not answered with a new, empty registry;
2. unknown ``LEANAUTH_*`` variables are named, with the setting they probably meant;
3. a database a newer release migrated is refused with one line and its own exit status;
4. no issuer is guessed for a server listening on an address that is not loopback;
5. ``db backup`` copies a running SQLite installation consistently.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path

import httpx
import pytest
from sqlalchemy import text

from conftest import (
    AppCredentials,
    Env,
    PostgresDatabases,
    as_error_line,
    create_app,
    free_port,
    installation,
    request_token,
    serving,
    start_server,
    wait_for,
    wait_until_known,
)
from leanauth import __version__
from leanauth.cli import main as cli_main
from leanauth.cli.common import EXIT_SCHEMA_AHEAD, option_variables
from leanauth.cli.serve import guessed_issuer
from leanauth.settings import Settings, known_variables, unknown_variables
from leanauth.store.engine import engine_for
from leanauth.store.migrate import head_revision

ROOT = Path(__file__).resolve().parents[1]
# Servers in this module stop at once on SIGTERM (no drain for load balancers).
FAST_STOP = {"LEANAUTH_DRAIN_SECONDS": "0"}
FUTURE_REVISION = "9999_from_a_newer_release"


def clean_environ(extra: Mapping[str, str]) -> dict[str, str]:
    """The test process's environment without its LEANAUTH_* variables, plus ``extra``."""
    variables = {k: v for k, v in os.environ.items() if not k.startswith("LEANAUTH_")}
    return {**variables, **extra}


def leanauth(
    variables: Mapping[str, str], *args: str, cwd: Path | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """``python -m leanauth ARGS`` in a process of its own (``serve`` included: one that
    does not exit by itself is killed with its workers, and the test fails)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "leanauth", *args],
        env=clean_environ(variables),
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"leanauth {' '.join(args)} kept running:\n{stderr}")
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def one_error_line(proc: subprocess.CompletedProcess[str], *words: str) -> str:
    """The single ``error:`` line a refused command printed (after any warnings)."""
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [as_error_line(line) for line in proc.stderr.splitlines() if " WARNING " not in line]
    assert len(errors) == 1, proc.stderr
    assert errors[0].startswith("error: "), errors[0]
    for word in words:
        assert word in errors[0], errors[0]
    return errors[0]


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path}"


# 1. Only `init` and `db upgrade` make a database


COMMANDS_ON_A_DATABASE = [
    ("apps", "list"),
    ("apps", "create", "--name", "Lost"),
    ("customers", "list", "--app", str(uuid.UUID(int=1))),
    ("keys", "list"),
    ("keys", "rotate"),
    ("audit", "list"),
    ("db", "current"),
    ("db", "backup", "backup.db"),
    ("serve",),
]


@pytest.mark.parametrize("args", COMMANDS_ON_A_DATABASE, ids=" ".join)
def test_commands_refuse_a_missing_sqlite_database_and_make_nothing(
    tmp_path: Path, args: tuple[str, ...]
) -> None:
    data_dir = tmp_path / "data"
    url = sqlite_url(data_dir / "leanauth.db")
    proc = leanauth({"LEANAUTH_DATABASE_URL": url}, *args, cwd=tmp_path)
    line = one_error_line(proc)
    assert line == f"error: no leanauth database at {url}: run `leanauth init` first"
    assert proc.returncode == 1
    # No database, no key-encryption key, not even their folder; no backup file.
    assert list(tmp_path.iterdir()) == []


def test_a_mistyped_database_variable_is_named_and_no_registry_is_made(tmp_path: Path) -> None:
    """The issue's story: LEANAUTH_DATABSE_URL falls back to the default database, which
    does not exist. The operator is told of the typo and of the missing database, and
    `var/leanauth.db` is not created with a new key-encryption key beside it."""
    env = installation(tmp_path / "real", sqlite_url(tmp_path / "real" / "leanauth.db"))
    create_app(env, "--name", "Production app")
    typo = {**env.vars, "LEANAUTH_DATABSE_URL": env.vars["LEANAUTH_DATABASE_URL"]}
    del typo["LEANAUTH_DATABASE_URL"]
    work = tmp_path / "cwd"
    work.mkdir()
    proc = leanauth(typo, "apps", "list", cwd=work)
    one_error_line(proc, "no leanauth database at sqlite:///var/leanauth.db", "leanauth init")
    assert "LEANAUTH_DATABSE_URL" in proc.stderr
    assert "did you mean LEANAUTH_DATABASE_URL?" in proc.stderr
    assert list(work.iterdir()) == []


def test_an_empty_sqlite_file_is_no_database(tmp_path: Path) -> None:
    db = tmp_path / "leanauth.db"
    db.touch(mode=0o600)
    proc = leanauth({"LEANAUTH_DATABASE_URL": sqlite_url(db)}, "apps", "list")
    one_error_line(proc, "no leanauth database", "run `leanauth init` first")
    assert not (tmp_path / "leanauth.kek").exists()


def test_an_empty_postgres_database_is_refused_and_left_empty(
    postgres: PostgresDatabases,
) -> None:
    # Trust authentication ignores the password; it must not be printed anyway.
    url = postgres.create().replace("postgres@", "postgres:hunter2-password@")
    variables = {"LEANAUTH_DATABASE_URL": url, "LEANAUTH_KEY_ENCRYPTION_KEY": os.urandom(32).hex()}
    for args in (("apps", "list"), ("db", "current"), ("serve",)):
        proc = leanauth(variables, *args)
        line = one_error_line(proc, "no leanauth database at postgresql://postgres:***@")
        assert "hunter2" not in proc.stdout + proc.stderr, line
    engine = engine_for(url)
    try:
        with engine.connect() as conn:
            tables = conn.execute(
                text("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")
            ).scalar_one()
    finally:
        engine.dispose()
    assert tables == 0


def test_a_missing_key_file_is_refused_and_not_made(tmp_path: Path) -> None:
    """An installation whose key file is elsewhere (a wrong LEANAUTH_KEY_ENCRYPTION_KEY_FILE):
    a new key would open none of the signing keys."""
    env = Env(tmp_path)
    env.cli("init")
    elsewhere = tmp_path / "elsewhere" / "leanauth.kek"
    variables = {**env.vars, "LEANAUTH_KEY_ENCRYPTION_KEY_FILE": str(elsewhere)}
    for args in (("apps", "list"), ("serve",)):
        proc = leanauth(variables, *args)
        one_error_line(proc, "LEANAUTH_KEY_ENCRYPTION_KEY_FILE", str(elsewhere), "leanauth init")
    assert not elsewhere.parent.exists()


def test_init_demo_then_serve_on_the_default_database(tmp_path: Path) -> None:
    """`make serve`: `leanauth init --demo`, then `leanauth serve`, with no settings at all
    (the database is var/leanauth.db under the working directory)."""
    port = free_port()
    variables = {"LEANAUTH_PORT": str(port), **FAST_STOP}
    init = leanauth(variables, "init", "--demo", "--json", cwd=tmp_path)
    assert init.returncode == 0, init.stderr
    assert (tmp_path / "var" / "leanauth.db").exists()
    env = Env(tmp_path / "var", extra=FAST_STOP)
    with serving(env) as server:
        demo = json.loads(init.stdout)["demo_app"]
        creds = AppCredentials(demo["client_id"], demo["client_secret"], demo)
        assert request_token(server, creds).status_code == 200


# 2. Unknown LEANAUTH_* variables


def test_cli_names_an_unknown_variable_and_the_likely_one(tmp_path: Path) -> None:
    env = Env(tmp_path)
    env.cli("init")
    proc = leanauth({**env.vars, "LEANAUTH_TOKEN_TLL": "s3cret-value"}, "apps", "list")
    assert proc.returncode == 0, proc.stderr
    (warning,) = proc.stderr.splitlines()
    assert " WARNING " in warning
    assert "unknown setting LEANAUTH_TOKEN_TLL" in warning
    assert "did you mean LEANAUTH_TOKEN_TTL?" in warning
    # Its value may be a secret: never shown.
    assert "s3cret-value" not in proc.stderr


def test_an_unknown_variable_without_a_close_name_is_named_alone(tmp_path: Path) -> None:
    env = Env(tmp_path)
    env.cli("init")
    proc = leanauth({**env.vars, "LEANAUTH_WIDGETS": "7"}, "keys", "list")
    assert proc.returncode == 0, proc.stderr
    assert "unknown setting LEANAUTH_WIDGETS ignored" in proc.stderr
    assert "did you mean" not in proc.stderr


def test_a_bad_value_still_names_the_unknown_variable(tmp_path: Path) -> None:
    """A misspelt name may be why another value is refused: both are said."""
    proc = leanauth(
        {
            "LEANAUTH_DATABASE_URL": sqlite_url(tmp_path / "leanauth.db"),
            "LEANAUTH_JWKS_MAX_AGE": "900",
            "LEANAUTH_KEY_PREPUBLSH": "1200",
        },
        "init",
    )
    one_error_line(proc, "LEANAUTH_KEY_PREPUBLISH")
    (warning,) = [line for line in proc.stderr.splitlines() if " WARNING " in line]
    assert "unknown setting LEANAUTH_KEY_PREPUBLSH ignored" in warning
    assert "did you mean LEANAUTH_KEY_PREPUBLISH?" in warning


def test_serve_names_an_unknown_variable_in_its_log(tmp_path: Path) -> None:
    env = Env(tmp_path, extra={**FAST_STOP, "LEANAUTH_REFRESH_INTERVALL": "0.5"})
    with serving(env) as server:
        log = server.log()
    lines = [line for line in log.splitlines() if "LEANAUTH_REFRESH_INTERVALL" in line]
    assert len(lines) == 1, log
    assert "WARNING" in lines[0]
    assert "did you mean LEANAUTH_REFRESH_INTERVAL?" in lines[0]


def test_variables_the_commands_read_are_known(tmp_path: Path) -> None:
    """`leanauth token` reads LEANAUTH_CLIENT_ID and LEANAUTH_CLIENT_SECRET: no warning."""
    proc = leanauth(
        {
            "LEANAUTH_CLIENT_ID": "some-client",
            "LEANAUTH_CLIENT_SECRET": "some-secret",
            "LEANAUTH_ISSUER": f"http://127.0.0.1:{free_port()}",
        },
        "token",
    )
    assert "unknown setting" not in proc.stderr, proc.stderr
    warned = leanauth(
        {"LEANAUTH_CLIENT_SECERT": "x"},
        "token", "--client-id", "c", "--client-secret", "s", "--url", f"http://127.0.0.1:{free_port()}",
    )  # fmt: skip
    assert "WARNING leanauth.cli: unknown setting LEANAUTH_CLIENT_SECERT ignored" in warned.stderr
    assert "did you mean LEANAUTH_CLIENT_SECRET?" in warned.stderr


def test_every_variable_the_source_names_is_known() -> None:
    """Every LEANAUTH_* name in src/ is read by the settings (or a command's option): one
    list, derived from the code, says which names are known."""
    named: set[str] = set()
    for path in (ROOT / "src" / "leanauth").rglob("*.py"):
        # Whole names only: not the prefix of `LEANAUTH_{name}` or of a family of names.
        named |= set(re.findall(r"LEANAUTH_[A-Z0-9_]*[A-Z0-9](?![\w{])", path.read_text()))
    assert len(named) > 20, named
    assert unknown_variables(dict.fromkeys(named, "1"), option_variables(cli_main)) == []
    assert "LEANAUTH_KEY_ENCRYPTION_KEY_FILE" in known_variables()
    assert "LEANAUTH_DATABASE_URL" in known_variables()


def test_unknown_variables_and_their_likely_names() -> None:
    found = dict(
        unknown_variables(
            {
                "LEANAUTH_DATABSE_URL": "x",
                "LEANAUTH_ISSUR": "x",
                "LEANAUTH_LOGLEVEL": "x",
                "LEANAUTH_NONSENSE": "x",
                "LEANAUTH_PORT": "1",
                "LEANAUTH_TEST_POSTGRES_URL": "x",  # the test suite's own
                "PATH": "/bin",
            }
        )
    )
    assert found == {
        "LEANAUTH_DATABSE_URL": "LEANAUTH_DATABASE_URL",
        "LEANAUTH_ISSUR": "LEANAUTH_ISSUER",
        "LEANAUTH_LOGLEVEL": "LEANAUTH_LOG_LEVEL",
        "LEANAUTH_NONSENSE": None,
    }


# 3. A database a newer release migrated


def stamp(url: str, revision: str) -> None:
    """Set the database's Alembic revision, as a newer release's `db upgrade` would."""
    engine = engine_for(url)
    try:
        with engine.begin() as conn:
            conn.execute(text("UPDATE alembic_version SET version_num = :r"), {"r": revision})
    finally:
        engine.dispose()


@pytest.fixture
def ahead(tmp_path: Path, database_url: str) -> Env:
    """An installation (SQLite, then PostgreSQL) a newer release has upgraded."""
    env = installation(tmp_path, database_url, **FAST_STOP)
    create_app(env, "--name", "Made before the upgrade")
    stamp(database_url, FUTURE_REVISION)
    return env


AHEAD_LINE = (
    f"error: ahead: this is leanauth {__version__}, the database was upgraded by a newer "
    f"release (revision {FUTURE_REVISION})"
)


@pytest.mark.parametrize(
    "args",
    [("db", "upgrade"), ("apps", "list"), ("keys", "rotate"), ("init",), ("serve",)],
    ids=" ".join,
)
def test_every_command_refuses_a_database_ahead(ahead: Env, args: tuple[str, ...]) -> None:
    proc = leanauth(ahead.vars, *args, "--json")
    assert one_error_line(proc) == AHEAD_LINE
    assert proc.returncode == EXIT_SCHEMA_AHEAD
    # Nothing was changed: still the newer release's revision.
    assert ahead.cli("db", "current")["revision"] == FUTURE_REVISION


def test_db_current_reports_ahead(ahead: Env) -> None:
    assert ahead.cli("db", "current") == {
        "revision": FUTURE_REVISION,
        "head": head_revision(),
        "current": False,
        "state": "ahead",
    }
    proc = leanauth(ahead.vars, "db", "current")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == (
        f"{FUTURE_REVISION} (head {head_revision()}, {AHEAD_LINE.removeprefix('error: ')})"
    )


def test_the_exit_status_stops_systemd_restarting() -> None:
    """The unit does not restart a node that refused a database ahead of it: restarting
    cannot help, and the README says so."""
    assert EXIT_SCHEMA_AHEAD not in (0, 1, 2, 3)  # ok, errors, usage, uvicorn's start-up
    unit = (ROOT / "deploy" / "leanauth.service").read_text()
    assert f"RestartPreventExitStatus={EXIT_SCHEMA_AHEAD}\n" in unit
    assert f"RestartPreventExitStatus={EXIT_SCHEMA_AHEAD}" in (ROOT / "README.md").read_text()


# 4. No guessed issuer on a public address


@pytest.mark.parametrize(
    "host_args",
    [("env", "0.0.0.0"), ("option", "::"), ("option", "192.0.2.10"), ("env", "auth.internal")],
    ids="-".join,
)
def test_serve_refuses_a_public_address_without_an_issuer(
    tmp_path: Path, host_args: tuple[str, str]
) -> None:
    how, host = host_args
    env = Env(tmp_path)
    env.cli("init")
    variables = {**env.vars, "LEANAUTH_PORT": str(free_port())}
    args: tuple[str, ...] = ("serve",)
    if how == "env":
        variables["LEANAUTH_HOST"] = host
    else:
        args += ("--host", host)
    line = one_error_line(leanauth(variables, *args), "LEANAUTH_ISSUER", host)
    assert "not a loopback address" in line


def test_a_public_address_with_an_issuer_serves(tmp_path: Path) -> None:
    env = Env(tmp_path, extra={**FAST_STOP, "LEANAUTH_HOST": "0.0.0.0"})
    running = start_server(env, issuer="https://auth.example.test")
    try:
        metadata = httpx.get(running.url + "/.well-known/oauth-authorization-server").json()
        assert metadata["issuer"] == "https://auth.example.test"
    finally:
        running.stop()


def test_localhost_keeps_the_default_issuer(tmp_path: Path) -> None:
    port = free_port()
    env = Env(tmp_path, extra={**FAST_STOP, "LEANAUTH_HOST": "localhost"})
    running = start_server(env, port)
    try:
        metadata = httpx.get(running.url + "/.well-known/oauth-authorization-server").json()
        assert metadata["issuer"] == f"http://localhost:{port}"
    finally:
        running.stop()


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost", "LOCALHOST"])
def test_loopback_addresses_need_no_issuer(host: str) -> None:
    assert guessed_issuer(Settings.from_env({"LEANAUTH_HOST": host}), {}) is None


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "2001:db8::1", "auth.internal"])
def test_other_addresses_need_an_issuer(host: str) -> None:
    environ = {"LEANAUTH_HOST": host}
    assert guessed_issuer(Settings.from_env(environ), environ) is not None
    environ["LEANAUTH_ISSUER"] = "https://auth.example.test"
    assert guessed_issuer(Settings.from_env(environ), environ) is None


# 5. `db backup`


@pytest.fixture
def busy_server(tmp_path: Path) -> Iterator[tuple[Env, list[AppCredentials], threading.Event]]:
    """A running SQLite installation issuing tokens (each one writes usage and audit rows)
    until the event is set."""
    env = installation(tmp_path, sqlite_url(tmp_path / "leanauth.db"), **FAST_STOP)
    with serving(env) as server:
        apps = [create_app(env, "--name", f"Backed-up app {n}") for n in range(3)]
        for app in apps:
            wait_until_known(server, app)
        stop = threading.Event()
        issued: list[int] = []

        def issue() -> None:
            while not stop.is_set():
                issued.append(request_token(server, apps[len(issued) % 3]).status_code)

        worker = threading.Thread(target=issue)
        worker.start()
        try:
            wait_for(lambda: len(issued) >= 20, timeout=10)
            yield env, apps, stop
        finally:
            stop.set()
            worker.join()
        assert set(issued) == {200}


def test_a_backup_taken_while_serving_opens_and_holds_the_apps(
    tmp_path: Path, busy_server: tuple[Env, list[AppCredentials], threading.Event]
) -> None:
    env, apps, _ = busy_server
    target = tmp_path / "backups" / "leanauth-backup.db"
    target.parent.mkdir()
    proc = leanauth(env.vars, "db", "backup", str(target), "--json")
    assert proc.returncode == 0, proc.stderr
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    # One self-contained file: no journal beside it, no temporary file left.
    assert [p.name for p in target.parent.iterdir()] == [target.name]
    with sqlite3.connect(f"file:{target}?mode=ro", uri=True) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("delete",)
        backed_up = {row[0] for row in conn.execute("SELECT client_id FROM apps")}
    assert {app.client_id for app in apps} <= backed_up
    # Restored (the backup as the database, with the same key-encryption key), it serves.
    restored = {**env.vars, "LEANAUTH_DATABASE_URL": sqlite_url(target)}
    listed = leanauth(restored, "apps", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert {app.client_id for app in apps} <= {a["client_id"] for a in json.loads(listed.stdout)}


def test_a_backup_never_replaces_a_file(tmp_path: Path) -> None:
    env = Env(tmp_path)
    env.cli("init")
    target = tmp_path / "existing.db"
    target.write_text("keep me")
    proc = leanauth(env.vars, "db", "backup", str(target))
    one_error_line(proc, str(target), "exists")
    assert target.read_text() == "keep me"
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".existing.db")]


def test_backup_on_postgres_gives_the_pg_dump_recipe(postgres: PostgresDatabases) -> None:
    url = postgres.create().replace("postgres@", "postgres:hunter2-password@")
    proc = leanauth({"LEANAUTH_DATABASE_URL": url}, "db", "backup", "backup.dump")
    line = one_error_line(proc, "pg_dump")
    assert 'pg_dump --format=custom --file=FILE "$LEANAUTH_DATABASE_URL"' in line
    assert "hunter2" not in proc.stderr
    assert line.split(": ", 2)[2] in (ROOT / "README.md").read_text()


# A database that does not answer


@pytest.fixture
def silent_database() -> Iterator[str]:
    """A PostgreSQL URL whose server accepts connections and never answers (a black hole:
    a vanished host behind a load balancer, a firewall that drops replies)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    try:
        yield f"postgresql://leanauth:hunter2@127.0.0.1:{listener.getsockname()[1]}/leanauth"
    finally:
        listener.close()


def test_a_command_gives_up_on_a_silent_database_and_names_the_setting(
    tmp_path: Path, silent_database: str
) -> None:
    env = {
        **os.environ,
        "LEANAUTH_DATABASE_URL": silent_database,
        "LEANAUTH_KEY_ENCRYPTION_KEY": os.urandom(32).hex(),
    }
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "leanauth", "apps", "list"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    waited = time.monotonic() - started
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "LEANAUTH_DATABASE_URL" in lines[0]
    assert "waited at most 3s" in lines[0]
    assert "hunter2" not in proc.stderr
    # The deadline, not the database, ends the wait (a few seconds, never a hang).
    assert waited < 15
