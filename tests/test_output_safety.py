"""What reaches an operator's log or terminal: one record per line, no escape sequence, no
database password, whatever a request or an audit row carried."""

from __future__ import annotations

import base64
import json
import logging
import re
import socket
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import httpx
import pytest
from click.testing import CliRunner, Result

from conftest import (
    Env,
    PostgresDatabases,
    Server,
    create_app,
    request_token,
    start_server,
    wait_until_known,
)
from leanauth.cli import main as cli_main
from leanauth.logs import configure_logging

# Attacker-chosen text: a forged line after a newline, a carriage return, a clear-screen
# (CSI) and a window-title (OSC) escape sequence, an 8-bit CSI (C1), a line separator and a
# right-to-left override.
HOSTILE = "x\nFORGED line\rover\x1b[2J\x1b]0;owned\x07\x9b31m\u2028FORGED\u202eend"
# What a terminal or a line-based log reader would act on.
RAW_CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e]")
PLAIN_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")


def run_text(env: Env, *args: str) -> Result:
    """Run a command for people (no --json), as an operator at a terminal would."""
    return CliRunner().invoke(cli_main, list(args), env=env.vars, catch_exceptions=False)


def assert_no_raw_controls(text: str) -> None:
    found = RAW_CONTROLS.search(text)
    assert found is None, f"raw {found.group()!r} in output" if found else ""


# The CLI's text output


def insert_audit_row(db: Path, client_id: str, source: str, detail: object) -> None:
    conn = sqlite3.connect(db)
    try:
        conn.execute(
            "INSERT INTO audit_events (at_ms, kind, outcome, client_id, source, detail)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (1_700_000_000_000, "token", "invalid_client", client_id, source, json.dumps(detail)),
        )
        conn.commit()
    finally:
        conn.close()


def test_audit_list_text_escapes_hostile_rows(tmp_path: Path) -> None:
    env = Env(tmp_path)
    env.cli("init")
    detail = {"reason": HOSTILE, HOSTILE: "key", "nested": {"scope": HOSTILE}}
    insert_audit_row(tmp_path / "leanauth.db", HOSTILE, HOSTILE, detail)
    events = env.cli("audit", "list")
    # JSON keeps the text exactly (escaped by JSON itself) ...
    assert events[-1]["client_id"] == HOSTILE
    assert events[-1]["detail"] == detail
    raw_json = CliRunner().invoke(cli_main, ["audit", "list", "--json"], env=env.vars)
    assert raw_json.exit_code == 0
    assert "\x1b" not in raw_json.stdout
    assert "\r" not in raw_json.stdout
    # ... and the text output shows it escaped: one line per event, no escape sequence.
    result = run_text(env, "audit", "list")
    assert result.exit_code == 0, result.output
    assert_no_raw_controls(result.stdout)
    lines = result.stdout.splitlines()
    assert len(lines) == len(events)
    hostile_line = lines[-1]
    assert hostile_line.startswith("2023-11-14T22:13:20.000Z  token  invalid_client  x\\x0a")
    assert "\\x1b[2J" in hostile_line
    assert "reason=x\\x0aFORGED" in hostile_line
    assert not any(line.startswith("FORGED") for line in lines)


