"""``leanauth token``: ask a running server for a token."""

from __future__ import annotations

import base64
import json
import sys
from typing import Any

import click
import httpx

from leanauth.cli.common import emit, fail, json_option, load_settings, warn_unknown_variables
from leanauth.logs import configure_logging


@click.command()
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
    if url is None:
        base = load_settings().issuer
    else:
        base = url  # no setting is needed, but a misspelt one is still worth a word
        configure_logging("info", "plain")
        warn_unknown_variables()
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
    try:
        body: dict[str, Any] = response.json()
    except ValueError:
        fail(f"HTTP {response.status_code} without a JSON body")
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
