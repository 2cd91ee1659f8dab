"""The ``leanauth`` command, run in process (CliRunner) and as a real subprocess."""

from __future__ import annotations

import base64
import json
import os
import stat
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from conftest import (
    AppCredentials,
    Env,
    Server,
    as_error_line,
    create_app,
    free_port,
    request_token,
    start_server,
    wait_for,
    wait_until_known,
)
from leanauth.bootstrap import load_key_encryption_key
from leanauth.cli import main as cli_main
from leanauth.credentials import SecretHasher
from leanauth.settings import Settings

VENV_BIN = Path(sys.executable).parent


def assert_cli_error(result: Result, *words: str) -> str:
    """A failed command: non-zero exit, one ``error:`` line on stderr, no traceback."""
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    lines = [as_error_line(line) for line in result.stderr.strip().splitlines()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    for word in words:
        assert word in lines[0]
    return lines[0]


def is_uuid(text: str) -> bool:
    try:
        return str(uuid.UUID(text)) == text
    except ValueError:
        return False


def run_text(env: Env, *args: str) -> Result:
    """Run a command without --json (human output)."""
    if args[:1] != ("init",):
        env.prepare()
    return CliRunner().invoke(cli_main, list(args), env=env.vars, catch_exceptions=False)


def leanauth_process(*args: str, extra_env: dict[str, str] | None = None, cwd: Path | None = None):
    variables = {k: v for k, v in os.environ.items() if not k.startswith("LEANAUTH_")}
    variables.update(extra_env or {})
    return subprocess.run(
        [sys.executable, "-m", "leanauth", *args],
        env=variables,
        capture_output=True,
        text=True,
        timeout=30,
        cwd=cwd,
        check=False,
    )


@pytest.fixture
def fresh_env(tmp_path: Path) -> Env:
    """An installation of its own (no server): for commands that change global state."""
    return Env(tmp_path)


# apps create


def test_apps_create_prints_credentials_as_json(env: Env) -> None:
    data = env.cli("apps", "create", "--name", "Create JSON")
    assert is_uuid(data["client_id"])
    secret = data["client_secret"]
    assert secret.startswith("lsk_")
    assert len(secret) - len("lsk_") >= 43
    assert data["name"] == "Create JSON"
    assert data["scopes"] == ["api", "customer"]
    assert data["enabled"] is True
    assert data["token_ttl"] is None
    assert data["secret_id"]


def test_apps_create_with_scopes_and_ttl(env: Env) -> None:
    data = env.cli(
        "apps", "create", "--name", "  Api only  ", "--scopes", "api", "--token-ttl", "600"
    )
    assert data["scopes"] == ["api"]
    assert data["token_ttl"] == 600
    assert data["name"] == "Api only"
    reversed_order = env.cli("apps", "create", "--name", "x", "--scopes", "customer, api")
    assert reversed_order["scopes"] == ["api", "customer"]
    customer_only = env.cli("apps", "create", "--name", "x", "--scopes", "customer")
    assert customer_only["scopes"] == ["customer"]


@pytest.mark.parametrize("ttl", ["60", "86400"])
def test_apps_create_token_ttl_bounds_are_accepted(env: Env, ttl: str) -> None:
    assert env.cli("apps", "create", "--name", "Bounds", "--token-ttl", ttl)["token_ttl"] == int(
        ttl
    )


def test_secrets_are_unique(env: Env) -> None:
    one = create_app(env, "--name", "One")
    two = create_app(env, "--name", "Two")
    assert one.client_id != two.client_id
    assert one.client_secret != two.client_secret


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(["--name", "x", "--scopes", "api,superuser"], id="unknown-scope-class"),
        pytest.param(["--name", "x", "--scopes", "openid"], id="only-unknown-scope-class"),
        pytest.param(["--name", "x", "--scopes", ""], id="no-scope-class"),
        pytest.param(["--name", "x", "--scopes", " , "], id="blank-scope-classes"),
        pytest.param(["--name", ""], id="empty-name"),
        pytest.param(["--name", "   "], id="blank-name"),
        pytest.param(["--name", "n" * 201], id="long-name"),
        pytest.param(["--name", "a\x1b[2Jb"], id="escape-sequence-in-name"),
        pytest.param(["--name", "a\nb"], id="newline-in-name"),
        pytest.param(["--name", "x", "--token-ttl", "59"], id="ttl-too-short"),
        pytest.param(["--name", "x", "--token-ttl", "86401"], id="ttl-too-long"),
        pytest.param(["--name", "x", "--token-ttl", "0"], id="ttl-zero"),
        pytest.param(["--name", "x", "--token-ttl", "-60"], id="ttl-negative"),
    ],
)
def test_apps_create_refuses_bad_input(fresh_env: Env, args: list[str]) -> None:
    assert_cli_error(fresh_env.cli("apps", "create", *args, expect_ok=False))
    # Nothing was created.
    assert fresh_env.cli("apps", "list") == []


