"""Running the node: health and readiness, drain on SIGTERM, start-up failures, dying
processes and rolling restarts, with real processes and real load."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from conftest import (
    AppCredentials,
    Env,
    PostgresDatabases,
    Server,
    claims_of,
    free_port,
    installation,
    known_app,
    request_token,
    start_server,
    token_form,
    wait_for,
)

DRAIN = 2.0


class Load:
    """Keep-alive clients asking for tokens until stopped; a refused connection is retried
    on the next URL (as a client behind a balancer does), anything else is a failure."""

    def __init__(self, urls: list[str], creds: AppCredentials, clients: int = 6) -> None:
        self.urls = urls
        self.creds = creds
        self.outcomes: Counter[str] = Counter()
        self.failures: list[str] = []
        self.received: list[str] = []  # the jti of every token received
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(clients)]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()

    def _note(self, outcome: str, failure: str | None = None) -> None:
        with self._lock:
            self.outcomes[outcome] += 1
            if failure is not None:
                self.failures.append(failure)

    def _run(self, index: int) -> None:
        body = token_form(self.creds)
        turn = index
        with httpx.Client(timeout=20) as client:
            while not self._stop.is_set():
                url = self.urls[turn % len(self.urls)]
                try:
                    response = client.post(url + "/oauth2/token", data=body)
                except httpx.ConnectError:
                    self._note("refused")
                    turn += 1
                    time.sleep(0.01)
                    continue
                except httpx.HTTPError as exc:
                    self._note("failed", f"{type(exc).__name__}: {exc}")
                    continue
                if response.status_code == 200:
                    with self._lock:
                        self.received.append(claims_of(response.json()["access_token"])["jti"])
                    self._note("issued")
                else:
                    self._note("failed", f"{response.status_code} {response.text[:200]}")


@pytest.fixture
def node_env(tmp_path: Path) -> Env:
    return Env(tmp_path, {"LEANAUTH_DRAIN_SECONDS": str(DRAIN)})


def test_health_endpoints(node_env: Env) -> None:
    server = start_server(node_env)
    try:
        live = httpx.get(server.url + "/livez")
        ready = httpx.get(server.url + "/readyz")
        legacy = httpx.get(server.url + "/healthz")
    finally:
        server.stop()
    assert live.status_code == 200
    assert ready.status_code == 200
    assert ready.json()["status"] == "ok"
    assert ready.headers["cache-control"] == "no-store"
    assert legacy.json() == ready.json()


def test_readiness_fails_while_the_database_is_away_and_comes_back(
    tmp_path: Path, postgres: PostgresDatabases
) -> None:
    url = postgres.create()
    env = installation(
        tmp_path,
        url,
        LEANAUTH_REFRESH_INTERVAL="0.2",
        LEANAUTH_INTROSPECTION_MAX_STALENESS="1.5",
    )
    server = start_server(env)
    try:

        def ready() -> int:
            return httpx.get(server.url + "/readyz", timeout=5).status_code

        assert ready() == 200
        with postgres.offline(url):
            wait_for(lambda: ready() == 503, timeout=10)
            reason = httpx.get(server.url + "/readyz").json()["reason"]
            assert "registry view" in reason
            # Still alive: only traffic should move, not a restart.
            assert httpx.get(server.url + "/livez").status_code == 200
            wait_for(lambda: "not ready until it refreshes" in server.log(), timeout=5)
        wait_for(lambda: ready() == 200, timeout=15)
        # The node said so in its log, both ways.
        wait_for(lambda: "fresh again after" in server.log(), timeout=5)
    finally:
        server.stop()


def test_sigterm_drains_without_failing_a_request(node_env: Env) -> None:
    server = start_server(node_env, None, "--workers", "2")
    creds = known_app(node_env, server, "--scopes", "api")
    readiness: list[tuple[float, int]] = []
    with Load([server.url], creds) as load:
        wait_for(lambda: load.outcomes["issued"] > 50, timeout=10)
        signalled = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        # During the drain the node says it is not ready, and still serves.
        issued_before = load.outcomes["issued"]
        while time.monotonic() - signalled < DRAIN - 0.5:
            readiness.append((time.monotonic(), httpx.get(server.url + "/readyz").status_code))
            time.sleep(0.1)
        issued_during_drain = load.outcomes["issued"] - issued_before
        status = server.process.wait(timeout=30)
    assert status == 0
    assert {code for _, code in readiness} == {503}
    assert issued_during_drain > 0
    assert load.failures == []
    # Every issued token reached the audit trail before the node exited.
    events = node_env.cli("audit", "list", "--app", creds.client_id, "--limit", "100000")
    issued = [e for e in events if e["outcome"] == "issued"]
    # (known_app's own check that the server knows the app got one token more.)
    assert len(issued) == load.outcomes["issued"] + 1


def test_rolling_restart_of_two_nodes_fails_no_request(tmp_path: Path) -> None:
    env = Env(tmp_path, {"LEANAUTH_DRAIN_SECONDS": "1"})
    ports = [free_port(), free_port()]
    nodes = {port: start_server(env, port) for port in ports}
    creds = known_app(env, nodes[ports[0]], "--scopes", "api")
    wait_for(lambda: request_token(nodes[ports[1]], creds).status_code == 200)
    try:
        with Load([node.url for node in nodes.values()], creds) as load:
            for port in ports:
                wait_for(lambda: load.outcomes["issued"] > 100, timeout=10)
                nodes[port].process.send_signal(signal.SIGTERM)
                assert nodes[port].process.wait(timeout=30) == 0
                nodes[port] = start_server(env, port)
                time.sleep(1)
        assert load.failures == []
        assert load.outcomes["issued"] > 200
    finally:
        for node in nodes.values():
            node.stop()


def supervisor_command(host: str, port: int, workers: int) -> list[str]:
    plan = {
        "host": host,
        "port": port,
        "workers": workers,
        "log_level": "info",
        "log_format": "plain",
        "drain_seconds": 0,
        "shutdown_timeout": 5,
    }
    return [sys.executable, "-m", "leanauth.supervise", json.dumps(plan)]


def test_worker_start_failure_stops_the_node_with_status_3(tmp_path: Path) -> None:
    """Workers that cannot start (here: a database without the schema) make the node exit
    non-zero, so that a service manager restarts it, whatever the number of workers."""
    (tmp_path / "empty.db").touch()
    env = {
        **os.environ,
        "LEANAUTH_DATABASE_URL": f"sqlite:///{tmp_path / 'empty.db'}",
        "LEANAUTH_KEY_ENCRYPTION_KEY": os.urandom(32).hex(),
    }
    for workers in (1, 2):
        process = subprocess.run(
            supervisor_command("127.0.0.1", free_port(), workers),
            env=env,
            capture_output=True,
            timeout=60,
            check=False,
        )
        assert process.returncode == 3, process.stderr.decode()[-2000:]
        assert b"failed to start" in process.stderr


def worker_pids(supervisor_pid: int) -> list[int]:
    """The supervisor's children, read from /proc (its workers)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(") ", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        if int(fields[1]) == supervisor_pid and fields[0] != "Z":
            children.append(int(stat.parent.name))
    return children


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its new parent) is not serving.
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().split(") ", 1)[1][0] != "Z"


