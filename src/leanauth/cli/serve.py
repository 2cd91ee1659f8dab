"""``leanauth serve`` and ``leanauth init``."""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import sys
from collections.abc import Mapping
from typing import Any

import click

from leanauth import registry
from leanauth.bootstrap import Runtime
from leanauth.cli.common import emit, fail, json_option, load_settings, runtime
from leanauth.safetext import masked_url
from leanauth.services import check_journal_folder
from leanauth.settings import Settings, SettingsError
from leanauth.store.engine import exposed_database_warning

log = logging.getLogger("leanauth.serve")


def guessed_issuer(settings: Settings, environ: Mapping[str, str]) -> str | None:
    """Why the server must not start with an issuer guessed from the address it listens on:
    on any but a loopback address clients reach it by another name (a DNS name, a load
    balancer's), and every token would name ``http://0.0.0.0:8000``, say, as its issuer,
    which no verifier expects. None when LEANAUTH_ISSUER is set or the address is loopback."""
    if environ.get("LEANAUTH_ISSUER", "").strip() or is_loopback(settings.host):
        return None
    return (
        f"LEANAUTH_ISSUER: must be set when serving on {settings.host}, which is not a "
        "loopback address: set it to the URL clients reach this server at, such as "
        f"https://auth.example.com (unset, tokens would name {settings.issuer} as issuer)"
    )


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: reached by that name, not by a loopback address


@click.command()
@click.option("--host", help="Address to listen on [LEANAUTH_HOST, 127.0.0.1].")
@click.option("--port", type=int, help="Port to listen on [LEANAUTH_PORT, 8000].")
@click.option(
    "--workers", type=click.IntRange(1, 64), default=1, show_default=True, help="Worker processes."
)
@json_option
def serve(host: str | None, port: int | None, workers: int, as_json: bool) -> None:
    """Run the server on a database `leanauth init` or `leanauth db upgrade` prepared."""
    if host:
        os.environ["LEANAUTH_HOST"] = host
    if port:
        os.environ["LEANAUTH_PORT"] = str(port)
    if as_json:
        os.environ["LEANAUTH_LOG_FORMAT"] = "json"
    # Workers are separate processes that read the same environment.
    settings = load_settings()
    refused = guessed_issuer(settings, os.environ)
    if refused:
        fail(refused)
    with runtime(settings=settings) as rt:
        settings = rt.settings
    try:
        check_journal_folder(settings)
    except SettingsError as exc:
        fail(str(exc))
    # Once, here in the parent: the workers open the same file.
    warning = exposed_database_warning(settings.database_url)
    if warning:
        log.warning("%s", warning)
    # The settings were checked and the store prepared: this process now becomes the bare
    # supervisor of the workers (leanauth.supervise), leaving all it imported behind.
    sys.stdout.flush()
    sys.stderr.flush()
    plan = {
        "host": settings.host,
        "port": settings.port,
        "workers": workers,
        "log_level": settings.log_level,
        "log_format": settings.log_format,
        "drain_seconds": settings.drain_seconds,
        "shutdown_timeout": settings.shutdown_timeout,
        "metrics_port": settings.metrics_port,
    }
    supervisor = [sys.executable, "-m", "leanauth.supervise", json.dumps(plan)]
    os.execv(sys.executable, supervisor)  # noqa: S606 (this interpreter, no shell)


@click.command()
@click.option(
    "--demo", is_flag=True, help="Create a demo app when there is none and print how to use it."
)
@json_option
def init(demo: bool, as_json: bool) -> None:
    """Apply migrations; prepare the key-encryption key and the first signing key."""
    with runtime(schema="upgrade") as rt:
        # Terminals and CI logs keep what is printed: never the database's password.
        database_url = masked_url(rt.settings.database_url)
        data: dict[str, Any] = {"database_url": database_url}
        lines = [f"database ready: {database_url}"]
        if demo:
            demo_app = data["demo_app"] = demo_credentials(rt)
            if demo_app is None:
                lines.append("apps exist already: `leanauth apps create --name NAME` makes one")
            else:
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
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    # Written whole under another name, then renamed: a reader never sees half a file.
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(saved, handle)
    os.replace(temporary, path)
    return saved