# apps list / show


def test_apps_list(fresh_env: Env) -> None:
    assert fresh_env.cli("apps", "list") == []
    first = create_app(fresh_env, "--name", "First")
    second = create_app(fresh_env, "--name", "Second", "--scopes", "api", "--token-ttl", "120")
    listed = fresh_env.cli("apps", "list")
    by_id = {a["client_id"]: a for a in listed}
    assert set(by_id) == {first.client_id, second.client_id}
    assert by_id[second.client_id]["scopes"] == ["api"]
    assert by_id[second.client_id]["token_ttl"] == 120
    assert by_id[first.client_id]["enabled"] is True
    text = run_text(fresh_env, "apps", "list")
    assert text.exit_code == 0
    for creds in (first, second):
        assert creds.client_id in text.stdout
        assert creds.client_secret not in text.stdout + json.dumps(listed)


def test_apps_list_text_when_empty(fresh_env: Env) -> None:
    result = run_text(fresh_env, "apps", "list")
    assert result.exit_code == 0
    assert result.stdout.strip() == "no apps"


def secret_hash_forms(env: Env, secret: str) -> list[str]:
    digest = SecretHasher(load_key_encryption_key(Settings.from_env(env.vars))).hash(secret)
    return [
        digest.hex(),
        digest.hex().upper(),
        base64.b64encode(digest).decode(),
        base64.urlsafe_b64encode(digest).decode().rstrip("="),
    ]


def test_apps_show_lists_secret_ids_never_the_secret(env: Env) -> None:
    created = create_app(env, "--name", "Show me")
    shown = env.cli("apps", "show", created.client_id)
    assert shown["client_id"] == created.client_id
    assert shown["name"] == "Show me"
    assert [s["secret_id"] for s in shown["secrets"]] == [created.raw["secret_id"]]
    assert shown["secrets"][0]["expires_at"] is None
    text = run_text(env, "apps", "show", created.client_id)
    assert text.exit_code == 0
    assert created.raw["secret_id"] in text.stdout
    everything = json.dumps(shown) + text.output
    assert created.client_secret not in everything
    assert created.client_secret.removeprefix("lsk_") not in everything
    for form in secret_hash_forms(env, created.client_secret):
        assert form not in everything


def test_apps_disable_and_enable(env: Env) -> None:
    created = create_app(env, "--name", "Toggle")
    disabled = env.cli("apps", "disable", created.client_id)
    assert disabled["client_id"] == created.client_id
    assert disabled["enabled"] is False
    assert env.cli("apps", "show", created.client_id)["enabled"] is False
    enabled = env.cli("apps", "enable", created.client_id)
    assert enabled["enabled"] is True
    assert env.cli("apps", "show", created.client_id)["enabled"] is True
    assert created.client_secret not in json.dumps([disabled, enabled])


def test_apps_rotate_secret_json(env: Env) -> None:
    created = create_app(env, "--name", "Rotate JSON")
    rotated = env.cli("apps", "rotate-secret", created.client_id)
    assert rotated["client_id"] == created.client_id
    assert rotated["client_secret"].startswith("lsk_")
    assert len(rotated["client_secret"]) - len("lsk_") >= 43
    assert rotated["client_secret"] != created.client_secret
    assert rotated["secret_id"] != created.raw["secret_id"]
    secrets = {s["secret_id"]: s for s in env.cli("apps", "show", created.client_id)["secrets"]}
    assert set(secrets) == {created.raw["secret_id"], rotated["secret_id"]}
    assert secrets[created.raw["secret_id"]]["expires_at"] is not None
    assert secrets[rotated["secret_id"]]["expires_at"] is None


def test_apps_rotate_secret_takes_effect_on_the_running_server(env: Env, server: Server) -> None:
    old = create_app(env, "--name", "Rotate live")
    wait_until_known(server, old)
    rotated = env.cli("apps", "rotate-secret", old.client_id, "--grace", "0")
    new = AppCredentials(old.client_id, rotated["client_secret"], rotated)
    wait_for(lambda: request_token(server, new).status_code == 200, timeout=2.0)
    wait_for(lambda: request_token(server, old).status_code == 401, timeout=2.0)
    assert request_token(server, old).json()["error"] == "invalid_client"
    assert request_token(server, new).status_code == 200


