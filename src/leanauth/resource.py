"""Protecting Starlette and FastAPI endpoints with leanauth tokens (RFC 6750).

FastAPI, as a dependency::

    require_api = RequireToken(verifier, "api")

    @app.get("/accounts")
    async def accounts(token: VerifiedToken = Depends(require_api)): ...

Starlette, as a decorator (the token is put on ``request.state.token``)::

    @token_required(verifier, "customer", customer_param="customer_id")
    async def customer_accounts(request: Request) -> Response: ...

Answers per RFC 6750 §3: no token → 401 with a bare ``WWW-Authenticate: Bearer`` challenge;
a bad token → 401 ``invalid_token``; a good token of the wrong class, or a customer token for
another customer → 403 ``insufficient_scope``; a malformed Authorization header → 400
``invalid_request``. A token that cannot be checked now (the JWKS or the introspection
endpoint is down: :class:`~leanauth.verify.VerificationUnavailable`) → 503 with
``Retry-After``: a 401 would send clients for new tokens, adding load to the outage.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Literal

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from leanauth.verify import InvalidToken, TokenVerifier, VerificationUnavailable, VerifiedToken

__all__ = ["BearerError", "RequireToken", "ServiceUnavailable", "bearer_token", "token_required"]

TokenClass = Literal["api", "customer", "any"]
REALM = "leanauth"
logger = logging.getLogger(__name__)


class BearerError(HTTPException):
    """An RFC 6750 refusal; its headers carry the ``WWW-Authenticate`` challenge."""

    def __init__(
        self, status_code: int, error: str | None, description: str, scope: str | None = None
    ):
        challenge = f'Bearer realm="{REALM}"'
        if error is not None:
            challenge += f', error="{error}", error_description="{description}"'
        if scope is not None:
            challenge += f', scope="{scope}"'
        super().__init__(status_code, description, headers={"WWW-Authenticate": challenge})
        self.error = error

    def response(self) -> Response:
        # RFC 6750 §3.1: a request with no credentials gets the challenge and no error code.
        body = {"error_description": self.detail}
        if self.error is not None:
            body = {"error": self.error, **body}
        return JSONResponse(body, self.status_code, headers=self.headers)


class ServiceUnavailable(HTTPException):
    """503: the token cannot be checked now; ``Retry-After`` says when to try again."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(
            503,
            "The access token cannot be checked now; retry later.",
            headers={"Retry-After": str(retry_after), "Cache-Control": "no-store"},
        )

    def response(self) -> Response:
        body = {"error": "temporarily_unavailable", "error_description": self.detail}
        return JSONResponse(body, self.status_code, headers=self.headers)


def bearer_token(request: Request) -> str:
    """The access token of the ``Authorization: Bearer`` header (RFC 6750 §2.1)."""
    headers = request.headers.getlist("authorization")
    if not headers:
        raise BearerError(401, None, "An access token is required.")
    if len(headers) > 1:
        raise BearerError(400, "invalid_request", "Send one Authorization header.")
    scheme, _, token = headers[0].partition(" ")
    if scheme.lower() != "bearer":
        raise BearerError(401, None, "Use the Bearer scheme.")
    token = token.strip()
    if not token or " " in token:
        raise BearerError(400, "invalid_request", "Malformed Bearer credentials.")
    return token


class RequireToken:
    """A FastAPI dependency (or plain async callable on a Starlette request) that returns
    the verified token of the request, of the required class."""

    def __init__(
        self,
        verifier: TokenVerifier,
        required: TokenClass = "api",
        *,
        customer_param: str | None = None,
    ) -> None:
        self._verifier = verifier
        self._class = required
        self._customer_param = customer_param

    async def __call__(self, request: Request) -> VerifiedToken:
        try:
            token = await self._verifier.averify(bearer_token(request))
        except InvalidToken:
            raise BearerError(401, "invalid_token", "The access token is invalid.") from None
        except VerificationUnavailable as exc:
            logger.warning("cannot verify access tokens: %s", exc.reason)
            raise ServiceUnavailable(exc.retry_after) from None
        if self._class not in ("any", token.scope_class):
            wanted = "api" if self._class == "api" else "customer.<customer_id>"
            raise BearerError(
                403, "insufficient_scope", f"This needs a {self._class} token.", wanted
            )
        if self._customer_param is not None and token.customer_id is not None:
            wanted_customer = request.path_params.get(self._customer_param)
            if token.customer_id != str(wanted_customer).lower():
                raise BearerError(
                    403, "insufficient_scope", "The token is for another customer.",
                    f"customer.{wanted_customer}",
                )  # fmt: skip
        return token


def token_required(
    verifier: TokenVerifier,
    required: TokenClass = "api",
    *,
    customer_param: str | None = None,
) -> Callable[[Callable[[Request], Awaitable[Response]]], Callable[[Request], Awaitable[Response]]]:
    """Decorate a Starlette endpoint: it runs only with a good token, on ``request.state``."""
    requirement = RequireToken(verifier, required, customer_param=customer_param)

    def decorate(
        endpoint: Callable[[Request], Awaitable[Response]],
    ) -> Callable[[Request], Awaitable[Response]]:
        @functools.wraps(endpoint)
        async def guarded(request: Request) -> Response:
            try:
                request.state.token = await requirement(request)
            except (BearerError, ServiceUnavailable) as refusal:
                return refusal.response()
            return await endpoint(request)

        return guarded

    return decorate
