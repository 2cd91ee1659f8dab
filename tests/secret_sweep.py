"""The secret sweep: after the whole suite, no client secret or access token that the test
helpers saw may appear in any server log or any audit trail (SQLite and PostgreSQL).

The helpers in conftest.py record every client secret and access token they see with
:func:`record_secret` and :func:`record_token`. At the end of the session the sweep searches

- every ``*.log`` file under the session's base temporary directory (the servers' logs),
- the ``audit_events`` table of every SQLite database (``*.db``) under it,
- the ``audit_events`` table of every PostgreSQL test database, scanned by
  :func:`scan_postgres` from ``PostgresDatabases.drop_all`` just before they are dropped,

for each secret (also without its ``lsk_`` prefix) and each token (also its signature
alone). A hit fails the session naming the place and the kind of value, never the value.

``demo-app.json`` (it holds the demo secret by design) and the ``client_secrets`` table
(hashes only) are not searched.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

SECRET_PREFIX = "lsk_"
# Secrets and JWT parts are base64url: any occurrence of one lies inside a maximal run of
# these characters, so the search only looks inside such runs.
_RUN = re.compile(r"[A-Za-z0-9_-]{16,}")


@dataclass
class SweepState:
    secrets: set[str] = field(default_factory=set)
    tokens: set[str] = field(default_factory=set)
    logs_scanned: int = 0
    tables_scanned: int = 0
    postgres_scanned: int = 0
    # (where, what kind of value): never the value itself.
    hits: list[tuple[str, str]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    # Whether a test that ran used an ``app`` fixture (one that creates an app and gets a
    # token from a running server): then there must have been something to search.
    expect_something: bool = False


STATE = SweepState()


def record_secret(secret: object) -> None:
    if isinstance(secret, str) and secret:
        STATE.secrets.add(secret)


def record_token(token: object) -> None:
    if isinstance(token, str) and token.count(".") == 2:
        STATE.tokens.add(token)


def record_values(data: Any) -> None:
    """Record every ``client_secret`` and ``access_token`` anywhere in a JSON value."""
    if isinstance(data, dict):
        for key, value in data.items():
            if key == "client_secret":
                record_secret(value)
            elif key == "access_token":
                record_token(value)
            else:
                record_values(value)
    elif isinstance(data, list):
        for item in data:
            record_values(item)


class Needles:
    """What to look for. Only the shortest form of each value is searched (the secret
    without its prefix, the token's signature); the kind of a hit is decided after."""

    def __init__(self, secrets: Iterable[str], tokens: Iterable[str]) -> None:
        # needle → (kind when the needle alone is found, longer form, kind of the longer form)
        self.meaning: dict[str, tuple[str, str, str]] = {}
        for secret in secrets:
            bare = secret.removeprefix(SECRET_PREFIX)
            self.meaning[bare] = ("client secret without its lsk_ prefix", secret, "client secret")
        for token in tokens:
            signature = token.rsplit(".", 1)[1]
            if signature:
                self.meaning[signature] = ("access token signature", token, "access token")
        self.by_length: dict[int, set[str]] = {}
        for needle in self.meaning:
            self.by_length.setdefault(len(needle), set()).add(needle)

    def find(self, text: str) -> set[str]:
        """The kinds of value found in ``text``."""
        kinds: set[str] = set()
        for run in _RUN.findall(text):
            for length, needles in self.by_length.items():
                for start in range(len(run) - length + 1):
                    needle = run[start : start + length]
                    if needle in needles:
                        alone, longer, longer_kind = self.meaning[needle]
                        kinds.add(longer_kind if longer in text else alone)
        return kinds


def _row_text(rows: Iterable[Iterable[object]]) -> str:
    return "\n".join(" ".join("" if v is None else str(v) for v in row) for row in rows)


def _needles() -> Needles:
    return Needles(STATE.secrets, STATE.tokens)


def scan_postgres(urls: Iterable[str]) -> None:
    """Search the audit trail of each PostgreSQL database (called before they are dropped).
    Records hits and errors in :data:`STATE`; never raises."""
    urls = list(urls)
    if not urls:
        return
    import psycopg

    needles = _needles()
    for url in urls:
        name = url.rsplit("/", 1)[1]
        try:
            with psycopg.connect(url, connect_timeout=5) as conn:
                exists = conn.execute("SELECT to_regclass('public.audit_events')").fetchone()
                if not exists or exists[0] is None:
                    continue
                text = _row_text(conn.execute("SELECT * FROM audit_events").fetchall())
        except Exception as exc:
            STATE.errors.append(f"PostgreSQL database {name}: {type(exc).__name__}")
            continue
        STATE.tables_scanned += 1
        STATE.postgres_scanned += 1
        for kind in sorted(needles.find(text)):
            STATE.hits.append((f"PostgreSQL database {name}, table audit_events", kind))


def _scan_sqlite(path: Path, needles: Needles) -> None:
    with path.open("rb") as handle:
        if handle.read(16) != b"SQLite format 3\x00":
            return  # empty, or not a database (a test's deliberately broken file)
    try:
        conn = sqlite3.connect(path, timeout=10)
        try:
            found = conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'audit_events'"
            ).fetchone()
            if found is None:
                return
            text = _row_text(conn.execute("SELECT * FROM audit_events").fetchall())
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        STATE.errors.append(f"SQLite database {path}: {type(exc).__name__}")
        return
    STATE.tables_scanned += 1
    for kind in sorted(needles.find(text)):
        STATE.hits.append((f"SQLite database {path}, table audit_events", kind))


