"""What the form-posting OAuth endpoints share (token, revocation, introspection): thin ASGI
plumbing, the named request checks, client authentication with the brute-force throttle,
and one way to answer, audit and count a refusal."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, NamedTuple
from urllib.parse import parse_qsl, unquote_plus

from leanauth.clientauth import Authenticated, authenticate, presented_credentials
from leanauth.errors import (
    NO_STORE_HEADERS,
    InvalidClient,
    InvalidRequest,
    MethodNotAllowed,
    OAuthError,
    PayloadTooLarge,
    ServerError,
)
from leanauth.services import Services
from leanauth.throttle import MAX_CLIENT_ID

log = logging.getLogger("leanauth.oauth")

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
    params: dict[str, str] = {}
    try:
        # What parse_qsl does, without its generality: it took an eighth of the token
        # path's time (measured), and most pairs here need no unescaping at all.
        for pair in body.decode("utf-8").split("&"):
            if not pair:
                continue
            name, _, value = pair.partition("=")
            if "%" in pair or "+" in pair:
                name = unquote_plus(name, errors="strict")
                value = unquote_plus(value, errors="strict")
            if name in params:
                raise InvalidRequest(f"The parameter {name!r} is repeated.")
            params[name] = value
    except UnicodeDecodeError:
        raise InvalidRequest("The body is not a valid UTF-8 form.") from None
    return {name: value for name, value in params.items() if value != ""}


@dataclass(slots=True)
class Attempt:
    """What is known of a request so far, for the audit trail and the throttle."""

    source: str = "unknown"
    client_id: str | None = None
    scope: str | None = None


class FormRequest(NamedTuple):
    headers: dict[bytes, bytes]
    params: dict[str, str]


class OAuthEndpoint:
    """An ASGI endpoint taking a form POST; subclasses implement :meth:`handle`."""

    audit_kind = "oauth"

    def __init__(self, services: Services) -> None:
        self._services = services

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        attempt = Attempt()
        try:
            status, body, headers = 200, await self.handle(scope, receive, attempt), []
        except OAuthError as error:
            await self._refused(error, attempt)
            status, body, headers = error.status_code, error.body(), error.extra_headers_list()
        except Exception:
            log.exception("%s request failed", self.audit_kind)
            failure = ServerError()
            self._services.audit.record(
                self.audit_kind, failure.error, _bounded(attempt.client_id), attempt.source
            )
            status, body, headers = failure.status_code, failure.body(), []
        headers = [*NO_STORE_HEADERS, *headers, (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def handle(self, scope: Scope, receive: Receive, attempt: Attempt) -> bytes:
        raise NotImplementedError

    async def read_form(self, scope: Scope, receive: Receive, attempt: Attempt) -> FormRequest:
        reject_other_methods(scope)
        reject_secret_in_query(scope)
        headers = dict(scope["headers"])
        if len(headers) != len(scope["headers"]) and _repeated_auth(scope["headers"]):
            raise InvalidRequest("Send one Authorization header.")
        attempt.source = self._services.source_address(scope, headers.get(b"x-forwarded-for"))
        require_form_body(headers.get(b"content-type"))
        params = parse_form(await read_body(receive, headers.get(b"content-length")))
        return FormRequest(headers, params)

    def authenticate(self, form: FormRequest, attempt: Attempt, now: float) -> Authenticated:
        presented = presented_credentials(form.headers.get(b"authorization"), form.params)
        attempt.client_id = presented.client_id
        self._services.throttle.check(presented.client_id, attempt.source, now)
        return authenticate(presented, self._services.cache, self._services.runtime.hasher)

    async def _refused(self, error: OAuthError, attempt: Attempt) -> None:
        """Count a failed authentication against the throttle, and audit every refusal."""
        services = self._services
        if isinstance(error, InvalidClient):
            if services.throttle.shared:
                await asyncio.to_thread(
                    services.throttle.record_failure, attempt.client_id, attempt.source
                )
            else:
                services.throttle.record_failure(attempt.client_id, attempt.source)
        detail: dict[str, object] = {"scope": attempt.scope} if attempt.scope else {}
        if error.detail:
            detail["reason"] = error.detail
        services.audit.record(
            self.audit_kind,
            error.error,
            _bounded(attempt.client_id),
            attempt.source,
            detail or None,
        )


def _bounded(client_id: str | None) -> str | None:
    # A client id that failed authentication is attacker-chosen text.
    return None if client_id is None else client_id[:MAX_CLIENT_ID]


def _repeated_auth(raw_headers: list[tuple[bytes, bytes]]) -> bool:
    return sum(1 for name, _ in raw_headers if name == b"authorization") > 1
