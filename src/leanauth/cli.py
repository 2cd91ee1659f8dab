"""The ``leanauth`` command. Every command takes ``--json`` for machine-readable output."""

from __future__ import annotations

import base64
import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import click
import httpx
import uvicorn

from leanauth import __version__, registry
from leanauth.bootstrap import Runtime, SchemaMode, open_runtime
from leanauth.keys import StoredKey
from leanauth.logs import configure_logging
from leanauth.scopes import parse_scope_classes
from leanauth.settings import Settings, SettingsError
from leanauth.store import migrate
from leanauth.store.base import AlreadyExists, NotFound, StoreError
from leanauth.store.migrate import SchemaOutdated
from leanauth.store.models import App, ClientSecret, Customer

F = TypeVar("F", bound=Callable[..., Any])

json_option = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")


def fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(1)


def emit(as_json: bool, data: Any, text: str) -> None:
    click.echo(json.dumps(data, indent=2) if as_json else text)


@contextmanager
def runtime(schema: SchemaMode = "auto") -> Iterator[Runtime]:
    """The settings and the store, with one-line errors for everything an operator can fix."""
    try:
        rt = open_runtime(Settings.from_env(), schema=schema)
    except (SettingsError, StoreError, SchemaOutdated) as exc:
        fail(str(exc))
        raise  # unreachable: fail() exits
    try:
        yield rt
    except (NotFound, AlreadyExists, ValueError, StoreError) as exc:
        fail(str(exc))
    finally:
        rt.store.close()


def app_json(app: App) -> dict[str, Any]:
    return {
        "client_id": app.client_id,
        "name": app.name,
        "scopes": sorted(app.scopes),
        "token_ttl": app.token_ttl,
        "enabled": app.enabled,
        "created_at": app.created_at,
    }


def secret_json(secret: ClientSecret) -> dict[str, Any]:
    return {
        "secret_id": secret.secret_id,
        "created_at": secret.created_at,
        "expires_at": secret.expires_at,
    }


def customer_json(customer: Customer) -> dict[str, Any]:
    return {
        "customer_id": customer.customer_id,
        "app_user_id": customer.app_user_id,
        "client_id": customer.client_id,
        "created_at": customer.created_at,
    }


def key_json(key: StoredKey) -> dict[str, Any]:
    return {
        "kid": key.kid,
        "alg": key.alg,
        "state": key.state,
        "created_at": key.created_at,
        "activated_at": key.activated_at,
        "retired_at": key.retired_at,
    }


def app_text(app: App) -> str:
    ttl = f"{app.token_ttl}s" if app.token_ttl else "default"
    state = "enabled" if app.enabled else "disabled"
    return f"{app.client_id}  {app.name}  scopes={','.join(sorted(app.scopes))}  ttl={ttl}  {state}"


@click.group()
@click.version_option(__version__, prog_name="leanauth")
def main() -> None:
    """leanauth: OAuth 2.0 client-credentials tokens for the Lean Authentication API."""


# serve / init


@main.command()
@click.option("--host", help="Address to listen on [LEANAUTH_HOST, 127.0.0.1].")
@click.option("--port", type=int, help="Port to listen on [LEANAUTH_PORT, 8000].")
@click.option(
    "--workers", type=click.IntRange(1, 64), default=1, show_default=True, help="Worker processes."
)
@json_option
def serve(host: str | None, port: int | None, workers: int, as_json: bool) -> None:
    """Run the server (prepares the database and signing key first)."""
    if host:
        os.environ["LEANAUTH_HOST"] = host
    if port:
        os.environ["LEANAUTH_PORT"] = str(port)
    if as_json:
        os.environ["LEANAUTH_LOG_FORMAT"] = "json"
    # Workers are separate processes that read the same environment.
    with runtime() as rt:
        settings = rt.settings
    configure_logging(settings.log_level, settings.log_format)
    uvicorn.run(
        "leanauth.app:serve_app",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=workers,
        # Access logs are off: query strings can carry credentials, and the audit trail
        # records requests without them.
        access_log=False,
        log_config=None,
        log_level=settings.log_level,
        loop="auto",
        http="auto",
        server_header=False,
        proxy_headers=False,
    )