UNKNOWN_APP_COMMANDS = [
    pytest.param(["apps", "show"], id="show"),
    pytest.param(["apps", "disable"], id="disable"),
    pytest.param(["apps", "enable"], id="enable"),
    pytest.param(["apps", "rotate-secret"], id="rotate-secret"),
    pytest.param(["customers", "create", "--app-user-id", "u1", "--app"], id="customers-create"),
    pytest.param(["customers", "list", "--app"], id="customers-list"),
]


@pytest.mark.parametrize("command", UNKNOWN_APP_COMMANDS)
@pytest.mark.parametrize("client_id", [str(uuid.uuid4()), "not-a-uuid"])
def test_unknown_app_is_an_error(env: Env, command: list[str], client_id: str) -> None:
    assert_cli_error(env.cli(*command, client_id, expect_ok=False), client_id)


# customers


def test_customers_create_and_list(fresh_env: Env) -> None:
    one = create_app(fresh_env, "--name", "Customers one")
    two = create_app(fresh_env, "--name", "Customers two")
    assert fresh_env.cli("customers", "list", "--app", one.client_id) == []
    made = fresh_env.cli("customers", "create", "--app", one.client_id, "--app-user-id", "alice")
    assert is_uuid(made["customer_id"])
    assert made["app_user_id"] == "alice"
    assert made["client_id"] == one.client_id

    # The same app_user_id in the same app is refused; in another app it is fine.
    duplicate = fresh_env.cli(
        "customers", "create", "--app", one.client_id, "--app-user-id", "alice", expect_ok=False
    )
    assert_cli_error(duplicate, "alice")
    elsewhere = fresh_env.cli(
        "customers", "create", "--app", two.client_id, "--app-user-id", "alice"
    )
    assert elsewhere["client_id"] == two.client_id
    assert elsewhere["customer_id"] != made["customer_id"]
    other = fresh_env.cli("customers", "create", "--app", one.client_id, "--app-user-id", "bob")

    listed = fresh_env.cli("customers", "list", "--app", one.client_id)
    assert {c["customer_id"] for c in listed} == {made["customer_id"], other["customer_id"]}
    assert {c["app_user_id"] for c in listed} == {"alice", "bob"}
    assert all(c["client_id"] == one.client_id for c in listed)
    listed_two = fresh_env.cli("customers", "list", "--app", two.client_id)
    assert [c["customer_id"] for c in listed_two] == [elsewhere["customer_id"]]


@pytest.mark.parametrize("app_user_id", ["", "u" * 256])
def test_customers_create_refuses_bad_app_user_id(fresh_env: Env, app_user_id: str) -> None:
    created = create_app(fresh_env, "--name", "Bad user ids")
    result = fresh_env.cli(
        "customers", "create", "--app", created.client_id, "--app-user-id", app_user_id,
        expect_ok=False,
    )  # fmt: skip
    assert_cli_error(result)
    assert fresh_env.cli("customers", "list", "--app", created.client_id) == []


# keys


def test_keys_list_shows_one_active_key_and_no_private_material(fresh_env: Env) -> None:
    listed = fresh_env.cli("keys", "list")
    assert len(listed) == 1
    key = listed[0]
    assert key["state"] == "active"
    assert key["alg"] == "ES256"
    assert key["kid"]
    assert key["retires_at"] is None
    assert key["unpublished_at"] is None
    text = json.dumps(listed)
    assert "private" not in text
    assert '"d"' not in text


def test_keys_rotate(fresh_env: Env) -> None:
    (old,) = fresh_env.cli("keys", "list")
    new = fresh_env.cli("keys", "rotate", "--immediately")
    # At once, or a second later when the old key activated in this same second.
    assert new["activates_at"] - new["created_at"] <= 1
    assert new["kid"] != old["kid"]
    assert new["alg"] == "ES256"
    wait_for(lambda: fresh_env.cli("keys", "list")[-1]["state"] == "active", timeout=2.5)
    listed = {k["kid"]: k for k in fresh_env.cli("keys", "list")}
    assert set(listed) == {old["kid"], new["kid"]}
    assert listed[old["kid"]]["state"] == "retired"
    assert listed[old["kid"]]["retires_at"] == new["activates_at"]
    assert listed[new["kid"]]["state"] == "active"
    eddsa = fresh_env.cli("keys", "rotate", "--alg", "EdDSA", "--immediately")
    assert eddsa["alg"] == "EdDSA"
    wait_for(lambda: fresh_env.cli("keys", "list")[-1]["state"] == "active", timeout=2.5)
    states = [k["state"] for k in fresh_env.cli("keys", "list")]
    assert states.count("active") == 1
    assert states.count("retired") == 2


