"""The audit journal: a worker killed at any moment loses no audit record of a token its
clients received, and no usage count; records the database could not take at exit wait on
disk for the next start. Real servers, real kill -9, SQLite and PostgreSQL."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import orjson
import pytest
from sqlalchemy import text

from conftest import (
    Env,
    PostgresDatabases,
    claims_of,
    installation,
    known_app,
    start_server,
    token_form,
    wait_for,
)
from leanauth.journal import database_tag, decode
from leanauth.store.engine import engine_for
from test_operations import Load, alive, worker_pids


def jti_of(token: str) -> str:
    return str(claims_of(token)["jti"])


def audited_jtis(database_url: str) -> Counter[str]:
    """How many times each token's `issued` record is in the audit trail."""
    engine = engine_for(database_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                text("SELECT detail FROM audit_events WHERE kind = 'token' AND outcome = 'issued'")
            ).all()
    finally:
        engine.dispose()
    return Counter(str(orjson.loads(row.detail)["jti"]) for row in rows)


def usage_today(database_url: str, client_id: str) -> int:
    engine = engine_for(database_url)
    try:
        with engine.connect() as conn:
            value = conn.execute(
                text(
                    "SELECT tokens FROM app_usage WHERE client_id = :client"
                    " AND \"window\" LIKE 'd:%'"
                ),
                {"client": client_id},
            ).scalar()
    finally:
        engine.dispose()
    return int(value or 0)


@pytest.fixture(params=["sqlite", "postgresql"])
def node_env(request: pytest.FixtureRequest, tmp_path: Path) -> Env:
    if request.param == "sqlite":
        return Env(tmp_path)
    databases: PostgresDatabases = request.getfixturevalue("postgres")
    return installation(tmp_path, databases.create())


def journal_files(env: Env) -> list[Path]:
    return sorted((env.data_dir / "journal").glob("*.journal"))


def journaling(env: Env, pids: list[int]) -> int | None:
    """One of ``pids`` whose journal holds records now (segments are named after their
    writer's pid), or None."""
    sizes: Counter[int] = Counter()
    for path in journal_files(env):
        with contextlib.suppress(OSError, ValueError):
            sizes[int(path.name.split("-")[1])] += path.stat().st_size
    busy = [pid for pid in pids if sizes[pid] > 0]
    return busy[0] if busy else None


def test_a_killed_worker_loses_no_audit_record_and_no_usage(node_env: Env) -> None:
    server = start_server(node_env, None, "--workers", "2")
    try:
        creds = known_app(node_env, server, "--scopes", "api")
        wait_for(lambda: len(worker_pids(server.process.pid)) == 2, timeout=10)
        first = worker_pids(server.process.pid)
        with Load([server.url], creds, clients=4) as load:
            wait_for(lambda: len(load.received) > 300, timeout=30)
            # The kernel may hand every connection to one worker: kill one that journals.
            wait_for(lambda: journaling(node_env, first) is not None, timeout=10)
            victim = journaling(node_env, first)
            assert victim is not None
            # Mid-second, between two flushes: the killed worker holds records in memory.
            os.kill(victim, signal.SIGKILL)
            wait_for(lambda: len(set(worker_pids(server.process.pid)) - set(first)) == 1, 30)
            count = len(load.received)
            wait_for(lambda: len(load.received) > count + 300, timeout=30)
    finally:
        server.stop()
    url = node_env.vars["LEANAUTH_DATABASE_URL"]
    audited = audited_jtis(url)
    lost = [jti for jti in load.received if jti not in audited]
    assert not lost, f"{len(lost)} of {len(load.received)} tokens received were not audited"
    # A worker dying between a flush's commit and the deletion of its journal segment
    # (milliseconds) leaves records that are written twice; never more than one second's.
    duplicated = sum(n - 1 for n in audited.values())
    assert duplicated < len(load.received) // 2
    assert usage_today(url, creds.client_id) >= len(load.received)
    assert "took over" in server.log()
    assert journal_files(node_env) == []


def test_a_node_killed_whole_hands_its_records_to_the_next_start(node_env: Env) -> None:
    server = start_server(node_env, None, "--workers", "2")
    creds = known_app(node_env, server, "--scopes", "api")
    wait_for(lambda: len(worker_pids(server.process.pid)) == 2, timeout=10)
    workers = worker_pids(server.process.pid)
    with Load([server.url], creds, clients=4) as load:
        wait_for(lambda: len(load.received) > 200, timeout=30)
        # Workers first (their parent's death would make them stop cleanly), then the rest.
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
        server.process.kill()
    server.process.wait()
    wait_for(lambda: not any(alive(pid) for pid in workers), timeout=10)
    left = journal_files(node_env)
    assert left, "the killed workers left their journals"
    url = node_env.vars["LEANAUTH_DATABASE_URL"]
    restarted = start_server(node_env)
    try:
        wait_for(lambda: not any(path.exists() for path in left), timeout=15)
    finally:
        restarted.stop()
    audited = audited_jtis(url)
    assert [jti for jti in load.received if jti not in audited] == []
    assert usage_today(url, creds.client_id) >= len(load.received)


