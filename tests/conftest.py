"""Fixtures: real leanauth servers on loopback, and the CLI run against their database."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner

from leanauth.cli import main as cli_main

# The secret sweep (tests/secret_sweep.py): after the whole suite, no secret or token the
# helpers below saw may appear in a server log or an audit trail.
pytest_plugins = ["secret_sweep"]
pytest.register_assert_rewrite("secret_sweep")
from secret_sweep import record_values, scan_postgres  # noqa: E402

# For test modules whose own refusals would otherwise trip the brute-force throttle (tested
# on its own in test_throttle.py).
RELAXED_THROTTLE = {
    "LEANAUTH_AUTH_FAILURE_LIMIT": "1000 per minute",
    "LEANAUTH_AUTH_FAILURE_ADDRESS_LIMIT": "10000 per minute",
}


def served_kids(server: Server) -> set[str]:
    """The kids of the JWKS a server publishes now."""
    jwks = httpx.get(server.url + "/oauth2/jwks", timeout=10).json()
    return {key["kid"] for key in jwks["keys"]}


@contextmanager
def serving(env: Env) -> Iterator[Server]:
    """A server on ``env`` for the duration of the block (module fixtures use it)."""
    running = start_server(env)
    try:
        yield running
    finally:
        running.stop()


# libfaketime (apt-get install faketime), preloaded to shift a server's clock.
LIBFAKETIME = next(
    (str(path) for path in Path("/usr/lib").glob("*/faketime/libfaketime.so.1") if path.exists()),
    None,
)
needs_faketime = pytest.mark.skipif(
    LIBFAKETIME is None or shutil.which("faketime") is None,
    reason="libfaketime is not installed (apt-get install faketime)",
)


def shifted_clock(offset: str) -> dict[str, str]:
    """The variables that run a process with its clock shifted by ``offset`` (``+2s``)."""
    assert LIBFAKETIME is not None
    return {"LD_PRELOAD": LIBFAKETIME, "FAKETIME": offset}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# One `leanauth init` at a time: nodes started together share one installation, and
# CliRunner swaps the process's standard streams.
_INIT_LOCK = threading.Lock()


@dataclass
class Env:
    """The environment of one leanauth installation: database, key file, settings."""

    data_dir: Path
    extra: dict[str, str] = field(default_factory=dict)
    # Only `leanauth init` (or `db upgrade`) makes a database: the first command or server
    # of an Env runs it when the database has no schema yet. False for tests of that refusal.
    init_first: bool = True
    _prepared: bool = field(default=False, init=False, repr=False)

    def prepare(self) -> None:
        """Run `leanauth init` if this installation's database has no schema yet."""
        if not self.init_first or self._prepared:
            return
        with _INIT_LOCK:
            if not self._prepared and not has_schema(self.vars["LEANAUTH_DATABASE_URL"]):
                # With settings init refuses, so does the command that follows: it says why.
                self.cli("init", expect_ok=False)
            self._prepared = True

    @property
    def vars(self) -> dict[str, str]:
        return {
            "LEANAUTH_DATABASE_URL": f"sqlite:///{self.data_dir / 'leanauth.db'}",
            "LEANAUTH_REFRESH_INTERVAL": "0.2",
            # A rotated key signs after a second (the pre-publication period), not minutes.
            "LEANAUTH_JWKS_MAX_AGE": "1",
            "LEANAUTH_KEY_PREPUBLISH": "1",
            # Stopping a test server needs no time for a load balancer to notice.
            "LEANAUTH_DRAIN_SECONDS": "0",
            # Beside this installation's files, whatever its database (default: var/journal
            # under the working directory for PostgreSQL).
            "LEANAUTH_JOURNAL_DIR": str(self.data_dir / "journal"),
            **self.extra,
        }

    def cli(self, *args: str, expect_ok: bool = True) -> Any:
        """Run ``leanauth ARGS --json`` in process; return the parsed JSON output."""
        if args[:1] != ("init",) and args[:2] != ("db", "upgrade"):
            self.prepare()
        result = CliRunner().invoke(
            cli_main, [*args, "--json"], env=self.vars, catch_exceptions=False
        )
        if result.exit_code == 0:
            with contextlib.suppress(ValueError):
                record_values(json.loads(result.stdout))
        if expect_ok:
            assert result.exit_code == 0, result.output
            return json.loads(result.stdout)
        return result


def has_schema(database_url: str) -> bool:
    """Whether a database holds a schema (any revision) or, for SQLite, exists at all."""
    if database_url.startswith("sqlite"):
        return Path(database_url.removeprefix("sqlite:///")).exists()
    import psycopg

    with psycopg.connect(database_url, connect_timeout=3) as conn:
        row = conn.execute("SELECT to_regclass('alembic_version')").fetchone()
    return row is not None and row[0] is not None