def test_keys_rotate_prepublishes_the_new_key(fresh_env: Env) -> None:
    (old,) = fresh_env.cli("keys", "list")
    new = fresh_env.cli("keys", "rotate")
    assert new["state"] == "next"
    assert new["activates_at"] - new["created_at"] == 1  # LEANAUTH_KEY_PREPUBLISH in tests
    listed = {k["kid"]: k for k in fresh_env.cli("keys", "list")}
    assert listed[old["kid"]]["state"] == "active"
    assert listed[old["kid"]]["retires_at"] == new["activates_at"]


def test_keys_rotate_refuses_unknown_alg(fresh_env: Env) -> None:
    result = fresh_env.cli("keys", "rotate", "--alg", "HS256", expect_ok=False)
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    assert len(fresh_env.cli("keys", "list")) == 1


# token


def test_token_command_decodes_the_token(env: Env, server: Server, app: AppCredentials) -> None:
    proc = leanauth_process(
        "token", "--client-id", app.client_id, "--client-secret", app.client_secret,
        "--scope", "api", "--url", server.url, "--decode", "--json",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    body = json.loads(proc.stdout)
    assert body["token_type"] == "Bearer"
    assert body["scope"] == "api"
    assert body["access_token"].count(".") == 2
    assert body["header"]["typ"] == "at+jwt"
    assert body["header"]["alg"] == "ES256"
    assert body["header"]["kid"]
    claims = body["claims"]
    assert claims["sub"] == app.client_id
    assert claims["client_id"] == app.client_id
    assert claims["scope"] == "api"
    assert claims["aud"] == "urn:leanauth:api"
    assert claims["exp"] > claims["iat"]
    assert app.client_secret not in proc.stdout + proc.stderr


def test_token_command_text_output(server: Server, app: AppCredentials, customer_id: str) -> None:
    proc = leanauth_process(
        "token", "--scope", f"customer.{customer_id}", "--url", server.url + "/", "--decode",
        extra_env={
            "LEANAUTH_CLIENT_ID": app.client_id,
            "LEANAUTH_CLIENT_SECRET": app.client_secret,
        },
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    token, _, rest = proc.stdout.partition("\n")
    assert token.count(".") == 2
    decoded = json.loads(rest)
    assert decoded["header"]["typ"] == "at+jwt"
    assert decoded["claims"]["customers"] == [{"id": customer_id}]
    assert decoded["claims"]["scope"] == f"customer.{customer_id}"


def test_token_command_without_decode_prints_only_the_token(
    server: Server, app: AppCredentials
) -> None:
    proc = leanauth_process(
        "token", "--client-id", app.client_id, "--client-secret", app.client_secret,
        "--url", server.url,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].count(".") == 2


def test_token_command_with_a_wrong_secret_fails(server: Server, app: AppCredentials) -> None:
    proc = leanauth_process(
        "token", "--client-id", app.client_id, "--client-secret", "lsk_wrong",
        "--url", server.url, "--json",
    )  # fmt: skip
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert json.loads(proc.stdout)["error"] == "invalid_client"
    text = leanauth_process(
        "token", "--client-id", app.client_id, "--client-secret", "lsk_wrong", "--url", server.url
    )
    assert text.returncode != 0
    assert "invalid_client" in text.stdout + text.stderr


def test_token_command_when_no_server_listens(tmp_path: Path) -> None:
    proc = leanauth_process(
        "token", "--client-id", "x", "--client-secret", "y",
        "--url", f"http://127.0.0.1:{free_port()}",
    )  # fmt: skip
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("error:")


# init


def test_init_prepares_an_installation(fresh_env: Env) -> None:
    data = fresh_env.cli("init")
    assert data["database_url"] == fresh_env.vars["LEANAUTH_DATABASE_URL"]
    assert "demo_app" not in data
    assert (fresh_env.data_dir / "leanauth.db").exists()
    assert (fresh_env.data_dir / "leanauth.kek").exists()
    assert not (fresh_env.data_dir / "demo-app.json").exists()
    assert fresh_env.cli("apps", "list") == []
    assert len(fresh_env.cli("keys", "list")) == 1
    # Running it again changes nothing.
    fresh_env.cli("init")
    assert len(fresh_env.cli("keys", "list")) == 1


def test_init_demo_creates_the_demo_app_once(fresh_env: Env) -> None:
    first = fresh_env.cli("init", "--demo")["demo_app"]
    assert is_uuid(first["client_id"])
    assert first["client_secret"].startswith("lsk_")
    path = fresh_env.data_dir / "demo-app.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    second = fresh_env.cli("init", "--demo")["demo_app"]
    assert second["client_id"] == first["client_id"]
    assert second["client_secret"] == first["client_secret"]
    assert [a["client_id"] for a in fresh_env.cli("apps", "list")] == [first["client_id"]]
    text = run_text(fresh_env, "init", "--demo")
    assert text.exit_code == 0
    assert first["client_id"] in text.stdout
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_init_demo_makes_no_demo_app_when_apps_exist(fresh_env: Env) -> None:
    create_app(fresh_env, "--name", "Existing")
    data = fresh_env.cli("init", "--demo")
    assert data["demo_app"] is None
    assert len(fresh_env.cli("apps", "list")) == 1
    assert not (fresh_env.data_dir / "demo-app.json").exists()


def test_init_demo_credentials_work(tmp_path: Path) -> None:
    env = Env(tmp_path)
    demo = env.cli("init", "--demo")["demo_app"]
    running = start_server(env)
    try:
        creds = AppCredentials(demo["client_id"], demo["client_secret"], demo)
        assert request_token(running, creds).status_code == 200
    finally:
        running.stop()


# the installed command


def test_console_script_runs() -> None:
    script = VENV_BIN / "leanauth"
    assert script.exists()
    proc = subprocess.run(
        [str(script), "--version"], capture_output=True, text=True, timeout=30, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert "leanauth" in proc.stdout
    import leanauth

    assert leanauth.__version__ in proc.stdout


def test_module_help_lists_every_command() -> None:
    proc = leanauth_process("--help")
    assert proc.returncode == 0, proc.stderr
    for command in ("serve", "init", "apps", "customers", "keys", "token"):
        assert command in proc.stdout


def test_subprocess_cli_against_a_data_dir(tmp_path: Path) -> None:
    """The real process, --json, against a database of its own."""
    env = Env(tmp_path)
    env.prepare()
    proc = leanauth_process("apps", "create", "--name", "Subprocess", "--json", extra_env=env.vars)
    assert proc.returncode == 0, proc.stderr
    created: dict[str, Any] = json.loads(proc.stdout)
    assert created["client_secret"].startswith("lsk_")
    shown = leanauth_process("apps", "show", created["client_id"], "--json", extra_env=env.vars)
    assert json.loads(shown.stdout)["client_id"] == created["client_id"]
    bad = leanauth_process("apps", "show", str(uuid.uuid4()), "--json", extra_env=env.vars)
    assert bad.returncode != 0
    assert "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    # With --json, the failure is JSON too, with a stable code.
    assert json.loads(bad.stderr)["error"] == "not_found"
    assert as_error_line(bad.stderr.strip()).startswith("error: ")


def test_help_lists_every_command_with_its_own_summary() -> None:
    import click

    from leanauth.cli import COMMANDS, SUMMARIES

    context = click.Context(cli_main)
    for name in COMMANDS:
        command = cli_main.get_command(context, name)
        assert command is not None
        assert command.get_short_help_str(1000) == SUMMARIES[name], name
    listed = CliRunner().invoke(cli_main, ["--help"]).output
    assert all(f"  {name} " in listed for name in COMMANDS)


def test_help_imports_no_command() -> None:
    # `leanauth --help` answers at once: the commands (and the database drivers and the
    # server they bring) are imported only when one of them runs.
    probe = (
        "import sys\nfrom leanauth.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('sqlalchemy', 'leanauth.cli.apps', 'leanauth.registry') "
        "if m in sys.modules]\nprint('loaded:', heavy, file=sys.stderr)"
    )
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, check=True)
    assert b"loaded: []" in run.stderr
    assert b"Commands:" in run.stdout


def test_an_unknown_variable_is_named_even_when_only_a_command_option_reads_it(
    fresh_env: Env,
) -> None:
    # LEANAUTH_CLIENT_ID is read by `token`'s own option: it is no typo, even though the
    # command that runs (`apps list`) has not imported `token`.
    env = {**os.environ, **fresh_env.vars, "LEANAUTH_CLIENT_ID": "x", "LEANAUTH_DATABSE_URL": "y"}
    run = subprocess.run(
        [sys.executable, "-m", "leanauth", "apps", "list"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert "LEANAUTH_DATABSE_URL" in run.stderr
    assert "LEANAUTH_CLIENT_ID" not in run.stderr
