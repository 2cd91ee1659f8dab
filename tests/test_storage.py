"""What the database keeps across restarts, and what it must never keep in the clear."""

from __future__ import annotations

import base64
import hashlib
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization

from conftest import (
    AppCredentials,
    Env,
    Server,
    create_app,
    free_port,
    request_token,
    served_kids,
    start_server,
    wait_until_known,
)
from leanauth.keys import KeyCipher
from leanauth.settings import decode_key


def verify(server: Server, token: str, audience: str) -> dict[str, Any]:
    client = jwt.PyJWKClient(server.url + "/oauth2/jwks", cache_keys=False, cache_jwk_set=False)
    claims: dict[str, Any] = jwt.decode(
        token,
        client.get_signing_key_from_jwt(token),
        algorithms=["ES256"],
        audience=audience,
        issuer=server.url,
    )
    return claims


def database_rows(db: Path) -> dict[str, list[sqlite3.Row]]:
    """Every row of every table, read with the standard library."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    try:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        return {t: conn.execute(f'SELECT * FROM "{t}"').fetchall() for t in tables}
    finally:
        conn.close()


def as_bytes(value: object) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, memoryview):
        return value.tobytes()
    return str(value).encode()


def random_kek() -> str:
    return base64.b64encode(os.urandom(32)).decode()


# Restart


def test_restart_keeps_keys_apps_and_customers(tmp_path: Path) -> None:
    env = Env(tmp_path)
    port = free_port()
    first = start_server(env, port)
    try:
        creds = create_app(env, "--name", "Survivor", "--scopes", "api,customer")
        customer = env.cli("customers", "create", "--app", creds.client_id, "--app-user-id", "u")
        customer_scope = f"customer.{customer['customer_id']}"
        wait_until_known(first, creds)
        api_token = request_token(first, creds).json()["access_token"]
        customer_response = request_token(first, creds, customer_scope)
        assert customer_response.status_code == 200
        customer_token = customer_response.json()["access_token"]
        kids_before = served_kids(first)
        kid = jwt.get_unverified_header(api_token)["kid"]
        assert kids_before == {kid}
    finally:
        first.stop()

    second = start_server(env, port)
    try:
        assert served_kids(second) == kids_before
        assert httpx.get(second.url + "/healthz", timeout=10).json()["signing_key"] == kid
        # Loaded at start-up: no waiting for a refresh.
        response = request_token(second, creds)
        assert response.status_code == 200, response.text
        assert jwt.get_unverified_header(response.json()["access_token"])["kid"] == kid
        customer_again = request_token(second, creds, customer_scope)
        assert customer_again.status_code == 200, customer_again.text
        # Tokens from before the restart verify against the new process's JWKS.
        assert verify(second, api_token, "urn:leanauth:api")["sub"] == creds.client_id
        customer_claims = verify(second, customer_token, "urn:leanauth:link")
        assert customer_claims["customers"] == [{"id": customer["customer_id"]}]
    finally:
        second.stop()


def test_restart_keeps_a_disabled_app_disabled_and_a_rotated_secret(tmp_path: Path) -> None:
    env = Env(tmp_path)
    disabled = create_app(env, "--name", "Disabled")
    env.cli("apps", "disable", disabled.client_id)
    rotated_from = create_app(env, "--name", "Rotated")
    rotated = env.cli("apps", "rotate-secret", rotated_from.client_id, "--grace", "0")
    rotated_to = AppCredentials(rotated_from.client_id, rotated["client_secret"], rotated)
    running = start_server(env)
    try:
        assert request_token(running, disabled).status_code == 401
        assert request_token(running, rotated_from).status_code == 401
        assert request_token(running, rotated_to).status_code == 200
    finally:
        running.stop()


# Encryption at rest


@pytest.fixture
def prepared(tmp_path: Path) -> Env:
    """An installation with two signing keys (one retired), an app with two secrets."""
    env = Env(tmp_path)
    env.cli("init")
    env.cli("keys", "rotate")
    return env


def test_signing_keys_are_encrypted_at_rest(prepared: Env) -> None:
    rows = database_rows(prepared.data_dir / "leanauth.db")["signing_keys"]
    assert len(rows) == 2
    kek = decode_key((prepared.data_dir / "leanauth.kek").read_text())
    assert kek is not None
    cipher = KeyCipher(kek)
    for row in rows:
        blob = as_bytes(row["encrypted_private_key"])
        assert b"-----BEGIN" not in blob
        assert b"PRIVATE KEY" not in blob
        with pytest.raises(ValueError, match="deserialize"):
            serialization.load_der_private_key(blob, password=None)
        with pytest.raises(ValueError, match="PEM"):
            serialization.load_pem_private_key(blob, password=None)
        # It is the key, encrypted under the key-encryption key with its kid bound.
        private = cipher.decrypt(row["kid"], blob)
        der = private.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        assert der not in blob
        scalar = private.private_numbers().private_value.to_bytes(32, "big")  # type: ignore[union-attr]
        assert scalar not in blob
        # Nothing else in the row holds the private key either.
        for name in row.keys():  # noqa: SIM118 (sqlite3.Row)
            value = as_bytes(row[name])
            assert der not in value
            assert scalar not in value
            d = base64.urlsafe_b64encode(scalar).rstrip(b"=")
            assert d not in value
        with pytest.raises(InvalidTag):  # the kid is bound as associated data
            cipher.decrypt("another-kid", blob)


def test_client_secrets_are_never_stored(tmp_path: Path) -> None:
    env = Env(tmp_path)
    first = create_app(env, "--name", "Hashed")
    second = env.cli("apps", "rotate-secret", first.client_id)["client_secret"]
    db = env.data_dir / "leanauth.db"
    secrets = [first.client_secret, second]
    needles: list[bytes] = []
    for secret in secrets:
        body = secret.removeprefix("lsk_")
        needles += [
            secret.encode(),
            body.encode(),
            hashlib.sha256(secret.encode()).digest(),
            hashlib.sha256(secret.encode()).hexdigest().encode(),
            hashlib.sha256(body.encode()).digest(),
        ]
    tables = database_rows(db)
    assert len(tables["client_secrets"]) == 2
    for table, rows in tables.items():
        for row in rows:
            for name in row.keys():  # noqa: SIM118 (sqlite3.Row)
                value = as_bytes(row[name])
                for needle in needles:
                    assert needle not in value, f"{table}.{name} holds a secret"
    # Not in the files either (free pages, the write-ahead log).
    for path in env.data_dir.iterdir():
        if path.name.startswith("leanauth.db"):
            content = path.read_bytes()
            for secret in secrets:
                assert secret.removeprefix("lsk_").encode() not in content, path.name


def test_key_encryption_key_file(prepared: Env) -> None:
    path = prepared.data_dir / "leanauth.kek"
    assert path.exists()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert decode_key(path.read_text()) is not None
    # The key-encryption key is not in the database.
    key = decode_key(path.read_text())
    assert key is not None
    content = (prepared.data_dir / "leanauth.db").read_bytes()
    assert key not in content
    assert key.hex().encode() not in content


def test_key_encryption_key_file_setting(tmp_path: Path) -> None:
    kek_path = tmp_path / "secrets" / "my.kek"
    env = Env(tmp_path / "data", {"LEANAUTH_KEY_ENCRYPTION_KEY_FILE": str(kek_path)})
    env.cli("init")
    assert kek_path.exists()
    assert stat.S_IMODE(kek_path.stat().st_mode) == 0o600
    assert not (env.data_dir / "leanauth.kek").exists()


def test_key_encryption_key_from_the_environment(tmp_path: Path) -> None:
    key = os.urandom(32)
    env = Env(tmp_path, {"LEANAUTH_KEY_ENCRYPTION_KEY": base64.b64encode(key).decode()})
    running = start_server(env)
    try:
        creds = create_app(env, "--name", "Env key")
        wait_until_known(running, creds)
    finally:
        running.stop()
    assert not (tmp_path / "leanauth.kek").exists()
    assert not list(tmp_path.glob("*.kek"))
    # The signing key is encrypted under exactly that key.
    (row,) = database_rows(tmp_path / "leanauth.db")["signing_keys"]
    KeyCipher(key).decrypt(row["kid"], as_bytes(row["encrypted_private_key"]))


@pytest.mark.parametrize(
    "encode",
    [
        pytest.param(lambda k: base64.urlsafe_b64encode(k).decode().rstrip("="), id="base64url"),
        pytest.param(lambda k: k.hex(), id="hex"),
    ],
)
def test_key_encryption_key_encodings(tmp_path: Path, encode: Any) -> None:
    key = os.urandom(32)
    env = Env(tmp_path, {"LEANAUTH_KEY_ENCRYPTION_KEY": encode(key)})
    env.cli("init")
    assert not (tmp_path / "leanauth.kek").exists()
    (row,) = database_rows(tmp_path / "leanauth.db")["signing_keys"]
    KeyCipher(key).decrypt(row["kid"], as_bytes(row["encrypted_private_key"]))


def run_server_expecting_failure(env: Env, timeout: float = 20.0) -> tuple[int, str]:
    """Start ``leanauth serve``; it must exit non-zero without ever answering /healthz."""
    port = free_port()
    variables = {
        **{k: v for k, v in os.environ.items() if not k.startswith("LEANAUTH_")},
        **env.vars,
        "LEANAUTH_PORT": str(port),
    }
    log_path = env.data_dir / f"failing-{port}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "leanauth", "serve"],
            env=variables,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    served = False
    try:
        deadline = time.monotonic() + timeout
        while process.poll() is None and time.monotonic() < deadline:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1)
                served = served or r.status_code == 200
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            pytest.fail(f"the server kept running (served={served}):\n{log_path.read_text()}")
    assert not served, log_path.read_text()
    return process.returncode, log_path.read_text(errors="replace")


@pytest.fixture
def installed_with_key_a(tmp_path: Path) -> tuple[Path, AppCredentials]:
    env = Env(tmp_path, {"LEANAUTH_KEY_ENCRYPTION_KEY": random_kek()})
    env.cli("init")
    return tmp_path, create_app(env, "--name", "Key A")


def test_server_with_another_key_encryption_key_refuses_to_start(
    installed_with_key_a: tuple[Path, AppCredentials],
) -> None:
    data_dir, _ = installed_with_key_a
    returncode, log = run_server_expecting_failure(
        Env(data_dir, {"LEANAUTH_KEY_ENCRYPTION_KEY": random_kek()})
    )
    assert returncode != 0, log


def test_server_with_another_key_encryption_key_says_why(
    installed_with_key_a: tuple[Path, AppCredentials],
) -> None:
    """A wrong key is an operator mistake: one line naming the setting, not a traceback."""
    data_dir, _ = installed_with_key_a
    returncode, log = run_server_expecting_failure(
        Env(data_dir, {"LEANAUTH_KEY_ENCRYPTION_KEY": random_kek()})
    )
    assert returncode != 0
    assert "LEANAUTH_KEY_ENCRYPTION_KEY" in log, log
    assert "Traceback" not in log, log


def test_key_file_instead_of_the_configured_key_refuses_to_start(
    installed_with_key_a: tuple[Path, AppCredentials],
) -> None:
    """Forgetting LEANAUTH_KEY_ENCRYPTION_KEY must not silently serve under a new key file."""
    data_dir, _ = installed_with_key_a
    returncode, log = run_server_expecting_failure(Env(data_dir))
    assert returncode != 0, log


def test_cli_with_another_key_encryption_key_is_refused(
    installed_with_key_a: tuple[Path, AppCredentials],
) -> None:
    """``init`` promises a ready installation: with a key that opens no signing key it
    must fail with one line naming the setting, not report the database ready."""
    data_dir, _ = installed_with_key_a
    wrong = Env(data_dir, {"LEANAUTH_KEY_ENCRYPTION_KEY": random_kek()})
    result = wrong.cli("init", expect_ok=False)
    assert result.exit_code != 0, result.output
    assert "LEANAUTH_KEY_ENCRYPTION_KEY" in result.stderr


def test_revisions_read_from_migration_file_names_are_alembics() -> None:
    # Commands check the schema without importing Alembic: the migration files' names carry
    # their revisions. Alembic's own reading of the scripts must agree.
    from alembic.script import ScriptDirectory

    from leanauth.store import migrate

    scripts = ScriptDirectory.from_config(migrate._config())
    assert migrate.known_revisions() == {s.revision for s in scripts.walk_revisions()}
    assert migrate.head_revision() == scripts.get_current_head()


def test_an_sqlite_command_imports_only_what_it_uses(prepared: Env) -> None:
    probe = (
        "import sys\nfrom leanauth.cli import main\n"
        "try:\n    main(['apps', 'list', '--json'])\nexcept SystemExit as exit:\n"
        "    assert exit.code in (0, None), exit.code\n"
        "heavy = ('alembic', 'redis', 'psycopg', 'limits', 'prometheus_client')\n"
        "print('loaded:', [m for m in heavy if m in sys.modules], file=sys.stderr)"
    )
    run = subprocess.run(
        [sys.executable, "-c", probe],
        env={**os.environ, **prepared.vars},
        capture_output=True,
        check=True,
    )
    assert run.stderr.strip().endswith(b"loaded: []"), run.stderr
