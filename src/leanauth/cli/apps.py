"""``leanauth apps``: apps (OAuth clients), their secrets and quotas."""

from __future__ import annotations

import re
import time
from typing import Any

import click

from leanauth import registry
from leanauth.cli.common import emit, json_option, parse_duration, runtime
from leanauth.quotas import usage_windows
from leanauth.safetext import escape
from leanauth.scopes import parse_scope_classes
from leanauth.store.base import AppChanges
from leanauth.store.models import App, ClientSecret

# The longest grace `rotate-secret` gives an old secret: a leaked one must not live on for
# months because a unit was mistyped.
MAX_SECRET_GRACE = 30 * 86_400


def app_json(app: App) -> dict[str, Any]:
    return {
        "client_id": app.client_id,
        "name": app.name,
        "scopes": sorted(app.scopes),
        "token_ttl": app.token_ttl,
        "enabled": app.enabled,
        "introspect": app.introspect,
        "quota_hourly": app.quota_hourly,
        "quota_daily": app.quota_daily,
        "tokens_not_before": app.tokens_not_before,
        "created_at": app.created_at,
    }


def secret_json(secret: ClientSecret, now: int) -> dict[str, Any]:
    return {
        "secret_id": secret.secret_id,
        "created_at": secret.created_at,
        "expires_at": secret.expires_at,
        "last_used_at": secret.last_used_at,
        "live": secret.live_at(now),
    }


def app_text(app: App) -> str:
    ttl = f"{app.token_ttl}s" if app.token_ttl else "default"
    state = "enabled" if app.enabled else "disabled"
    extras = " introspect" if app.introspect else ""
    scopes = ",".join(sorted(app.scopes))
    return f"{app.client_id}  {app.name}  scopes={scopes}  ttl={ttl}  {state}{extras}"


def _when(ts: int | None) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts)) if ts else "-"


@click.group()
def apps() -> None:
    """Apps (OAuth clients), their secrets and quotas."""


quota_options = [
    click.option("--quota-hourly", type=click.IntRange(min=1), help="Tokens per UTC hour."),
    click.option("--quota-daily", type=click.IntRange(min=1), help="Tokens per UTC day."),
]


@apps.command("create")
@click.option("--name", required=True, help="A name for people.")
@click.option("--scopes", default="api,customer", show_default=True, help="Allowed scope classes.")
@click.option("--token-ttl", type=int, help="Token lifetime in seconds for this app.")
@click.option(
    "--introspect", is_flag=True, help="May introspect any app's tokens (a resource server)."
)
@quota_options[0]
@quota_options[1]
@json_option
def apps_create(
    name: str,
    scopes: str,
    token_ttl: int | None,
    introspect: bool,
    quota_hourly: int | None,
    quota_daily: int | None,
    as_json: bool,
) -> None:
    """Create an app and print its client_id and client_secret (shown only this once)."""
    with runtime() as rt:
        created = registry.create_app(
            rt,
            name,
            parse_scope_classes(scopes),
            token_ttl,
            introspect=introspect,
            quota_hourly=quota_hourly,
            quota_daily=quota_daily,
        )
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
        text = "\n".join(app_text(a) for a in found) or "no apps"
        emit(as_json, [app_json(a) for a in found], text)


@apps.command("show")
@click.argument("client_id")
@json_option
def apps_show(client_id: str, as_json: bool) -> None:
    """Show one app: settings, secrets (ids and times, never the secrets) and token usage."""
    with runtime() as rt:
        app = registry.require_app(rt, client_id)
        now = int(time.time())
        secrets = rt.store.list_secrets(client_id)
        hour, day = usage_windows(now)
        used = rt.store.usage([hour.name, day.name], client_id)
        usage = {
            "this_hour": used.get((client_id, hour.name), 0),
            "today": used.get((client_id, day.name), 0),
        }
        data = {**app_json(app), "secrets": [secret_json(s, now) for s in secrets], "usage": usage}
        lines = [app_text(app)]
        lines += [
            f"  secret {s.secret_id}  created {_when(s.created_at)}  expires {_when(s.expires_at)}"
            f"  last used {_when(s.last_used_at)}{'' if s.live_at(now) else '  (ended)'}"
            for s in secrets
        ]
        hourly = f"/{app.quota_hourly}" if app.quota_hourly else ""
        daily = f"/{app.quota_daily}" if app.quota_daily else ""
        lines.append(
            f"  tokens this hour {usage['this_hour']}{hourly}, today {usage['today']}{daily}"
        )
        emit(as_json, data, "\n".join(lines))


@apps.command("update")
@click.argument("client_id")
@click.option("--name", help="A new name for people.")
@click.option("--scopes", help="The allowed scope classes, all of them (replacing the list).")
@click.option("--token-ttl", type=int, help="Token lifetime in seconds for this app.")
@click.option(
    "--default-token-ttl", is_flag=True, help="Tokens live the default LEANAUTH_TOKEN_TTL."
)
@click.option(
    "--introspect/--no-introspect",
    default=None,
    help="May (or may no longer) introspect any app's tokens.",
)
@quota_options[0]
@quota_options[1]
@json_option
def apps_update(client_id: str, as_json: bool, **given: Any) -> None:
    """Change the settings given; the others stay. Every node applies the change within a
    second; tokens issued before keep their scope and lifetime."""
    changes = _app_changes(given)
    with runtime() as rt:
        app = registry.update_app(rt, client_id, changes)
        emit(as_json, app_json(app), app_text(app))


