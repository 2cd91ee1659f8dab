"""Settings: defaults, and a bad value stops start-up with one line naming the setting."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import as_error_line, free_port
from leanauth.settings import Settings, SettingsError

# Each is run through a real `leanauth serve` process.
SERVE_BAD_VALUES = [
    ("LEANAUTH_PORT", "abc"),
    ("LEANAUTH_PORT", "70000"),
    ("LEANAUTH_SIGNING_ALG", "HS256"),
    ("LEANAUTH_TOKEN_TTL", "5"),
    ("LEANAUTH_ISSUER", "ftp://x"),
    ("LEANAUTH_ISSUER", "http://x/?q=1"),
    ("LEANAUTH_KEY_ENCRYPTION_KEY", "short"),
    ("LEANAUTH_DATABASE_URL", "mysql://x"),
    ("LEANAUTH_REFRESH_INTERVAL", "0"),
    ("LEANAUTH_LOG_LEVEL", "loud"),
    ("LEANAUTH_LOG_FORMAT", "xml"),
]
# And these through Settings.from_env only (the same code path, without a process each).
BAD_VALUES = [
    *SERVE_BAD_VALUES,
    ("LEANAUTH_PORT", "0"),
    ("LEANAUTH_PORT", "80.5"),
    ("LEANAUTH_SIGNING_ALG", "none"),
    ("LEANAUTH_TOKEN_TTL", "86401"),
    ("LEANAUTH_TOKEN_TTL", "1h"),
    ("LEANAUTH_ISSUER", "http://x/path#frag"),
    ("LEANAUTH_ISSUER", "https://"),
    ("LEANAUTH_ISSUER", "not a url"),
    ("LEANAUTH_KEY_ENCRYPTION_KEY", base64.b64encode(b"k" * 16).decode()),
    ("LEANAUTH_KEY_ENCRYPTION_KEY", "ab" * 31),
    ("LEANAUTH_DATABASE_URL", "var/leanauth.db"),
    ("LEANAUTH_REFRESH_INTERVAL", "nan"),
    ("LEANAUTH_REFRESH_INTERVAL", "-1"),
    ("LEANAUTH_REFRESH_INTERVAL", "soon"),
    ("LEANAUTH_JWKS_MAX_AGE", "-1"),
    # An admin token must never pass for an api or customer token.
    ("LEANAUTH_ADMIN_AUDIENCE", "urn:leanauth:api"),
    ("LEANAUTH_ADMIN_AUDIENCE", "urn:leanauth:link"),
]


def clean_environ(tmp_path: Path) -> dict[str, str]:
    """The test process's environment without LEANAUTH_*, with a database of its own."""
    variables = {k: v for k, v in os.environ.items() if not k.startswith("LEANAUTH_")}
    variables["LEANAUTH_DATABASE_URL"] = f"sqlite:///{tmp_path / 'leanauth.db'}"
    variables["LEANAUTH_PORT"] = str(free_port())
    return variables


