"""``leanauth token``: ask a running server for a token."""

from __future__ import annotations

import base64
import json
from typing import Any, NoReturn

import click
import httpx

from leanauth.cli.common import emit, fail, json_option, load_settings, warn_unknown_variables
from leanauth.logs import configure_logging
from leanauth.safetext import masked_url

ENDPOINT_PATH = "/oauth2/token"


@click.command()
@click.option("--client-id", required=True, envvar="LEANAUTH_CLIENT_ID")
@click.option("--client-secret", required=True, envvar="LEANAUTH_CLIENT_SECRET")
@click.option("--scope", default="api", show_default=True)
@click.option(
    "--url",
    help="The server's base URL, or its token endpoint's "
    "(http://127.0.0.1:8000/oauth2/token) [LEANAUTH_ISSUER].",
)
@click.option(
    "--decode", is_flag=True, help="Also print the token's header and claims (unverified)."
)
@json_option
def token(
    client_id: str, client_secret: str, scope: str, url: str | None, decode: bool, as_json: bool
) -> None:
    """Ask a running server for a token."""
    if url is None:
        url = load_settings().issuer
    else:  # no setting is needed, but a misspelt one is still worth a word
        configure_logging("info", "plain")
        warn_unknown_variables()
    form = {
        "grant_type": "client_credentials",
        "scope": scope,
        "client_id": client_id,
        "client_secret": client_secret,
    }
    endpoint = token_endpoint(url)
    status, body = post_form(endpoint, form)
    if status != 200:
        refused(endpoint, status, body, as_json)
    if not isinstance(body.get("access_token"), str):
        fail(f"{masked_url(endpoint)} answered HTTP 200 without an access_token", code="bad_answer")
    if decode:
        try:
            header, claims = (_b64json(part) for part in body["access_token"].split(".")[:2])
        except ValueError:  # binascii.Error and json's errors are ValueErrors
            not_a_jwt = f"{masked_url(endpoint)} answered with a token that is not a JWT"
            fail(not_a_jwt, code="bad_answer")
        body = {**body, "header": header, "claims": claims}
    text = body["access_token"]
    if decode:
        text += "\n" + json.dumps({"header": body["header"], "claims": body["claims"]}, indent=2)
    emit(as_json, body, text)


def token_endpoint(url: str) -> str:
    """The token endpoint's URL from ``--url``: the server's base URL (the issuer), or the
    endpoint's own URL, which is what a client such as ``ClientCredentials`` is given."""
    trimmed = url.rstrip("/")
    return trimmed if trimmed.endswith(ENDPOINT_PATH) else trimmed + ENDPOINT_PATH


def post_form(endpoint: str, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
    """The status and JSON object of the endpoint's answer. Every failure names the URL
    called: a wrong port or path is the most common cause, and seeing it says so."""
    shown = masked_url(endpoint)
    try:
        response = httpx.post(endpoint, data=form, timeout=10)
    except (httpx.HTTPError, httpx.InvalidURL, UnicodeError) as exc:  # Unicode: a bad host
        # Some (timeouts) have an empty message: their class says what happened.
        fail(f"cannot reach {shown}: {str(exc) or type(exc).__name__}", code="unreachable")
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        kind = response.headers.get("content-type", "no content type")
        fail(
            f"{shown} answered HTTP {response.status_code} without a JSON object ({kind}): "
            "is it a leanauth server's URL?",
            code="bad_answer",
        )
    return response.status_code, body


def refused(endpoint: str, status: int, body: dict[str, Any], as_json: bool) -> NoReturn:
    """The server's refusal (RFC 6749 §5.2): under --json its answer stays on stdout, as the
    command's output, and the failure goes to stderr like any other."""
    if as_json:
        emit(as_json, body, "")
    said = ": ".join(str(body[key]) for key in ("error", "error_description") if key in body)
    fail(
        f"{masked_url(endpoint)} answered HTTP {status}: {said or 'no error code'}",
        code="token_refused",
    )


def _b64json(part: str) -> Any:
    return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