@main.command()
@click.option(
    "--demo", is_flag=True, help="Create a demo app when there is none and print how to use it."
)
@json_option
def init(demo: bool, as_json: bool) -> None:
    """Prepare the database, the key-encryption key and the first signing key."""
    with runtime(schema="upgrade") as rt:
        data: dict[str, Any] = {"database_url": rt.settings.database_url}
        if demo:
            data["demo_app"] = demo_credentials(rt)
        lines = [f"database ready: {rt.settings.database_url}"]
        if demo and data["demo_app"]:
            demo_app = data["demo_app"]
            lines += [
                "",
                f"demo app: {demo_app['name']}",
                f"  client_id:     {demo_app['client_id']}",
                f"  client_secret: {demo_app['client_secret']}",
                "",
                "get a first token (once the server is up):",
                f"  curl -s -X POST {rt.settings.issuer}/oauth2/token \\",
                "    -d grant_type=client_credentials -d scope=api \\",
                f"    -d client_id={demo_app['client_id']} \\",
                f"    -d client_secret={demo_app['client_secret']}",
            ]
        elif demo:
            lines.append("apps exist already: `leanauth apps create --name NAME` makes another")
        emit(as_json, data, "\n".join(lines))


def demo_credentials(rt: Runtime) -> dict[str, Any] | None:
    """The demo app's credentials: created on the first run, kept in a 0600 file after."""
    path = rt.settings.data_dir / "demo-app.json"
    if path.exists():
        saved: dict[str, Any] = json.loads(path.read_text())
        app = rt.store.get_app(saved["client_id"])
        if app is not None and app.enabled:
            return saved
    if rt.store.list_apps() and not path.exists():
        return None
    created = registry.create_app(rt, "Demo app", frozenset({"api", "customer"}))
    saved = {
        "name": created.app.name,
        "client_id": created.app.client_id,
        "client_secret": created.client_secret,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(saved, handle)
    return saved


# db


@main.group()
def db() -> None:
    """The database schema (Alembic migrations)."""


@db.command("upgrade")
@json_option
def db_upgrade(as_json: bool) -> None:
    """Apply every pending migration (safe to run on several nodes at once)."""
    with runtime(schema="upgrade") as rt:
        revision = rt.store.schema_revision()
        emit(
            as_json,
            {"revision": revision, "head": migrate.head_revision()},
            f"schema at {revision}",
        )


@db.command("current")
@json_option
def db_current(as_json: bool) -> None:
    """Show the database's schema revision and the one this code needs."""
    with runtime(schema="none") as rt:
        revision, head = rt.store.schema_revision(), migrate.head_revision()
        data = {"revision": revision, "head": head, "current": revision == head}
        state = "up to date" if revision == head else "behind: run `leanauth db upgrade`"
        emit(as_json, data, f"{revision or 'empty'} (head {head}, {state})")


# apps


@main.group()
def apps() -> None:
    """Apps (OAuth clients) and their secrets."""


@apps.command("create")
@click.option("--name", required=True, help="A name for people.")
@click.option("--scopes", default="api,customer", show_default=True, help="Allowed scope classes.")
@click.option("--token-ttl", type=int, help="Token lifetime in seconds for this app.")
@json_option
def apps_create(name: str, scopes: str, token_ttl: int | None, as_json: bool) -> None:
    """Create an app and print its client_id and client_secret (shown only this once)."""
    with runtime() as rt:
        created = registry.create_app(rt, name, parse_scope_classes(scopes), token_ttl)
        data = {
            **app_json(created.app),
            "client_secret": created.client_secret,
            "secret_id": created.secret_id,
        }
        text = (
            f"client_id:     {created.app.client_id}\n"
            f"client_secret: {created.client_secret}\n"
            "The secret is shown only now: store it safely."
        )
        emit(as_json, data, text)


@apps.command("list")
@json_option
def apps_list(as_json: bool) -> None:
    """List every app."""
    with runtime() as rt:
        found = rt.store.list_apps()
        emit(
            as_json,
            [app_json(a) for a in found],
            "\n".join(app_text(a) for a in found) or "no apps",
        )


@apps.command("show")
@click.argument("client_id")
@json_option
def apps_show(client_id: str, as_json: bool) -> None:
    """Show one app and its secrets (ids and times, never the secrets)."""
    with runtime() as rt:
        app = registry.require_app(rt, client_id)
        secrets = rt.store.list_secrets(client_id)
        data = {**app_json(app), "secrets": [secret_json(s) for s in secrets]}
        lines = [
            app_text(app),
            *(
                f"  secret {s.secret_id} created={s.created_at} expires={s.expires_at}"
                for s in secrets
            ),
        ]
        emit(as_json, data, "\n".join(lines))


def _set_enabled(client_id: str, enabled: bool, as_json: bool) -> None:
    with runtime() as rt:
        app = rt.store.set_app_enabled(client_id, enabled)
        emit(as_json, app_json(app), app_text(app))


@apps.command("disable")
@click.argument("client_id")
@json_option
def apps_disable(client_id: str, as_json: bool) -> None:
    """Disable an app: its credentials stop working at once."""
    _set_enabled(client_id, False, as_json)


@apps.command("enable")
@click.argument("client_id")
@json_option
def apps_enable(client_id: str, as_json: bool) -> None:
    """Enable a disabled app."""
    _set_enabled(client_id, True, as_json)


@apps.command("rotate-secret")
@click.argument("client_id")
@json_option
def apps_rotate_secret(client_id: str, as_json: bool) -> None:
    """Issue a new secret; the old one stops working."""
    with runtime() as rt:
        rotated = registry.rotate_secret(rt, client_id)
        data = {
            "client_id": client_id,
            "client_secret": rotated.client_secret,
            "secret_id": rotated.secret_id,
        }
        emit(as_json, data, f"client_id:     {client_id}\nclient_secret: {rotated.client_secret}")


# customers


@main.group()
def customers() -> None:
    """Customers (end-users) of an app."""


@customers.command("create")
@click.option("--app", "client_id", required=True, help="The app's client_id.")
@click.option(
    "--app-user-id", required=True, help="The app's own id for the user (unique per app)."
)
@json_option
def customers_create(client_id: str, app_user_id: str, as_json: bool) -> None:
    """Create a customer of an app."""
    with runtime() as rt:
        customer = registry.create_customer(rt, client_id, app_user_id)
        emit(as_json, customer_json(customer), f"customer_id: {customer.customer_id}")


@customers.command("list")
@click.option("--app", "client_id", required=True, help="The app's client_id.")
@json_option
def customers_list(client_id: str, as_json: bool) -> None:
    """List an app's customers."""
    with runtime() as rt:
        registry.require_app(rt, client_id)
        found = rt.store.list_customers(client_id)
        text = "\n".join(f"{c.customer_id}  {c.app_user_id}" for c in found) or "no customers"
        emit(as_json, [customer_json(c) for c in found], text)


# keys


@main.group()
def keys() -> None:
    """Signing keys."""


@keys.command("list")
@json_option
def keys_list(as_json: bool) -> None:
    """List signing keys (public facts only)."""
    with runtime() as rt:
        found = sorted(rt.store.list_keys(), key=lambda k: k.created_at)
        text = "\n".join(f"{k.kid}  {k.alg}  {k.state}" for k in found)
        emit(as_json, [key_json(k) for k in found], text)


@keys.command("rotate")
@click.option(
    "--alg", type=click.Choice(["ES256", "EdDSA", "PS256", "RS256"]), help="[LEANAUTH_SIGNING_ALG]"
)
@json_option
def keys_rotate(alg: str | None, as_json: bool) -> None:
    """Make a new active signing key; the old one is retired but stays published."""
    with runtime() as rt:
        key = registry.rotate_key(rt, alg)
        emit(as_json, key_json(key), f"new active key {key.kid} ({key.alg})")


# token


@main.command()
@click.option("--client-id", required=True, envvar="LEANAUTH_CLIENT_ID")
@click.option("--client-secret", required=True, envvar="LEANAUTH_CLIENT_SECRET")
@click.option("--scope", default="api", show_default=True)
@click.option("--url", help="The server's base URL [LEANAUTH_ISSUER].")
@click.option(
    "--decode", is_flag=True, help="Also print the token's header and claims (unverified)."
)
@json_option
def token(
    client_id: str, client_secret: str, scope: str, url: str | None, decode: bool, as_json: bool
) -> None:
    """Ask a running server for a token."""
    try:
        base = url or Settings.from_env().issuer
    except SettingsError as exc:
        fail(str(exc))
        return
    form = {
        "grant_type": "client_credentials",
        "scope": scope,
        "client_id": client_id,
        "client_secret": client_secret,
    }
    try:
        response = httpx.post(base.rstrip("/") + "/oauth2/token", data=form, timeout=10)
    except httpx.HTTPError as exc:
        fail(f"cannot reach {base}: {exc}")
        return
    try:
        body: dict[str, Any] = response.json()
    except ValueError:
        fail(f"HTTP {response.status_code} without a JSON body")
        return
    if response.status_code != 200:
        emit(
            as_json,
            body,
            f"HTTP {response.status_code}: {body.get('error')}: {body.get('error_description')}",
        )
        sys.exit(1)
    if decode:
        header, claims = (_b64json(part) for part in body["access_token"].split(".")[:2])
        body = {**body, "header": header, "claims": claims}
    text = body["access_token"]
    if decode:
        text += "\n" + json.dumps({"header": body["header"], "claims": body["claims"]}, indent=2)
    emit(as_json, body, text)


def _b64json(part: str) -> Any:
    return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
