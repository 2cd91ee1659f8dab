"""deploy/run-cluster.sh starts a working cluster on PostgreSQL."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx

from conftest import PostgresDatabases, free_port, wait_for

ROOT = Path(__file__).resolve().parents[1]


def free_port_pair() -> int:
    """A port p with p + 1 free too (the script numbers its nodes from p)."""
    while True:
        port = free_port()
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port


def test_run_cluster_starts_healthy_nodes(tmp_path: Path, postgres: PostgresDatabases) -> None:
    first_port = free_port_pair()
    env = {
        **os.environ,
        "LEANAUTH_DATABASE_URL": postgres.create(),
        "LEANAUTH_KEY_ENCRYPTION_KEY": os.urandom(32).hex(),
        "WORKERS": "1",
        "LEANAUTH": str(Path(sys.executable).parent / "leanauth"),
    }
    log = (tmp_path / "cluster.log").open("wb")
    process = subprocess.Popen(
        ["bash", str(ROOT / "deploy" / "run-cluster.sh"), "2", str(first_port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        ports = [first_port, first_port + 1]

        def healthy() -> bool:
            try:
                return all(
                    httpx.get(f"http://127.0.0.1:{p}/healthz").status_code == 200 for p in ports
                )
            except httpx.HTTPError:
                return False

        wait_for(healthy, timeout=30)
        kids = [httpx.get(f"http://127.0.0.1:{p}/oauth2/jwks").json()["keys"] for p in ports]
        assert kids[0] == kids[1]
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()
