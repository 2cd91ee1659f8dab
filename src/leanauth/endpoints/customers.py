"""The Customers API, modelled on Lean's: an app's backend creates and reads its customers
with an ``api`` token; a customer token reads only its own customer.

    POST /customers/v1/                 {"app_user_id"} → 201 {"customer_id", "app_user_id"}
    GET  /customers/v1/{customer_id}    → 200 {"customer_id", "app_user_id"}
    GET  /customers/v1/?size=N&after=ID → 200 {"data": [...], "next": ID | null}

Errors are Lean-style bodies, ``{"status", "message", "timestamp"}``; a refused token is
answered per RFC 6750 with a ``WWW-Authenticate: Bearer`` challenge.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, ParamSpec, TypeVar

import orjson
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from leanauth import registry
from leanauth.registry import DuplicateCustomer
from leanauth.resource import BearerError, bearer_token
from leanauth.safetext import has_control_characters
from leanauth.services import Services
from leanauth.store.base import AlreadyExists, NotFound, StoreError
from leanauth.store.models import Customer
from leanauth.verify import VerifiedToken, verified_from_claims

MAX_BODY_BYTES = 4096
DEFAULT_PAGE = 50
MAX_PAGE = 500

P = ParamSpec("P")
T = TypeVar("T")


def lean_error(
    status_code: int,
    status: str,
    message: str,
    headers: dict[str, str] | None = None,
    extra: dict[str, str] | None = None,
) -> JSONResponse:
    timestamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    body = {"status": status, "message": message, "timestamp": timestamp, **(extra or {})}
    return JSONResponse(body, status_code, headers={"cache-control": "no-store", **(headers or {})})


def unavailable() -> JSONResponse:
    """The database could not answer (in time): retry in a second (RFC 9110 §10.2.3)."""
    return lean_error(503, "SERVICE_UNAVAILABLE", "Try again shortly.", {"retry-after": "1"})


def customer_body(customer: Customer) -> dict[str, Any]:
    return {"customer_id": customer.customer_id, "app_user_id": customer.app_user_id}


class CustomersApi:
    def __init__(self, services: Services) -> None:
        self._runtime = services.runtime
        self._store = services.runtime.store
        self._cache = services.cache
        self._tokens = services.own_tokens
        settings = services.runtime.settings
        self._audiences = {settings.api_audience, settings.customer_audience}

    async def _ask_store(self, call: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """A store call on the requests' own threads, waited for at most
        LEANAUTH_DB_REQUEST_TIMEOUT seconds (then :class:`StoreTimeout`, a StoreError). A
        create given up on may still commit afterwards: retried, it answers 409."""
        return await self._cache.store_calls.run(call, *args, **kwargs)

    def _token(self, request: Request) -> VerifiedToken:
        """This server's own check of a bearer token: signature, expiry, audience, revocation."""
        claims = self._tokens.decode(bearer_token(request), check_expiry=True)
        if claims is None or claims.get("aud") not in self._audiences:
            raise BearerError(401, "invalid_token", "The access token is invalid.")
        if self._tokens.current(claims) is None:
            raise BearerError(401, "invalid_token", "The access token was revoked.")
        return verified_from_claims(claims)

    def _api_token(self, request: Request) -> VerifiedToken:
        token = self._token(request)
        if token.scope_class != "api":
            raise BearerError(403, "insufficient_scope", "This needs an api token.", "api")
        return token

    async def create(self, request: Request) -> Response:
        token = self._api_token(request)
        app_user_id = await _app_user_id(request)
        if isinstance(app_user_id, Response):
            return app_user_id
        try:
            customer = await self._ask_store(
                registry.create_customer, self._runtime, token.client_id, app_user_id
            )
        except NotFound:
            # The app was deleted while this request ran: its tokens no longer count.
            raise BearerError(401, "invalid_token", "The access token was revoked.") from None
        except AlreadyExists as exc:
            # The existing customer's id: a backend that lost the answer to its first
            # create (a timeout, a 503 that committed) carries on with it.
            existing = (
                {"customer_id": exc.customer_id} if isinstance(exc, DuplicateCustomer) else {}
            )
            return lean_error(
                409,
                "CUSTOMER_ALREADY_EXISTS",
                "A customer with this app_user_id exists.",
                extra=existing,
            )
        self._cache.customer_added(customer)
        return JSONResponse(customer_body(customer), 201, headers={"cache-control": "no-store"})

    async def read(self, request: Request) -> Response:
        token = self._token(request)
        try:
            customer_id = str(uuid.UUID(request.path_params["customer_id"]))
        except ValueError:
            return lean_error(404, "CUSTOMER_NOT_FOUND", "No such customer.")
        if token.customer_id is not None and token.customer_id != customer_id:
            raise BearerError(
                403,
                "insufficient_scope",
                "The token is for another customer.",
                f"customer.{customer_id}",
            )
        customer = await self._ask_store(self._store.get_customer, customer_id)
        # Another app's customer is as unknown as a customer that does not exist.
        if customer is None or customer.client_id != token.client_id:
            return lean_error(404, "CUSTOMER_NOT_FOUND", "No such customer.")
        return JSONResponse(customer_body(customer), headers={"cache-control": "no-store"})

    async def list_page(self, request: Request) -> Response:
        token = self._api_token(request)
        try:
            size = int(request.query_params.get("size", DEFAULT_PAGE))
            after = request.query_params.get("after")
            after = str(uuid.UUID(after)) if after else None
        except ValueError:
            return lean_error(400, "INVALID_PARAMETERS", "size is a number; after a customer id.")
        if not 1 <= size <= MAX_PAGE:
            return lean_error(400, "INVALID_PARAMETERS", f"size must be 1 to {MAX_PAGE}.")
        page = await self._ask_store(self._store.list_customers, token.client_id, size + 1, after)
        data = [customer_body(c) for c in page[:size]]
        following = page[size - 1].customer_id if len(page) > size else None
        return JSONResponse(
            {"data": data, "next": following}, headers={"cache-control": "no-store"}
        )