def test_records_the_database_refuses_at_exit_wait_for_the_next_start(
    postgres: PostgresDatabases, tmp_path: Path
) -> None:
    url = postgres.create()
    env = installation(tmp_path, url)
    server = start_server(env)
    creds = known_app(env, server, "--scopes", "api")
    received = []
    with postgres.offline(url):
        with httpx.Client(timeout=10) as client:
            for _ in range(20):
                response = client.post(server.token_url, data=token_form(creds))
                assert response.status_code == 200  # served from memory
                received.append(jti_of(response.json()["access_token"]))
        server.stop()
        assert server.process.returncode == 0
        assert "wait in" in server.log()
        left = journal_files(env)
        assert left
    restarted = start_server(env)
    try:
        wait_for(lambda: not any(path.exists() for path in left), timeout=15)
    finally:
        restarted.stop()
    audited = audited_jtis(url)
    assert all(audited[jti] == 1 for jti in received)


def test_nodes_sharing_a_journal_folder_write_each_record_once(tmp_path: Path) -> None:
    env = Env(tmp_path)
    servers = [start_server(env), start_server(env, None, "--workers", "2")]
    creds = known_app(env, servers[0], "--scopes", "api")
    received: list[str] = []
    try:
        for server in servers:
            with Load([server.url], creds, clients=2) as load:
                wait_for(lambda load=load: len(load.received) > 300, timeout=30)
            received += load.received
    finally:
        for server in servers:
            server.stop()
    audited = audited_jtis(env.vars["LEANAUTH_DATABASE_URL"])
    assert all(audited[jti] == 1 for jti in received)
    assert sum(audited.values()) >= len(received)
    assert journal_files(env) == []


def test_a_torn_last_line_is_skipped_and_the_rest_taken_over(tmp_path: Path) -> None:
    env = Env(tmp_path)
    server = start_server(env)
    server.stop()
    # What a worker killed in the middle of its last write leaves behind.
    tag = database_tag(env.vars["LEANAUTH_DATABASE_URL"])
    orphan = tmp_path / "journal" / f"{tag}-999999-1.journal"
    now_ms = int(time.time() * 1000)
    lines = [
        orjson.dumps([now_ms + i, "token", "issued", "app-x", "192.0.2.1", {"jti": f"j{i}"}])
        for i in range(3)
    ]
    orphan.write_bytes(b"\n".join(lines) + b"\n[" + str(now_ms).encode() + b',"token","iss')
    restarted = start_server(env)
    try:
        wait_for(lambda: not orphan.exists(), timeout=15)
    finally:
        restarted.stop()
    audited = audited_jtis(env.vars["LEANAUTH_DATABASE_URL"])
    assert {"j0", "j1", "j2"} <= set(audited)
    assert "1 unreadable lines skipped" in restarted.log()


def test_a_journal_folder_that_cannot_be_written_is_refused_at_start(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    env = Env(tmp_path, {"LEANAUTH_JOURNAL_DIR": str(blocker / "journal")})
    env.prepare()
    process = subprocess.run(
        [sys.executable, "-m", "leanauth", "serve"],
        env={**os.environ, **env.vars},
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert process.returncode != 0
    message = process.stderr.decode()
    assert "LEANAUTH_JOURNAL_DIR" in message
    assert "Traceback" not in message


def test_the_journal_can_be_turned_off(tmp_path: Path) -> None:
    env = Env(tmp_path, {"LEANAUTH_JOURNAL_DIR": "off"})
    server = start_server(env)
    try:
        creds = known_app(env, server, "--scopes", "api")
        with httpx.Client(timeout=10) as client:
            assert client.post(server.token_url, data=token_form(creds)).status_code == 200
        assert not (tmp_path / "journal").exists()
    finally:
        server.stop()


def test_journal_segments_are_private(tmp_path: Path) -> None:
    env = Env(tmp_path)
    server = start_server(env)
    try:
        folder = tmp_path / "journal"
        assert folder.stat().st_mode & 0o777 == 0o700
        files = journal_files(env)
        assert files
        assert all(path.stat().st_mode & 0o777 == 0o600 for path in files)
    finally:
        server.stop()


TORN_WRITE = """
import resource, signal, sys
from pathlib import Path
from leanauth.journal import Journal, encode
from leanauth.store.models import AuditEvent

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails, or is partial
journal = Journal(Path(sys.argv[1]), "torn")
event = AuditEvent(1, "token", "issued", "app", "192.0.2.1", {"jti": "x" * 40})
line = encode(event)
hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
resource.setrlimit(resource.RLIMIT_FSIZE, (len(line) * 2 + len(line) // 2, hard))
for seq in range(4):
    journal.append(seq, line)
resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
journal.append(4, line)
print(journal.failures)
"""


def test_a_record_cut_short_by_a_full_disk_leaves_no_torn_line(tmp_path: Path) -> None:
    # The file may grow by two and a half records: the third is cut short, the fourth is
    # refused, the fifth is written once there is room again.
    run = subprocess.run(
        [sys.executable, "-c", TORN_WRITE, str(tmp_path)],
        capture_output=True,
        check=True,
        timeout=60,
    )
    assert run.stdout.strip() == b"2"
    (segment,) = tmp_path.glob("torn-*.journal")
    lines = segment.read_bytes().splitlines()
    assert len(lines) == 3
    assert all(decode(line) is not None for line in lines)
