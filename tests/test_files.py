"""The files leanauth makes: the key-encryption key whole even when first starts race, and
the database, its journal files and their folder private to the server's user."""

from __future__ import annotations

import multiprocessing
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import Env, create_app, request_token, start_server, wait_until_known
from leanauth.bootstrap import load_key_encryption_key
from leanauth.settings import Settings

ROUNDS = 30
RACERS = 6


def _racer(path: str, barrier: Any, results: Any) -> None:
    """One process's first start: wait for the others, then load (or create) the key."""
    try:
        settings = Settings.from_env({"LEANAUTH_KEY_ENCRYPTION_KEY_FILE": path})
        barrier.wait(timeout=10)
        results.put(load_key_encryption_key(settings, create=True).hex())
    except Exception as exc:
        results.put(f"failed: {exc!r}")


def test_racing_first_starts_share_one_whole_key(tmp_path: Path) -> None:
    context = multiprocessing.get_context("fork")
    for round_ in range(ROUNDS):
        path = tmp_path / f"round-{round_}" / "leanauth.kek"
        barrier, results = context.Barrier(RACERS), context.Queue()
        processes = [
            context.Process(target=_racer, args=(str(path), barrier, results))
            for _ in range(RACERS)
        ]
        for process in processes:
            process.start()
        keys = [results.get(timeout=20) for _ in processes]
        for process in processes:
            process.join(timeout=20)
        assert len(set(keys)) == 1, f"round {round_}: {keys}"
        assert len(bytes.fromhex(keys[0])) == 32
        assert path.read_text() == keys[0] + "\n"
        # Only the key is left: no temporary file.
        assert [p.name for p in path.parent.iterdir()] == ["leanauth.kek"]
        assert stat.S_IMODE(path.stat().st_mode) == 0o600


# Modes


@pytest.fixture
def permissive_umask() -> Iterator[None]:
    """The common default umask (group and others may read what is made)."""
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def private(path: Path) -> bool:
    return stat.S_IMODE(path.stat().st_mode) & 0o077 == 0


@pytest.mark.usefixtures("permissive_umask")
def test_new_files_are_private_to_the_user(tmp_path: Path) -> None:
    env = Env(tmp_path / "data" / "leanauth")
    env.cli("init", "--demo")
    data_dir = env.data_dir
    made = ["leanauth.db", "leanauth.kek", "leanauth.migrate.lock", "demo-app.json"]
    for name in made:
        assert private(data_dir / name), (
            f"{name}: {stat.filemode((data_dir / name).stat().st_mode)}"
        )
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    # SQLite's write-ahead log and shared-memory files take the database file's mode.
    server = start_server(env)
    try:
        creds = create_app(env, "--name", "Modes")
        wait_until_known(server, creds)
        assert request_token(server, creds).status_code == 200
        journal = [data_dir / "leanauth.db-wal", data_dir / "leanauth.db-shm"]
        assert all(path.exists() for path in journal)
        for path in journal:
            assert private(path), f"{path.name}: {stat.filemode(path.stat().st_mode)}"
    finally:
        server.stop()
    assert "open to other users" not in server.log()


@pytest.mark.usefixtures("permissive_umask")
def test_an_existing_open_database_is_left_alone_with_one_warning(tmp_path: Path) -> None:
    env = Env(tmp_path)
    env.cli("init")
    database = tmp_path / "leanauth.db"
    database.chmod(0o644)  # as an older leanauth made it
    tmp_path.chmod(0o755)
    server = start_server(env)
    server.stop()
    warnings = [line for line in server.log().splitlines() if "open to other users" in line]
    assert len(warnings) == 1, server.log()
    assert " WARNING " in warnings[0]
    assert f"chmod 600 {database}" in warnings[0]
    assert stat.S_IMODE(database.stat().st_mode) == 0o644
    assert stat.S_IMODE(tmp_path.stat().st_mode) == 0o755