def _app_changes(given: dict[str, Any]) -> AppChanges:
    """The changes ``apps update`` was given: a usage error for none, or for a token
    lifetime both given and reset."""
    if given["token_ttl"] is not None and given["default_token_ttl"]:
        raise click.UsageError("give --token-ttl or --default-token-ttl, not both")
    changes: AppChanges = {}
    if given["name"] is not None:
        changes["name"] = given["name"]
    if given["scopes"] is not None:
        try:
            changes["scopes"] = parse_scope_classes(given["scopes"])
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--scopes") from exc
    if given["token_ttl"] is not None or given["default_token_ttl"]:
        changes["token_ttl"] = given["token_ttl"]  # None: the default lifetime
    for key in ("introspect", "quota_hourly", "quota_daily"):
        if given[key] is not None:
            changes[key] = given[key]
    if not changes:
        raise click.UsageError("nothing to change: give at least one setting (see --help)")
    return changes


@apps.command("delete")
@click.argument("client_id")
@click.option("--yes", is_flag=True, help="Delete without asking.")
@json_option
def apps_delete(client_id: str, yes: bool, as_json: bool) -> None:
    """Delete an app with its secrets, customers, revocations and usage counts (its audit
    records stay): on every node within a second its credentials and tokens stop working."""
    if as_json and not yes:
        raise click.UsageError("--json needs --yes: there is no one to ask")
    with runtime() as rt:
        app = registry.require_app(rt, client_id)
        if not yes:
            # Escaped as all output is: the prompt is printed as it is.
            question = f"Delete app {client_id} ({app.name}) with its secrets and customers?"
            click.confirm(escape(question), abort=True)
        removed = registry.delete_app(rt, client_id)
        data = {"client_id": client_id, "deleted": True, "removed": removed}
        counts = ", ".join(f"{what.replace('_', ' ')} {n}" for what, n in removed.items())
        emit(as_json, data, f"app {client_id} deleted ({counts}); its audit records stay")


def _set_enabled(client_id: str, enabled: bool, as_json: bool) -> None:
    with runtime() as rt:
        app = registry.set_enabled(rt, client_id, enabled)
        emit(as_json, app_json(app), app_text(app))


@apps.command("disable")
@click.argument("client_id")
@json_option
def apps_disable(client_id: str, as_json: bool) -> None:
    """Disable an app: its credentials and the tokens it holds stop working at once."""
    _set_enabled(client_id, False, as_json)


@apps.command("enable")
@click.argument("client_id")
@json_option
def apps_enable(client_id: str, as_json: bool) -> None:
    """Enable a disabled app."""
    _set_enabled(client_id, True, as_json)


@apps.command("revoke-tokens")
@click.argument("client_id")
@json_option
def apps_revoke_tokens(client_id: str, as_json: bool) -> None:
    """End every token the app holds now (its secrets keep working for new tokens)."""
    with runtime() as rt:
        app = registry.revoke_app_tokens(rt, client_id)
        when = _when(app.tokens_not_before)
        emit(as_json, app_json(app), f"tokens of {client_id} issued before {when} are refused")


def grace_seconds(_ctx: click.Context, _param: click.Parameter, text: str) -> int:
    """``--grace``: a number with its unit (``0`` alone: now), at most 30 days. A bare
    number once meant seconds, so ``--grace 24`` ended the old secret 24 s later: an
    outage for whoever had not deployed the new one yet."""
    if not re.fullmatch(r"0|\d+[smhd]", text.strip().lower()):
        raise click.BadParameter(f"give a unit: 90s, 30m, 24h or 7d (or 0 for now), got {text!r}")
    seconds = parse_duration(text)
    if seconds > MAX_SECRET_GRACE:
        raise click.BadParameter(f"at most 30d ({MAX_SECRET_GRACE}s), got {text!r}")
    return seconds


@apps.command("rotate-secret")
@click.argument("client_id")
@click.option(
    "--grace",
    default="24h",
    show_default=True,
    callback=grace_seconds,
    help="How long the old secret keeps working (0 ends it now; 90s, 30m, 24h, 7d; at most 30d).",
)
@json_option
def apps_rotate_secret(client_id: str, grace: int, as_json: bool) -> None:
    """Issue a new secret; the old one works until the grace period ends."""
    with runtime() as rt:
        rotated = registry.rotate_secret(rt, client_id, grace)
        ends = rotated.old_secrets_expire_at
        data = {
            "client_id": client_id,
            "client_secret": rotated.client_secret,
            "secret_id": rotated.secret_id,
            "old_secrets_expire_at": ends,
            "old_secrets_expire_at_utc": _when(ends),
        }
        text = (
            f"client_id:     {client_id}\nclient_secret: {rotated.client_secret}\n"
            f"The old secret works until {_when(ends)} at the latest."
        )
        emit(as_json, data, text)


@apps.command("revoke-secret")
@click.argument("client_id")
@click.argument("secret_id")
@json_option
def apps_revoke_secret(client_id: str, secret_id: str, as_json: bool) -> None:
    """End one of an app's secrets now."""
    with runtime() as rt:
        registry.revoke_secret(rt, client_id, secret_id)
        data = {"client_id": client_id, "secret_id": secret_id, "revoked": True}
        emit(as_json, data, f"secret {secret_id} revoked")


@apps.command("set-quota")
@click.argument("client_id")
@quota_options[0]
@quota_options[1]
@json_option
def apps_set_quota(
    client_id: str, quota_hourly: int | None, quota_daily: int | None, as_json: bool
) -> None:
    """Set (or, with neither option, remove) an app's token quotas."""
    with runtime() as rt:
        app = registry.set_quotas(rt, client_id, quota_hourly, quota_daily)
        emit(as_json, app_json(app), app_text(app))
