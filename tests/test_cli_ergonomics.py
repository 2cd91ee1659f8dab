"""The command line's rough edges: --json errors, quiet schema commands, ``token --url``.

Exit statuses and stderr are the contract here, so most commands run as real processes.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator, Mapping
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner, Result

from conftest import (
    RELAXED_THROTTLE,
    AppCredentials,
    Env,
    Server,
    create_app,
    free_port,
    module_app,
    module_server,
)
from leanauth.cli import main as cli_main
from leanauth.cli.common import EXIT_SCHEMA_AHEAD
from leanauth.cli.token import token_endpoint
from leanauth.store.migrate import known_revisions

env, server = module_server("cli_ergonomics", **RELAXED_THROTTLE)
app = module_app("--scopes", "api")


def leanauth(variables: Mapping[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """``python -m leanauth ARGS`` with ``variables`` and none of the caller's LEANAUTH_*."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("LEANAUTH_")}
    return subprocess.run(
        [sys.executable, "-m", "leanauth", *args],
        env={**environ, **variables},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def json_error(status: int, stderr: str, code: str, *words: str) -> str:
    """A --json failure: exit ``status`` and stderr one JSON object with ``code``; its message."""
    assert status != 0
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    error = json.loads(lines[0])
    assert set(error) == {"error", "message"}, error
    assert error["error"] == code, error
    for word in words:
        assert word in error["message"], error
    return str(error["message"])


def failed(proc: subprocess.CompletedProcess[str], code: str, status: int = 1) -> str:
    """``proc`` failed with ``status``, printing only the JSON error: its message."""
    assert proc.returncode == status, proc.stdout + proc.stderr
    assert proc.stdout == ""
    return json_error(proc.returncode, proc.stderr, code)


def run_json(env: Env, *args: str) -> Result:
    """``leanauth ARGS --json`` in process (the env's database prepared, see Env.cli)."""
    result: Result = env.cli(*args, expect_ok=False)
    return result


def in_process_error(result: Result, code: str, status: int = 1, *words: str) -> str:
    assert result.exit_code == status, result.output
    assert result.stdout == ""
    return json_error(result.exit_code, result.stderr, code, *words)


def unknown_app() -> str:
    return str(uuid.uuid4())


# 1. --json errors


def test_a_missing_app_is_a_json_error(env: Env) -> None:
    client_id = unknown_app()
    for command in (["apps", "show"], ["apps", "disable"], ["customers", "list", "--app"]):
        result = run_json(env, *command, client_id)
        in_process_error(result, "not_found", 1, client_id)


def test_a_duplicate_customer_is_a_json_error(env: Env, app: AppCredentials) -> None:
    args = ("customers", "create", "--app", app.client_id, "--app-user-id", "twice")
    env.cli(*args)
    in_process_error(run_json(env, *args), "already_exists", 1, "twice")


def test_a_racing_secret_rotation_is_a_json_conflict(env: Env) -> None:
    created = create_app(env, "--name", "Rotated twice")
    env.cli("apps", "rotate-secret", created.client_id)
    result = run_json(env, "apps", "rotate-secret", created.client_id)
    in_process_error(result, "conflict")


def test_a_bad_value_is_a_json_error(env: Env) -> None:
    in_process_error(run_json(env, "apps", "create", "--name", ""), "invalid_value")


@pytest.mark.parametrize(
    ("args", "words"),
    [
        pytest.param(["apps", "create"], ["--name"], id="missing-option"),
        pytest.param(["apps", "create", "--name", "x", "--token-ttl", "soon"], ["soon"], id="int"),
        pytest.param(["apps", "rotate-secret", "x", "--grace", "soon"], ["soon"], id="duration"),
        pytest.param(["audit", "list", "--since", "soon"], ["soon"], id="in-the-command"),
        pytest.param(["keys", "list", "--no-such-option"], ["--no-such-option"], id="unknown"),
    ],
)
def test_usage_errors_are_json_errors(env: Env, args: list[str], words: list[str]) -> None:
    in_process_error(run_json(env, *args), "usage", 2, *words)


def test_usage_errors_without_json_are_as_before(env: Env) -> None:
    result = CliRunner().invoke(cli_main, ["apps", "create"], env=env.vars)
    assert result.exit_code == 2
    assert "Usage: leanauth apps create" in result.stderr
    assert "Error: Missing option '--name'." in result.stderr


def test_words_after_a_double_dash_ask_for_nothing(env: Env) -> None:
    result = CliRunner().invoke(cli_main, ["apps", "create", "--", "--json"], env=env.vars)
    assert result.exit_code == 2
    assert "Error: " in result.stderr


def commands_with_json(group: click.Group, path: tuple[str, ...] = ()) -> Iterator[list[str]]:
    """The path of every command that takes --json, including commands added later."""
    context = click.Context(group)
    for name in group.list_commands(context):
        command = group.get_command(context, name)
        if isinstance(command, click.Group):
            yield from commands_with_json(command, (*path, name))
        elif command is not None and any(p.name == "as_json" for p in command.params):
            yield [*path, name]


def test_every_command_with_json_has_json_usage_errors() -> None:
    commands = list(commands_with_json(cli_main))
    assert ["token"] in commands
    for path in commands:
        # An unknown option, and arguments no command takes: `keys revoke` takes the first
        # for its kid (a kid may begin with "-"), and then refuses the others.
        result = CliRunner().invoke(cli_main, [*path, "--no-such-option", "a", "b", "c", "--json"])
        in_process_error(result, "usage", 2)


def test_a_hostile_message_stays_one_json_line(env: Env) -> None:
    client_id = "x\nFORGED\x1b[2J\u202e"
    result = run_json(env, "apps", "show", client_id)
    message = in_process_error(result, "not_found")
    assert client_id in message
    assert "\x1b" not in result.stderr  # escaped by JSON, as every control character


def test_without_json_errors_are_as_before(env: Env) -> None:
    client_id = unknown_app()
    result = CliRunner().invoke(cli_main, ["apps", "show", client_id], env=env.vars)
    assert result.exit_code == 1
    assert result.stderr == f"error: no app with client id {client_id}\n"


@pytest.mark.parametrize(
    "args", [["db", "current"], ["apps", "list"], ["keys", "list"], ["db", "backup", "b.db"]]
)
def test_a_database_not_initialised_is_a_json_error(tmp_path: Path, args: list[str]) -> None:
    database = tmp_path / "data" / "leanauth.db"
    proc = leanauth({"LEANAUTH_DATABASE_URL": f"sqlite:///{database}"}, *args, "--json")
    assert "run `leanauth init`" in failed(proc, "not_initialised")
    assert not database.parent.exists()


def test_a_database_ahead_is_a_json_error_with_its_exit_status(tmp_path: Path) -> None:
    env = Env(tmp_path)
    env.cli("init")
    database = tmp_path / "leanauth.db"
    with sqlite3.connect(database) as conn:
        conn.execute("UPDATE alembic_version SET version_num = '9999'")
    failed(leanauth(env.vars, "apps", "list", "--json"), "schema_ahead", EXIT_SCHEMA_AHEAD)
    # db current still answers: saying where the database stands is its job.
    current = leanauth(env.vars, "db", "current", "--json")
    assert current.returncode == 0, current.stderr
    assert json.loads(current.stdout)["state"] == "ahead"


def test_an_unreachable_database_is_a_json_error(tmp_path: Path) -> None:
    url = f"postgresql://nobody@127.0.0.1:{free_port()}/nothing"
    proc = leanauth({"LEANAUTH_DATABASE_URL": url}, "apps", "list", "--json")
    assert "LEANAUTH_DATABASE_URL" in failed(proc, "database_unavailable")


def test_a_bad_setting_is_a_json_error(tmp_path: Path) -> None:
    variables = {"LEANAUTH_DATABASE_URL": f"sqlite:///{tmp_path / 'x.db'}"}
    proc = leanauth({**variables, "LEANAUTH_TOKEN_TTL": "soon"}, "apps", "list", "--json")
    assert "LEANAUTH_TOKEN_TTL" in failed(proc, "invalid_settings")


# 2. Quiet schema commands


def older_database(env: Env) -> None:
    """``env``'s database at the revision before head, as an older release left it."""
    from alembic import command

    from leanauth.store.migrate import _config
    from leanauth.store.sql import SqlStore

    store = SqlStore(env.vars["LEANAUTH_DATABASE_URL"])
    try:
        with store.engine.connect() as conn:
            command.upgrade(_config(conn), sorted(known_revisions())[-2])
            conn.commit()
    finally:
        store.close()


def test_db_current_prints_only_the_revision(env: Env) -> None:
    env.prepare()
    text = leanauth(env.vars, "db", "current")
    assert text.returncode == 0, text.stderr
    assert text.stderr == ""
    assert len(text.stdout.splitlines()) == 1
    assert "up to date" in text.stdout
    as_json = leanauth(env.vars, "db", "current", "--json")
    assert as_json.stderr == ""
    assert json.loads(as_json.stdout)["state"] == "current"


def test_init_and_upgrade_print_no_log_lines(tmp_path: Path) -> None:
    variables = Env(tmp_path).vars
    for args in (["init"], ["db", "upgrade"], ["init", "--json"], ["db", "upgrade", "--json"]):
        proc = leanauth(variables, *args)
        assert proc.returncode == 0, proc.stderr
        assert proc.stderr == "", args


def test_migrations_log_only_at_debug(tmp_path: Path) -> None:
    quiet, verbose = Env(tmp_path / "quiet"), Env(tmp_path / "verbose")
    for env in (quiet, verbose):
        older_database(env)
    proc = leanauth(quiet.vars, "db", "upgrade")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    proc = leanauth({**verbose.vars, "LEANAUTH_LOG_LEVEL": "debug"}, "db", "upgrade")
    assert proc.returncode == 0, proc.stderr
    assert "Running upgrade" in proc.stderr


# 3. token --url


@pytest.mark.parametrize(
    "endpoint_url",
    [
        pytest.param(lambda url: url, id="base"),
        pytest.param(lambda url: url + "/", id="base-slash"),
        pytest.param(lambda url: url + "/oauth2/token", id="token-url"),
        pytest.param(lambda url: url + "/oauth2/token/", id="token-url-slash"),
    ],
)
def test_token_takes_the_base_or_the_token_url(
    server: Server, app: AppCredentials, endpoint_url: Any
) -> None:
    proc = leanauth(
        {}, "token", "--client-id", app.client_id, "--client-secret", app.client_secret,
        "--url", endpoint_url(server.url), "--json",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["token_type"] == "Bearer"
    assert proc.stderr == ""  # httpx's line per request is for debug


def test_token_endpoint_from_url() -> None:
    assert token_endpoint("https://auth.example.com") == "https://auth.example.com/oauth2/token"
    assert token_endpoint("https://h/oauth2/token/") == "https://h/oauth2/token"
    assert token_endpoint("https://h/prefix/") == "https://h/prefix/oauth2/token"


def token_args(url: str, *more: str) -> list[str]:
    return ["token", "--client-id", "x", "--client-secret", "y", "--url", url, *more]


def test_token_names_the_url_it_could_not_reach() -> None:
    url = f"http://127.0.0.1:{free_port()}/oauth2/token"
    text = leanauth({}, *token_args(url))
    assert text.returncode == 1
    assert text.stderr.startswith(f"error: cannot reach {url}: ")
    assert len(text.stderr.splitlines()) == 1
    assert url in failed(leanauth({}, *token_args(url, "--json")), "unreachable")


def test_a_host_name_that_cannot_be_encoded_is_one_error_line() -> None:
    # A DNS label over 63 characters fails in the IDNA codec, before any connection.
    url = f"http://{'a' * 70}.example/oauth2/token"
    text = leanauth({}, *token_args(url))
    assert text.returncode == 1
    assert "Traceback" not in text.stderr
    assert text.stderr.startswith(f"error: cannot reach {url}: ")
    assert url in failed(leanauth({}, *token_args(url, "--json")), "unreachable")


def test_token_refused_names_the_url(server: Server, app: AppCredentials) -> None:
    url = server.url + "/oauth2/token"
    args = ["token", "--client-id", app.client_id, "--client-secret", "lsk_wrong", "--url", url]
    text = leanauth({}, *args)
    assert text.returncode == 1
    assert text.stdout == ""
    assert text.stderr.startswith(f"error: {url} answered HTTP 401: invalid_client")
    as_json = leanauth({}, *args, "--json")
    assert as_json.returncode == 1
    # The server's answer is still the output; the failure is on stderr as everywhere.
    assert json.loads(as_json.stdout)["error"] == "invalid_client"
    message = json_error(as_json.returncode, as_json.stderr, "token_refused", url)
    assert "HTTP 401" in message


class Answers(BaseHTTPRequestHandler):
    """Whatever is not a leanauth server: a proxy's HTML error page, or stray JSON."""

    def do_POST(self) -> None:  # http.server's name
        status, kind, body = {
            "/html/oauth2/token": (502, "text/html", b"<html>Bad gateway</html>"),
            "/empty/oauth2/token": (200, "application/json", b"{}"),
        }[self.path]
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def not_leanauth() -> Iterator[str]:
    httpd = HTTPServer(("127.0.0.1", 0), Answers)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.mark.parametrize("path", ["/html", "/empty"])
def test_token_names_the_url_of_an_answer_that_is_no_token(not_leanauth: str, path: str) -> None:
    url = f"{not_leanauth}{path}/oauth2/token"
    text = leanauth({}, *token_args(not_leanauth + path))
    assert text.returncode == 1
    assert text.stderr.startswith(f"error: {url} answered HTTP ")
    assert url in failed(leanauth({}, *token_args(url, "--json")), "bad_answer")