async def _app_user_id(request: Request) -> str | Response:
    """The ``app_user_id`` of a JSON body, or the 400 that explains what is wrong."""
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
        return lean_error(400, "INVALID_PARAMETERS", "Send a JSON body.")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            return lean_error(413, "PAYLOAD_TOO_LARGE", "The body is too large.")
    try:
        parsed = orjson.loads(body)
    except ValueError:
        return lean_error(400, "INVALID_PARAMETERS", "The body is not valid JSON.")
    value = parsed.get("app_user_id") if isinstance(parsed, dict) else None
    if not isinstance(value, str) or not 1 <= len(value) <= registry.MAX_APP_USER_ID:
        return lean_error(
            400, "INVALID_PARAMETERS", "app_user_id must be a string of 1 to 255 characters."
        )
    if has_control_characters(value):
        return lean_error(
            400, "INVALID_PARAMETERS", "app_user_id must not contain control characters."
        )
    return value


def answering_refusals(
    endpoint: Callable[[Request], Awaitable[Response]],
) -> Callable[[Request], Awaitable[Response]]:
    """The endpoint, with a refused bearer token answered per RFC 6750 and a database that
    cannot answer (in time) with 503, whichever step of it finds out."""

    async def answered(request: Request) -> Response:
        try:
            return await endpoint(request)
        except BearerError as refusal:
            return refusal.response()
        except StoreError:
            return unavailable()

    return answered


def customers_routes(services: Services) -> list[Route]:
    api = CustomersApi(services)
    create, list_page = answering_refusals(api.create), answering_refusals(api.list_page)
    return [
        Route("/customers/v1", create, methods=["POST"]),
        Route("/customers/v1/", create, methods=["POST"]),
        Route("/customers/v1", list_page, methods=["GET"]),
        Route("/customers/v1/", list_page, methods=["GET"]),
        Route("/customers/v1/{customer_id}", answering_refusals(api.read), methods=["GET"]),
    ]
