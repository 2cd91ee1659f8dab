"""A full disk under a running SQLite node: nothing acknowledged is lost, nothing is
acknowledged that was not written, tokens keep coming, and everything recovers when space
comes back. The database and the journal live on a small tmpfs the test mounts (root only;
skipped elsewhere)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from conftest import Env, known_app, new_token, start_server, token_form, wait_for
from test_journal import audited_jtis, jti_of


def _mount_tmpfs(folder: Path, size: str) -> bool:
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(folder)],
        capture_output=True,
        check=False,
    )
    return result.returncode == 0


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    folder = tmp_path / "disk"
    if not _mount_tmpfs(folder, "16m"):
        pytest.skip("needs root to mount a small filesystem")
    try:
        yield folder
    finally:
        # The secret sweep searches the database after the run: a copy outlives the mount.
        kept = tmp_path / "kept"
        kept.mkdir()
        for path in folder.glob("leanauth.db*"):
            shutil.copyfile(path, kept / path.name)
        subprocess.run(["umount", "-l", str(folder)], check=False)


def fill(folder: Path) -> Path:
    """Take every free byte of ``folder``'s filesystem; the file that holds them."""
    filler = folder / "filler"
    with filler.open("wb") as file, contextlib.suppress(OSError):
        while True:
            file.write(b"\0" * 65_536)
            file.flush()
    return filler


def test_a_full_disk_loses_nothing_acknowledged_and_recovers(
    tmp_path: Path, small_disk: Path
) -> None:
    env = Env(
        tmp_path,
        {
            "LEANAUTH_DATABASE_URL": f"sqlite:///{small_disk / 'leanauth.db'}",
            "LEANAUTH_JOURNAL_DIR": str(small_disk / "journal"),
        },
    )
    server = start_server(env)
    try:
        creds = known_app(env, server, "--scopes", "api,customer")
        bearer = {"Authorization": f"Bearer {new_token(server, creds)}"}
        acknowledged, refused, issued = [], 0, []
        with httpx.Client(base_url=server.url, timeout=10) as client:

            def create() -> httpx.Response:
                body = {"app_user_id": f"user-{uuid.uuid4()}"}
                return client.post("/customers/v1/", json=body, headers=bearer)

            before = create()
            assert before.status_code == 201
            acknowledged.append(before.json()["customer_id"])
            filler = fill(small_disk)
            for _ in range(20):
                response = create()
                if response.status_code == 201:
                    acknowledged.append(response.json()["customer_id"])
                else:
                    assert response.status_code == 503, response.text
                    refused += 1
                token = client.post("/oauth2/token", data=token_form(creds))
                assert token.status_code == 200  # the token path writes nothing
                issued.append(jti_of(token.json()["access_token"]))
            assert refused > 0, "the disk was full, yet every creation was acknowledged"
            wait_for(lambda: "background write failed" in server.log(), timeout=10)
            filler.unlink()
            # Space again: creations are acknowledged, and what waited is written.
            wait_for(lambda: create().status_code == 201, timeout=10)
            for customer in acknowledged:
                found = client.get(f"/customers/v1/{customer}", headers=bearer)
                assert found.status_code == 200, customer
        url = env.vars["LEANAUTH_DATABASE_URL"]
        wait_for(lambda: all(jti in audited_jtis(url) for jti in issued), timeout=15)
    finally:
        server.stop()
    assert server.process.returncode == 0
    # A new start finds every acknowledged customer: they were on disk, not in a cache.
    restarted = start_server(env)
    try:
        with httpx.Client(base_url=restarted.url, timeout=10) as client:
            bearer = {"Authorization": f"Bearer {new_token(restarted, creds)}"}
            for customer in acknowledged:
                assert client.get(f"/customers/v1/{customer}", headers=bearer).status_code == 200
    finally:
        restarted.stop()