@dataclass
class Server:
    env: Env
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def token_url(self) -> str:
        return self.url + "/oauth2/token"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_server(
    env: Env, port: int | None = None, *extra_args: str, issuer: str | None = None
) -> Server:
    if port is not None:
        return _start_server(env, port, *extra_args, issuer=issuer)
    # A port free_port() found free may be taken before the server binds it (by a client
    # connection's own port, say): another one is tried then.
    for _ in range(3):
        try:
            return _start_server(env, free_port(), *extra_args, issuer=issuer)
        except RuntimeError as exc:
            if "Address already in use" not in str(exc):
                raise
    return _start_server(env, free_port(), *extra_args, issuer=issuer)


def launch(env: Env, port: int, *extra_args: str, **variables: str) -> Server:
    """``leanauth serve ARGS`` on ``port`` with ``variables`` on top of ``env``'s, started
    without waiting for it to be ready (``start_server`` waits)."""
    env.prepare()
    log_path = env.data_dir / f"server-{port}.log"
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "leanauth", "serve", *extra_args],
            env={**os.environ, **env.vars, "LEANAUTH_PORT": str(port), **variables},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    return Server(env, port, process, log_path)


def _start_server(env: Env, port: int, *extra_args: str, issuer: str | None = None) -> Server:
    server = launch(env, port, *extra_args, **({"LEANAUTH_ISSUER": issuer} if issuer else {}))
    process = server.process
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{server.log()}")
        try:
            if httpx.get(server.url + "/healthz", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    server.stop()
    raise RuntimeError(f"server did not become ready:\n{server.log()}")


@dataclass
class AppCredentials:
    client_id: str
    client_secret: str
    raw: dict[str, Any]


def installation(data_dir: Path, database_url: str, **extra: str) -> Env:
    """A prepared installation (`leanauth init`) on ``database_url``, with a key-encryption
    key of its own in the environment (as every node of a cluster shares one)."""
    env = Env(
        data_dir,
        extra={
            "LEANAUTH_DATABASE_URL": database_url,
            "LEANAUTH_KEY_ENCRYPTION_KEY": os.urandom(32).hex(),
            **extra,
        },
    )
    env.cli("init")
    return env


def as_error_line(line: str) -> str:
    """A command's failure line as ``error: MESSAGE``. With ``--json`` the command prints
    ``{"error": CODE, "message": MESSAGE}`` instead: its shape is checked here, so the tests
    of either form read the same message."""
    if not line.startswith("{"):
        return line
    data = json.loads(line)
    assert set(data) == {"error", "message"}, line
    assert isinstance(data["error"], str), line
    assert data["error"], line
    return f"error: {data['message']}"


def create_app(env: Env, *args: str) -> AppCredentials:
    data = env.cli("apps", "create", *args)
    return AppCredentials(data["client_id"], data["client_secret"], data)


@pytest.fixture(scope="session")
def env(tmp_path_factory: pytest.TempPathFactory) -> Env:
    return Env(tmp_path_factory.mktemp("leanauth"))


# Fixtures a module declares for an installation of its own (settings the session's server
# does not have): ``env, server = module_server("audit", LEANAUTH_AUDIT_LOG="all")``.
ModuleFixtures = tuple[Callable[..., Env], Callable[..., Iterator[Server]]]


def module_server(name: str, **variables: str) -> ModuleFixtures:
    """Module-scoped ``env`` and ``server`` fixtures: an installation with ``variables`` and
    one server on it, stopped when the module's tests are done."""

    @pytest.fixture(scope="module", name="env")
    def module_env(tmp_path_factory: pytest.TempPathFactory) -> Env:
        return Env(tmp_path_factory.mktemp(name), extra=variables)

    @pytest.fixture(scope="module", name="server")
    def module_running(env: Env) -> Iterator[Server]:
        with serving(env) as running:
            yield running

    return module_env, module_running


def module_app(*args: str) -> Callable[..., AppCredentials]:
    """A module-scoped ``app`` fixture: ``apps create ARGS`` on the module's installation,
    once its server knows the app."""

    @pytest.fixture(scope="module", name="app")
    def created_app(env: Env, server: Server) -> AppCredentials:
        return known_app(env, server, *args)

    return created_app


@pytest.fixture(scope="session")
def server(env: Env) -> Iterator[Server]:
    running = start_server(env)
    yield running
    running.stop()


@pytest.fixture(scope="session")
def app(env: Env, server: Server) -> AppCredentials:
    """An app allowed both scope classes, once the running server has picked it up."""
    created = create_app(env, "--name", "Test app", "--scopes", "api,customer")
    wait_until_known(server, created)
    return created


def token_form(
    creds: AppCredentials, scope: str = "api", secret: str | None = None
) -> dict[str, str]:
    """A client-credentials token request's form (client_secret_post)."""
    return {
        "grant_type": "client_credentials",
        "client_id": creds.client_id,
        "client_secret": creds.client_secret if secret is None else secret,
        "scope": scope,
    }


def request_token(server: Server, creds: AppCredentials, scope: str = "api") -> httpx.Response:
    response = httpx.post(server.token_url, data=token_form(creds, scope), timeout=10)
    if response.status_code == 200:
        with contextlib.suppress(ValueError):
            record_values(response.json())
    return response


def new_token(server: Server, creds: AppCredentials, scope: str = "api") -> str:
    """A token the server grants (the test fails here if it does not)."""
    response = request_token(server, creds, scope)
    assert response.status_code == 200, response.text
    return str(response.json()["access_token"])


def claims_of(token: str) -> dict[str, Any]:
    """A token's claims, unverified (for tests that check them, not trust them)."""
    import jwt

    return dict(jwt.decode(token, options={"verify_signature": False}))


def kid_of(token: str) -> str:
    import jwt

    return str(jwt.get_unverified_header(token)["kid"])


def known_app(env: Env, server: Server, *args: str) -> AppCredentials:
    """A new app (uniquely named, ``apps create`` ARGS) once ``server`` has picked it up."""
    import uuid

    created = create_app(env, "--name", f"app-{uuid.uuid4().hex[:8]}", *args)
    wait_until_known(server, created)
    return created


def wait_until_known(server: Server, creds: AppCredentials) -> None:
    """Wait for a server to see an app made by the CLI (its cache refreshes in the background)."""
    wait_for(lambda: request_token(server, creds).status_code == 200)


@pytest.fixture(scope="session")
def customer_id(env: Env, app: AppCredentials) -> str:
    data = env.cli("customers", "create", "--app", app.client_id, "--app-user-id", "user-1")
    return str(data["customer_id"])


@pytest.fixture
def http(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=10) as client:
        yield client


@pytest.fixture(scope="session")
def jwks_client(server: Server) -> Any:
    import jwt

    return jwt.PyJWKClient(server.url + "/oauth2/jwks", cache_keys=False, cache_jwk_set=False)


def wait_for(predicate: Any, timeout: float = 3.0, interval: float = 0.05) -> float:
    """Poll ``predicate`` until true; return the seconds it took, or fail after ``timeout``."""
    start = time.monotonic()
    while True:
        if predicate():
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            pytest.fail(f"condition not met within {timeout}s")
        time.sleep(interval)


# PostgreSQL and Redis: the real servers (CI has both on loopback). Unreachable ones fail
# the run under CI=true and skip with a visible reason elsewhere.

POSTGRES_ADMIN_URL = os.environ.get(
    "LEANAUTH_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
REDIS_TEST_URL = os.environ.get("LEANAUTH_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


def _unavailable(what: str, exc: Exception) -> None:
    message = f"{what} is unreachable: {exc}"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


class PostgresDatabases:
    """Creates throwaway databases on the test server and drops them at the end."""

    def __init__(self) -> None:
        import psycopg

        self._psycopg = psycopg
        self._created: list[str] = []

    def admin(self) -> Any:
        return self._psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True, connect_timeout=3)

    def create(self) -> str:
        import uuid

        name = f"leanauth_test_{uuid.uuid4().hex[:12]}"
        with self.admin() as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        self._created.append(name)
        base = POSTGRES_ADMIN_URL.rsplit("/", 1)[0]
        return f"{base}/{name}"

    @contextmanager
    def offline(self, url: str) -> Iterator[None]:
        """Database ``url`` refuses every connection, and the open ones are cut: an outage
        of one database without stopping the shared server."""
        name = url.rsplit("/", 1)[1]
        with self.admin() as conn:
            conn.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                (name,),
            )
        try:
            yield
        finally:
            with self.admin() as conn:
                conn.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')

    def drop_all(self) -> None:
        # The secret sweep searches their audit trails before they go.
        base = POSTGRES_ADMIN_URL.rsplit("/", 1)[0]
        scan_postgres(f"{base}/{name}" for name in self._created)
        with self.admin() as conn:
            for name in self._created:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresDatabases]:
    databases = PostgresDatabases()
    try:
        databases.admin().close()
    except Exception as exc:
        _unavailable(f"PostgreSQL at {POSTGRES_ADMIN_URL}", exc)
    yield databases
    databases.drop_all()


@pytest.fixture(scope="session")
def redis_url() -> str:
    import redis

    client = redis.Redis.from_url(REDIS_TEST_URL, socket_connect_timeout=3)
    try:
        client.ping()
    except Exception as exc:
        _unavailable(f"Redis at {REDIS_TEST_URL}", exc)
    finally:
        client.close()
    return REDIS_TEST_URL


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """One fresh, empty database of each backend: the contract suite runs on both."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'leanauth.db'}"
    databases: PostgresDatabases = request.getfixturevalue("postgres")
    return databases.create()
