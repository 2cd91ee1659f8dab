"""OAuth 2.0 errors (RFC 6749 §5.2) and their one renderer.

The tree::

    OAuthError                      400 unless a subclass says otherwise
    ├── InvalidRequest              invalid_request
    │   └── PayloadTooLarge         413, invalid_request
    ├── MethodNotAllowed            405, invalid_request, ``Allow: POST``
    ├── InvalidClient               401, invalid_client, ``WWW-Authenticate: Basic``
    ├── UnauthorizedClient          unauthorized_client
    ├── UnsupportedGrantType        unsupported_grant_type
    ├── InvalidScope                invalid_scope
    ├── TooManyRequests             429, too_many_requests, ``Retry-After``
    ├── ServerError                 500, server_error
    └── TemporarilyUnavailable      503, temporarily_unavailable

``description`` is public (it goes into ``error_description``); ``detail`` is internal and
only ever logged, never sent.
"""

from __future__ import annotations

from typing import ClassVar

import orjson

# RFC 6749 §5.1: "The authorization server MUST include ... Cache-Control: no-store and
# Pragma: no-cache" in any response containing tokens; the errors get them too.
NO_STORE_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"content-type", b"application/json"),
    (b"cache-control", b"no-store"),
    (b"pragma", b"no-cache"),
)


class OAuthError(Exception):
    error: ClassVar[str] = "invalid_request"
    status_code: ClassVar[int] = 400
    default_description: ClassVar[str] = "The request is invalid."
    extra_headers: ClassVar[tuple[tuple[bytes, bytes], ...]] = ()

    def __init__(self, description: str | None = None, *, detail: str | None = None) -> None:
        self.description = description or self.default_description
        self.detail = detail
        super().__init__(self.description)

    def body(self) -> bytes:
        return orjson.dumps({"error": self.error, "error_description": self.description})

    def extra_headers_list(self) -> list[tuple[bytes, bytes]]:
        """Headers this error adds to the JSON and no-store ones."""
        return list(self.extra_headers)


class InvalidRequest(OAuthError):
    error = "invalid_request"


class PayloadTooLarge(InvalidRequest):
    status_code = 413
    default_description = "The request body is too large."


class MethodNotAllowed(OAuthError):
    error = "invalid_request"
    status_code = 405
    default_description = "The token endpoint accepts only POST."
    extra_headers = ((b"allow", b"POST"),)


class InvalidClient(OAuthError):
    """Every client-authentication failure is this one error: same body, same header."""

    error = "invalid_client"
    status_code = 401
    default_description = "Client authentication failed."
    extra_headers = ((b"www-authenticate", b'Basic realm="leanauth", charset="UTF-8"'),)


class UnauthorizedClient(OAuthError):
    error = "unauthorized_client"
    default_description = "This client may not do this."


class UnsupportedGrantType(OAuthError):
    error = "unsupported_grant_type"
    default_description = "Only the client_credentials grant is supported."


class InvalidScope(OAuthError):
    error = "invalid_scope"
    default_description = "The requested scope is invalid, unknown or not allowed."


class TooManyRequests(OAuthError):
    """Throttled (too many failed authentications) or over quota. RFC 6749 has no code for
    this; ``too_many_requests`` names the HTTP status, and ``Retry-After`` says when."""

    error = "too_many_requests"
    status_code = 429
    default_description = "Too many requests; retry later."

    def __init__(self, description: str | None = None, *, retry_after: int = 1) -> None:
        super().__init__(description)
        self.retry_after = max(1, retry_after)

    def extra_headers_list(self) -> list[tuple[bytes, bytes]]:
        return [(b"retry-after", str(self.retry_after).encode())]


class ServerError(OAuthError):
    error = "server_error"
    status_code = 500
    default_description = "The server met an unexpected condition."


class TemporarilyUnavailable(OAuthError):
    error = "temporarily_unavailable"
    status_code = 503
    default_description = "The service is temporarily unavailable; retry shortly."
    extra_headers = ((b"retry-after", b"1"),)