def test_cli_error_messages_are_escaped(tmp_path: Path) -> None:
    env = Env(tmp_path)
    env.cli("init")
    result = run_text(env, "apps", "show", HOSTILE)
    assert result.exit_code == 1
    assert_no_raw_controls(result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: no app with client id x\\x0aFORGED")


# Log formatters


@pytest.fixture
def root_logger() -> Iterator[logging.Logger]:
    """The root logger, restored after the test has configured it."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield root
    root.handlers[:] = handlers
    root.setLevel(level)


def log_hostile_records(capsys: pytest.CaptureFixture[str], log_format: str) -> str:
    configure_logging("info", log_format)  # its handler writes to the captured stderr
    log = logging.getLogger("leanauth.test")
    log.warning("refused client %s", HOSTILE)
    try:
        raise ValueError(HOSTILE)
    except ValueError:
        log.exception("request failed: %s", HOSTILE)
    return capsys.readouterr().err


@pytest.mark.usefixtures("root_logger")
def test_plain_log_lines_escape_the_message(capsys: pytest.CaptureFixture[str]) -> None:
    output = log_hostile_records(capsys, "plain")
    assert_no_raw_controls(output)
    lines = output.splitlines()
    assert PLAIN_LINE.match(lines[0])
    assert lines[0].endswith(
        "WARNING leanauth.test: refused client x\\x0aFORGED line\\x0dover\\x1b[2J"
        "\\x1b]0;owned\\x07\\x9b31m\\u2028FORGED\\u202eend"
    )
    # The traceback keeps its lines, escaped and indented: only records start a line.
    assert PLAIN_LINE.match(lines[1])
    assert "request failed: x\\x0aFORGED" in lines[1]
    assert lines[2] == "  Traceback (most recent call last):"
    assert lines[-2] == "  ValueError: x"
    assert lines[-1].startswith("  FORGED line\\x0dover\\x1b[2J")
    assert all(line.startswith("  ") for line in lines[2:])


@pytest.mark.usefixtures("root_logger")
def test_json_log_lines_keep_the_message_and_escape_it(capsys: pytest.CaptureFixture[str]) -> None:
    output = log_hostile_records(capsys, "json")
    assert_no_raw_controls(output)
    records = [json.loads(line) for line in output.splitlines()]
    assert len(records) == 2
    assert records[0]["message"] == f"refused client {HOSTILE}"
    assert records[1]["message"] == f"request failed: {HOSTILE}"
    assert records[1]["exception"].endswith(f"ValueError: {HOSTILE}")


# A real server's log


def raw_http(server: Server, request: bytes) -> bytes:
    """Send bytes no HTTP client would (control characters in a header or the path)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def send_hostile_requests(server: Server, client_id: str) -> None:
    q = quote(HOSTILE, safe="")
    form = {"content-type": "application/x-www-form-urlencoded"}
    token_url, introspect_url = server.token_url, server.url + "/oauth2/introspect"
    bodies = [
        # Every field hostile, and a hostile unknown parameter.
        f"grant_type={q}&client_id={q}&client_secret={q}&scope={q}&{q}={q}",
        # A known client with a hostile secret, then with a hostile scope.
        f"grant_type=client_credentials&client_id={client_id}&client_secret={q}&scope=api",
        f"grant_type=client_credentials&client_id={client_id}&client_secret=x&scope={q}",
        # Text the parse-time check lets through (no C0/C1 control): still escaped in logs.
        "grant_type=client_credentials&client_id=x%E2%80%A8FORGED%E2%80%AE&client_secret=x",
    ]
    with httpx.Client(timeout=10) as http:
        # Enough failures of one client id to have the throttle block it (and log it).
        for _ in range(12):
            http.post(token_url, content=bodies[-1], headers=form)
        for body in bodies:
            http.post(token_url, content=body, headers=form)
            http.post(introspect_url, content=f"token={q}&{body}", headers=form)
            http.post(server.url + "/oauth2/revoke", content=f"token={q}&{body}", headers=form)
        for user, password in ((HOSTILE, HOSTILE), (q, q), ("x\u2028FORGED", "x")):
            basic = base64.b64encode(f"{user}:{password}".encode()).decode()
            http.post(
                token_url,
                content=f"grant_type=client_credentials&scope={q}",
                headers={**form, "authorization": f"Basic {basic}", "x-forwarded-for": q},
            )
        http.post(token_url + f"/{q}", content=f"scope={q}", headers=form)
        http.get(server.url + f"/customers/v1/{q}", headers={"authorization": f"Bearer {q}"})
    # Bytes in a header and in the path that no client library sends.
    hostile = HOSTILE.encode("utf-8")
    body = f"grant_type=client_credentials&client_id={q}&client_secret=x".encode()
    for target, extra in (
        (b"/oauth2/token", b"X-Forwarded-For: \x1b[2J\x9b31m, 203.0.113.9\r\n"),
        (b"/oauth2/token", b"Authorization: Basic \x1b[2J" + base64.b64encode(hostile) + b"\r\n"),
        (b"/oauth2/token?" + q.encode(), b""),
        (b"/oauth2/\x1b[2J" + hostile.replace(b"\n", b"").replace(b"\r", b""), b""),
    ):
        raw_http(
            server,
            b"POST "
            + target
            + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            + extra
            + b"Content-Type: application/x-www-form-urlencoded\r\n"
            + b"Content-Length: "
            + str(len(body)).encode()
            + b"\r\n\r\n"
            + body,
        )


def run_hostile_server(tmp_path: Path, log_format: str) -> str:
    """A server's whole log (stopped: the audit records are flushed) after hostile requests."""
    env = Env(
        tmp_path,
        {
            "LEANAUTH_LOG_FORMAT": log_format,
            "LEANAUTH_AUDIT_LOG": "all",
            "LEANAUTH_TRUSTED_PROXIES": "127.0.0.1",
        },
    )
    server = start_server(env)
    try:
        app = create_app(env, "--name", "Hostile")
        wait_until_known(server, app)
        token = request_token(server, app).json()["access_token"]
        send_hostile_requests(server, app.client_id)
        httpx.post(
            server.url + "/customers/v1",
            json={"app_user_id": HOSTILE},
            headers={"authorization": f"Bearer {token}"},
            timeout=10,
        )
    finally:
        server.stop()
    return server.log()


def test_server_log_lines_stay_whole_plain(tmp_path: Path) -> None:
    log = run_hostile_server(tmp_path, "plain")
    assert_no_raw_controls(log)
    for line in log.splitlines():
        assert PLAIN_LINE.match(line), f"not a log line: {line!r}"
    assert "FORGED" in log  # the hostile text did reach the log


def test_server_log_lines_stay_whole_json(tmp_path: Path) -> None:
    log = run_hostile_server(tmp_path, "json")
    assert_no_raw_controls(log)
    records = [json.loads(line) for line in log.splitlines()]
    assert all(isinstance(r, dict) and "message" in r for r in records)
    assert any("FORGED" in r["message"] for r in records)


# Database passwords


def with_password(url: str, password: str) -> str:
    parts = urlsplit(url)
    user, _, host = parts.netloc.rpartition("@")
    return urlunsplit(parts._replace(netloc=f"{user or 'postgres'}:{password}@{host}"))


def test_init_never_prints_the_database_password(
    tmp_path: Path, postgres: PostgresDatabases
) -> None:
    password = "S3cretPW-9f1c"  # the test server trusts every connection: any password works
    plain_url = postgres.create()
    url = with_password(plain_url, password)
    env = Env(
        tmp_path,
        {"LEANAUTH_DATABASE_URL": url, "LEANAUTH_KEY_ENCRYPTION_KEY_FILE": str(tmp_path / "kek")},
    )
    as_json = CliRunner().invoke(cli_main, ["init", "--json"], env=env.vars)
    as_text = run_text(env, "init", "--demo")
    for result in (as_json, as_text):
        assert result.exit_code == 0, result.output
        assert password not in result.stdout
        assert password not in result.stderr
    masked = with_password(plain_url, "***")
    assert json.loads(as_json.stdout)["database_url"] == masked
    assert f"database ready: {masked}" in as_text.stdout