def _scan_log(path: Path, needles: Needles) -> None:
    text = path.read_text(errors="replace")
    STATE.logs_scanned += 1
    for kind in sorted(needles.find(text)):
        STATE.hits.append((f"log file {path}", kind))


def sweep(base: Path) -> None:
    needles = _needles()
    for path in sorted(base.rglob("*.log")):
        if path.is_file():
            _scan_log(path, needles)
    for path in sorted(base.rglob("*.db")):
        if path.is_file():
            _scan_sqlite(path, needles)


def verdict() -> str | None:
    """Why the sweep fails, or None."""
    if STATE.hits:
        lines = [f"  {kind} found in {where}" for where, kind in STATE.hits]
        return "secrets or tokens leaked:\n" + "\n".join(lines)
    if STATE.errors:
        return "could not search:\n" + "\n".join(f"  {e}" for e in STATE.errors)
    if not STATE.expect_something and not STATE.tokens:
        # A subset of the suite that got no token from a server may have nothing to search;
        # a token comes from a server with a log and an audit trail, for a secret.
        return None
    problems = []
    if not STATE.logs_scanned:
        problems.append("no server log was searched")
    if not STATE.tables_scanned:
        problems.append("no audit_events table was searched")
    if not STATE.secrets:
        problems.append("no client secret was recorded by the helpers")
    if not STATE.tokens:
        problems.append("no access token was recorded by the helpers")
    if problems:
        return "the sweep checked nothing useful: " + "; ".join(problems)
    return None


@pytest.fixture(scope="session", autouse=True)
def secret_sweep(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Session-wide: its teardown runs after every other session fixture's (it is set up
    first), so every server has stopped and the PostgreSQL databases were scanned."""
    yield STATE
    sweep(tmp_path_factory.getbasetemp())
    problem = verdict()
    if problem is not None:
        pytest.fail(f"secret sweep: {problem}", pytrace=False)


def pytest_runtest_call(item: pytest.Item) -> None:
    if "app" in getattr(item, "fixturenames", ()):
        STATE.expect_something = True


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if STATE.logs_scanned or STATE.tables_scanned:
        terminalreporter.write_line(
            f"secret sweep: searched {STATE.logs_scanned} logs and {STATE.tables_scanned} "
            f"audit tables ({STATE.postgres_scanned} on PostgreSQL) for "
            f"{len(STATE.secrets)} secrets and {len(STATE.tokens)} tokens: "
            f"{len(STATE.hits)} hits"
        )
