"""What the form-posting OAuth endpoints share (token, revocation, introspection): thin ASGI
plumbing, the named request checks, client authentication with the brute-force throttle,
and one way to answer, audit and count a refusal."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, NamedTuple
from urllib.parse import parse_qsl, unquote_plus

from leanauth import metrics, requestid
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
from leanauth.safetext import CONTROL_CHARACTERS, bounded
from leanauth.services import Services
from leanauth.throttle import MAX_CLIENT_ID

log = logging.getLogger("leanauth.oauth")

MAX_BODY_BYTES = 16 * 1024
MAX_FIELDS = 32
FORM_CONTENT_TYPE = b"application/x-www-form-urlencoded"
CLIENT_PARAMETERS = frozenset({"client_id", "client_secret"})

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


def parse_form(body: bytes, known: frozenset[str]) -> dict[str, str]:
    """Decode the form's ``known`` parameters. RFC 6749 §3.2: parameters MUST NOT be
    included more than once, and parameters sent without a value MUST be treated as if they
    were omitted; §3.1: unknown parameters MUST be ignored (repeated or not). No parameter
    may carry a control character (Appendix A allows none), and no error repeats request
    text: a name in an error is always one of ``known``."""
    if body.count(b"&") >= MAX_FIELDS:
        raise InvalidRequest(f"Too many parameters (at most {MAX_FIELDS}).")
    params: dict[str, str] = {}
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequest("The body is not a valid UTF-8 form.") from None
    # What parse_qsl does, without its generality: it took an eighth of the token path's time
    # (measured), and most pairs here need no unescaping at all.
    for pair in text.split("&"):
        name, _, value = pair.partition("=")
        if "%" in pair or "+" in pair:
            # A name that is not UTF-8 is no name of ours: ignored like any unknown one.
            name = unquote_plus(name, errors="replace")
            if name not in known:
                continue
            try:
                value = unquote_plus(value, errors="strict")
            except UnicodeDecodeError:
                raise InvalidRequest(f"The parameter {name} is not valid UTF-8.") from None
        elif name not in known:
            continue
        if name in params:
            raise InvalidRequest(f"The parameter {name} is repeated.")
        params[name] = value
    # Control characters: one check of the whole text in C when nothing was escaped (the usual
    # case), else the exact check of each value kept.
    if "%" in text or not text.isprintable():
        for name, value in params.items():
            if CONTROL_CHARACTERS.search(value) is not None:
                raise InvalidRequest(f"The parameter {name} contains a control character.")
    return {name: value for name, value in params.items() if value != ""}


@dataclass(slots=True)
class Attempt:
    """What is known of a request so far, for the audit trail and the throttle. Until the
    client has authenticated, ``client_id`` and ``scope`` are the request's own text."""

    source: str = "unknown"
    client_id: str | None = None
    scope: str | None = None


class FormRequest(NamedTuple):
    headers: dict[bytes, bytes]
    params: dict[str, str]


class OAuthEndpoint:
    """An ASGI endpoint taking a form POST; subclasses implement :meth:`handle`."""

    audit_kind = "oauth"
    # The form parameters the endpoint reads; every other one is ignored.
    parameters: frozenset[str] = CLIENT_PARAMETERS

    def __init__(self, services: Services) -> None:
        self._services = services

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        attempt = Attempt()
        try:
            status, body, headers = 200, await self.handle(scope, receive, attempt), []
        except OAuthError as error:
            self._refused(error, attempt)
            status, body, headers = error.status_code, error.body(), error.extra_headers_list()
        except Exception:
            log.exception("%s request failed", self.audit_kind)
            failure = ServerError()
            metrics.refused(self.audit_kind, failure.error, attempt.scope)
            self._services.audit.record(
                self.audit_kind, failure.error, _bounded_id(attempt.client_id), attempt.source
            )
            status, body, headers = failure.status_code, failure.body(), []
        headers = [*NO_STORE_HEADERS, *headers, (b"content-length", str(len(body)).encode())]
        request_id = requestid.CURRENT.get()
        if request_id is not None:
            headers.append((requestid.HEADER, request_id.encode()))
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
        params = parse_form(
            await read_body(receive, headers.get(b"content-length")), self.parameters
        )
        return FormRequest(headers, params)

    def authenticate(self, form: FormRequest, attempt: Attempt, now: float) -> Authenticated:
        """The authenticated client. The secret is checked before the throttle is consulted,
        so correct credentials always succeed; a failure is counted, and answered 429
        instead of 401 once its pair or source has used up its allowance."""
        try:
            presented = presented_credentials(form.headers.get(b"authorization"), form.params)
            attempt.client_id = presented.client_id
            return authenticate(presented, self._services.cache, self._services.runtime.hasher, now)
        except InvalidClient as failure:
            throttled = self._services.throttle.refuse(attempt.client_id, attempt.source, now)
            if throttled is not None:
                throttled.detail = failure.detail
                raise throttled from None
            raise

    def _refused(self, error: OAuthError, attempt: Attempt) -> None:
        """Audit and count every refusal, keeping only a bounded, escaped piece of the
        request's text (none in the count: its scope only as a class)."""
        metrics.refused(self.audit_kind, error.error, attempt.scope)
        detail: dict[str, object] = {"scope": bounded(attempt.scope)} if attempt.scope else {}
        if error.detail:
            detail["reason"] = bounded(error.detail)
        self._services.audit.record(
            self.audit_kind,
            error.error,
            _bounded_id(attempt.client_id),
            attempt.source,
            detail or None,
        )


def _bounded_id(client_id: str | None) -> str | None:
    # A client id that failed authentication is attacker-chosen text.
    return bounded(client_id, MAX_CLIENT_ID)


def _repeated_auth(raw_headers: list[tuple[bytes, bytes]]) -> bool:
    return sum(1 for name, _ in raw_headers if name == b"authorization") > 1
