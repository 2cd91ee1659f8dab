"""``POST /oauth2/token``: the client-credentials grant (RFC 6749 §3.2, §4.4, §5.1, §5.2).

A thin ASGI handler rather than a Starlette route: this is the hot path, and the framework's
routing and Request/Response objects cost 25-40% of its throughput (measured, DESIGN.md).
The request goes through a short list of named checks, then the token is issued:

    reject_other_methods → reject_secret_in_query → require_form_body → read_body →
    parse_form (rejects repeats) → check_grant_type → authenticate_client → authorize_scope
    → issue
"""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import parse_qsl

import orjson

from leanauth.cache import CachedClient, RegistryCache
from leanauth.clientauth import authenticate, presented_credentials
from leanauth.credentials import SecretHasher
from leanauth.errors import (
    NO_STORE_HEADERS,
    InvalidRequest,
    InvalidScope,
    MethodNotAllowed,
    OAuthError,
    PayloadTooLarge,
    ServerError,
    TemporarilyUnavailable,
    UnsupportedGrantType,
)
from leanauth.scopes import RequestedScope, parse_scope
from leanauth.store.base import StoreError
from leanauth.tokens import TokenIssuer

log = logging.getLogger("leanauth.token")

MAX_BODY_BYTES = 16 * 1024
MAX_FIELDS = 32
FORM_CONTENT_TYPE = b"application/x-www-form-urlencoded"

Scope = dict[str, Any]
Receive = Any
Send = Any


def reject_other_methods(scope: Scope) -> None:
    if scope["method"] != "POST":
        raise MethodNotAllowed


def reject_secret_in_query(scope: Scope) -> None:
    # RFC 6749 §2.3.1: client credentials MUST NOT be sent in the request URI.
    query: bytes = scope["query_string"]
    if query and any(
        name == "client_secret"
        for name, _ in parse_qsl(query.decode("latin-1"), keep_blank_values=True)
    ):
        raise InvalidRequest("Client credentials must not be sent in the URL.")


def require_form_body(content_type: bytes | None) -> None:
    media_type = (content_type or b"").split(b";", 1)[0].strip().lower()
    if media_type != FORM_CONTENT_TYPE:
        raise InvalidRequest("The body must be application/x-www-form-urlencoded.")


async def read_body(receive: Receive, content_length: bytes | None) -> bytes:
    if content_length is not None:
        try:
            declared = int(content_length)
        except ValueError:
            raise InvalidRequest("Bad Content-Length.") from None
        if declared > MAX_BODY_BYTES:
            raise PayloadTooLarge
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise InvalidRequest("The client went away.")
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise PayloadTooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def parse_form(body: bytes) -> dict[str, str]:
    """Decode the form; RFC 6749 §3.2: parameters MUST NOT be included more than once, and
    parameters sent without a value MUST be treated as if they were omitted."""
    if body.count(b"&") >= MAX_FIELDS:
        raise InvalidRequest(f"Too many parameters (at most {MAX_FIELDS}).")
    try:
        pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, errors="strict")
    except UnicodeDecodeError:
        raise InvalidRequest("The body is not a valid UTF-8 form.") from None
    params: dict[str, str] = {}
    for name, value in pairs:
        if name in params:
            raise InvalidRequest(f"The parameter {name!r} is repeated.")
        params[name] = value
    return {name: value for name, value in params.items() if value != ""}


def check_grant_type(params: dict[str, str]) -> None:
    grant_type = params.get("grant_type")
    if grant_type is None:
        raise InvalidRequest("The grant_type parameter is required.")
    if grant_type != "client_credentials":
        raise UnsupportedGrantType


async def authorize_scope(
    client: CachedClient, requested: RequestedScope, cache: RegistryCache
) -> None:
    if requested.scope_class not in client.app.scopes:
        raise InvalidScope(f"This app may not request {requested.scope_class} tokens.")
    if requested.customer_id is not None:
        try:
            customer = await cache.customer(requested.customer_id)
        except StoreError as exc:
            raise TemporarilyUnavailable(detail=str(exc)) from exc
        # A customer of another app is refused exactly as an unknown one.
        if customer is None or customer.client_id != client.app.client_id:
            raise InvalidScope("Unknown customer for this app.")


class TokenEndpoint:
    def __init__(self, cache: RegistryCache, hasher: SecretHasher, issuer: TokenIssuer) -> None:
        self._cache = cache
        self._hasher = hasher
        self._issuer = issuer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            status, body = 200, await self._grant(scope, receive)
            headers = list(NO_STORE_HEADERS)
        except OAuthError as error:
            if error.detail:
                log.info("token request refused: %s (%s)", error.error, error.detail)
            status, body, headers = error.status_code, error.body(), error.headers()
        except Exception:
            log.exception("token request failed")
            failure = ServerError()
            status, body, headers = failure.status_code, failure.body(), failure.headers()
        headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _grant(self, scope: Scope, receive: Receive) -> bytes:
        reject_other_methods(scope)
        reject_secret_in_query(scope)
        headers = dict(scope["headers"])
        if len(headers) != len(scope["headers"]) and _repeated_auth(scope["headers"]):
            raise InvalidRequest("Send one Authorization header.")
        require_form_body(headers.get(b"content-type"))
        params = parse_form(await read_body(receive, headers.get(b"content-length")))
        check_grant_type(params)
        client = authenticate(
            presented_credentials(headers.get(b"authorization"), params), self._cache, self._hasher
        )
        requested = parse_scope(params.get("scope"))
        await authorize_scope(client, requested, self._cache)
        token = self._issuer.issue(
            self._cache.keyring.signer, client.app.client_id, requested, client.app.token_ttl
        )
        return orjson.dumps(
            {
                "access_token": token.access_token,
                "token_type": "Bearer",
                "expires_in": token.expires_in,
                "scope": token.scope,
            }
        )


def _repeated_auth(raw_headers: list[tuple[bytes, bytes]]) -> bool:
    return sum(1 for name, _ in raw_headers if name == b"authorization") > 1