def run_leanauth(
    tmp_path: Path, env: dict[str, str], *args: str
) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            [sys.executable, "-m", "leanauth", *args],
            env={**clean_environ(tmp_path), **env},
            capture_output=True,
            text=True,
            timeout=20,
            cwd=tmp_path,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"leanauth {' '.join(args)} kept running: {exc.stderr!r}")


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *words: str) -> None:
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [as_error_line(line) for line in proc.stderr.strip().splitlines()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: "), lines[0]
    for word in words:
        assert word in lines[0], lines[0]


@pytest.mark.parametrize(
    ("name", "value"), SERVE_BAD_VALUES, ids=[f"{n}={v}" for n, v in SERVE_BAD_VALUES]
)
def test_serve_refuses_a_bad_value(tmp_path: Path, name: str, value: str) -> None:
    proc = run_leanauth(tmp_path, {name: value}, "serve")
    assert_one_line_error(proc, name)
    if name == "LEANAUTH_KEY_ENCRYPTION_KEY":
        assert value not in proc.stderr
    # Nothing was prepared with a bad setting (except for a bad database URL, no file at all).
    assert not (tmp_path / "leanauth.db").exists()


@pytest.mark.parametrize(
    ("name", "value"),
    [("LEANAUTH_SIGNING_ALG", "HS256"), ("LEANAUTH_DATABASE_URL", "mysql://x")],
)
def test_cli_commands_refuse_a_bad_value(tmp_path: Path, name: str, value: str) -> None:
    assert_one_line_error(run_leanauth(tmp_path, {name: value}, "apps", "list", "--json"), name)


def test_empty_issuer_query_is_refused(tmp_path: Path) -> None:
    """RFC 8414 §2: the issuer has no query component, even an empty one (``?``)."""
    assert_one_line_error(
        run_leanauth(tmp_path, {"LEANAUTH_ISSUER": "http://x/?"}, "init"), "LEANAUTH_ISSUER"
    )


def test_unusable_database_location_is_one_line(tmp_path: Path) -> None:
    """A database path that cannot be created is an operator mistake, not a crash."""
    proc = run_leanauth(
        tmp_path,
        {"LEANAUTH_DATABASE_URL": "sqlite:////proc/leanauth-nowhere/leanauth.db"},
        "apps",
        "list",
    )
    assert_one_line_error(proc)
    assert "/proc/leanauth-nowhere" in proc.stderr or "LEANAUTH_DATABASE_URL" in proc.stderr


def test_unreadable_key_file_is_one_line(tmp_path: Path) -> None:
    """LEANAUTH_KEY_ENCRYPTION_KEY_FILE naming a directory: one line naming the setting."""
    proc = run_leanauth(tmp_path, {"LEANAUTH_KEY_ENCRYPTION_KEY_FILE": str(tmp_path)}, "init")
    assert_one_line_error(proc, "LEANAUTH_KEY_ENCRYPTION_KEY_FILE")


def test_key_file_without_a_key_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.kek"
    bad.write_text("not a key\n")
    proc = run_leanauth(tmp_path, {"LEANAUTH_KEY_ENCRYPTION_KEY_FILE": str(bad)}, "init")
    assert_one_line_error(proc, "LEANAUTH_KEY_ENCRYPTION_KEY_FILE")
    assert "not a key" not in proc.stderr


# Settings.from_env directly


def test_defaults() -> None:
    settings = Settings.from_env({})
    assert settings.issuer == "http://127.0.0.1:8000"
    assert settings.signing_alg == "ES256"
    assert settings.token_ttl == 3600
    assert settings.host == "127.0.0.1"
    assert settings.port == 8000
    assert settings.database_url == "sqlite:///var/leanauth.db"
    assert settings.api_audience == "urn:leanauth:api"
    assert settings.customer_audience == "urn:leanauth:link"
    assert settings.key_encryption_key is None
    assert settings.refresh_interval == 1.0
    assert settings.jwks_max_age == 300
    assert settings.log_level == "info"
    assert settings.kek_file() == Path("var/leanauth.kek")


def test_blank_values_mean_the_default() -> None:
    settings = Settings.from_env({"LEANAUTH_PORT": "", "LEANAUTH_TOKEN_TTL": "  "})
    assert settings.port == 8000
    assert settings.token_ttl == 3600


def test_issuer_follows_host_and_port() -> None:
    settings = Settings.from_env({"LEANAUTH_HOST": "0.0.0.0", "LEANAUTH_PORT": "9000"})
    assert settings.issuer == "http://0.0.0.0:9000"
    assert settings.port == 9000


def test_issuer_is_kept_without_a_trailing_slash() -> None:
    settings = Settings.from_env({"LEANAUTH_ISSUER": "https://auth.example.com/tenant/"})
    assert settings.issuer == "https://auth.example.com/tenant"


def test_values_are_read() -> None:
    settings = Settings.from_env(
        {
            "LEANAUTH_SIGNING_ALG": "eddsa",
            "LEANAUTH_TOKEN_TTL": "60",
            "LEANAUTH_REFRESH_INTERVAL": "0.05",
            "LEANAUTH_LOG_LEVEL": "DEBUG",
            "LEANAUTH_DATABASE_URL": "postgresql://u@db/leanauth",
        }
    )
    assert settings.signing_alg == "EdDSA"
    assert settings.token_ttl == 60
    assert settings.refresh_interval == 0.05
    assert settings.log_level == "debug"
    assert settings.database_url == "postgresql://u@db/leanauth"
    assert settings.sqlite_path is None


def test_sqlite_data_dir() -> None:
    settings = Settings.from_env({"LEANAUTH_DATABASE_URL": "sqlite:////srv/auth/registry.db"})
    assert settings.sqlite_path == Path("/srv/auth/registry.db")
    assert settings.kek_file() == Path("/srv/auth/leanauth.kek")


@pytest.mark.parametrize(("name", "value"), BAD_VALUES, ids=[f"{n}={v}" for n, v in BAD_VALUES])
def test_from_env_error_names_the_setting(name: str, value: str) -> None:
    with pytest.raises(SettingsError, match=name) as caught:
        Settings.from_env({name: value})
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(name)


@pytest.mark.parametrize(
    "encode",
    [
        pytest.param(lambda k: base64.b64encode(k).decode(), id="base64"),
        pytest.param(lambda k: base64.urlsafe_b64encode(k).decode(), id="base64url"),
        pytest.param(lambda k: base64.urlsafe_b64encode(k).decode().rstrip("="), id="unpadded"),
        pytest.param(lambda k: k.hex(), id="hex"),
    ],
)
def test_key_encryption_key_is_never_shown(encode: object) -> None:
    # Bytes that need both "+" and "/" in base64 and "-" and "_" in base64url.
    key = bytes([0xFB, 0xFF, 0xBF]) * 10 + os.urandom(2)
    text = encode(key)  # type: ignore[operator]
    settings = Settings.from_env({"LEANAUTH_KEY_ENCRYPTION_KEY": text})
    assert settings.key_encryption_key is not None
    assert settings.key_encryption_key.value == key
    for shown in (repr(settings), str(settings), repr(settings.key_encryption_key)):
        assert text not in shown
        assert text.rstrip("=")[:16] not in shown
        assert key.hex() not in shown
        assert repr(key) not in shown
        assert repr(key)[2:18] not in shown


def test_default_rates_are_rates() -> None:
    # A rate variable left unset takes its default unchecked: the defaults must parse.
    import limits

    defaults = Settings()
    for rate in (
        defaults.auth_failure_limit,
        defaults.auth_failure_address_limit,
        defaults.scope_failure_limit,
    ):
        assert limits.parse(rate)