@pytest.fixture
def two_workers(node_env: Env) -> Iterator[Server]:
    server = start_server(node_env, None, "--workers", "2")
    yield server
    server.stop()


def test_workers_end_with_a_killed_supervisor(node_env: Env, two_workers: Server) -> None:
    wait_for(lambda: len(worker_pids(two_workers.process.pid)) == 2, timeout=10)
    workers = worker_pids(two_workers.process.pid)
    two_workers.process.kill()
    two_workers.process.wait()
    wait_for(lambda: not any(alive(pid) for pid in workers), timeout=15)
    # The port is free again for the next start.
    restarted = start_server(node_env, two_workers.port)
    restarted.stop()


def test_a_dead_worker_is_replaced(node_env: Env, two_workers: Server) -> None:
    creds = known_app(node_env, two_workers, "--scopes", "api")
    wait_for(lambda: len(worker_pids(two_workers.process.pid)) == 2, timeout=10)
    first = worker_pids(two_workers.process.pid)
    os.kill(first[0], signal.SIGKILL)
    wait_for(lambda: len(set(worker_pids(two_workers.process.pid)) - set(first)) == 1, timeout=30)
    with httpx.Client(timeout=10) as client:
        for _ in range(20):
            assert client.post(two_workers.token_url, data=token_form(creds)).status_code == 200
    assert "died" in two_workers.log()


def test_dual_stack_wildcard_serves_ipv4(tmp_path: Path) -> None:
    env = Env(tmp_path, {"LEANAUTH_HOST": "::", "LEANAUTH_ISSUER": "http://localhost"})
    server = start_server(env)
    try:
        assert httpx.get(server.url + "/livez").status_code == 200
    finally:
        server.stop()


def test_metrics_on_their_own_port(tmp_path: Path) -> None:
    metrics_port = free_port()
    env = Env(tmp_path, {"LEANAUTH_METRICS_PORT": str(metrics_port)})
    server = start_server(env, None, "--workers", "2")
    try:
        creds = known_app(env, server, "--scopes", "api")
        with httpx.Client(timeout=10) as client:
            for _ in range(5):
                assert client.post(server.token_url, data=token_form(creds)).status_code == 200
        scrape = f"http://127.0.0.1:{metrics_port}/metrics"

        def issued() -> float:
            total = 0.0
            for line in httpx.get(scrape, timeout=10).text.splitlines():
                if line.startswith("leanauth_tokens_issued_total{"):
                    total += float(line.rsplit(" ", 1)[1])
            return total

        # known_app's check took one token too.
        wait_for(lambda: issued() == 6, timeout=10)
        assert httpx.get(server.url + "/metrics").status_code == 404
        assert httpx.get(f"http://127.0.0.1:{metrics_port}/other").status_code == 404
    finally:
        server.stop()
