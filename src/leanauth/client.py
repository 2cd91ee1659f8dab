"""Tokens for an app's backend: an ``httpx.Auth`` that fetches, caches and refreshes them.

    auth = ClientCredentials(client_id, client_secret, "https://auth.example.com/oauth2/token")
    with httpx.Client(auth=auth) as api:           # or httpx.AsyncClient(auth=auth)
        api.post("https://api.example.com/customers/v1/", json={"app_user_id": "u-1"})
    link_token = auth.customer_token(customer_id)  # for the LinkSDK; or await acustomer_token

- An ``api`` token is fetched on first use, reused, and refreshed ``refresh_margin`` seconds
  before it expires; a 401 from the API refetches it once.
- Concurrent callers share one token request (per thread for the sync API, per event loop
  for the async one).
- 429 and 503 answers are retried, honouring ``Retry-After`` (bounded).
- ``customer_token`` returns a token with at least ten minutes left (the LinkSDK refuses
  less), cached per customer.
"""

from __future__ import annotations

import asyncio
import base64
import threading
import time
from collections.abc import AsyncGenerator, Generator
from dataclasses import dataclass
from typing import cast
from urllib.parse import quote_plus

import httpx

__all__ = ["ClientCredentials", "TokenRequestError"]

CUSTOMER_MIN_REMAINING = 600
RETRY_STATUSES = frozenset({429, 503})

# A token fetch with no I/O (as in httpx's Auth.auth_flow): it yields (seconds to sleep, form
# to post), is sent the response (or has the httpx error thrown in) and returns the token.
_Flow = Generator[tuple[float, dict[str, str]], httpx.Response, str]


class TokenRequestError(Exception):
    """The token endpoint refused (the OAuth ``error`` is in ``error``) or was unreachable."""

    def __init__(self, message: str, *, status_code: int | None = None, error: str | None = None):
        super().__init__(message)
        self.status_code = status_code
        self.error = error


@dataclass(frozen=True)
class _Token:
    value: str
    expires_at: float  # monotonic

    def remaining(self) -> float:
        return self.expires_at - time.monotonic()


class ClientCredentials(httpx.Auth):
    def __init__(
        self,
        client_id: str,
        client_secret: str,
        token_url: str,
        *,
        scope: str = "api",
        refresh_margin: float = 60.0,
        max_retries: int = 3,
        max_retry_wait: float = 30.0,
        timeout: float = 10.0,
    ) -> None:
        self._url = token_url  # the token endpoint
        self._scope = scope
        self._margin = refresh_margin
        self._max_retries = max_retries
        self._max_retry_wait = max_retry_wait
        self._timeout = timeout
        # RFC 6749 §2.3.1: each part is form-urlencoded before Base64.
        basic = base64.b64encode(f"{quote_plus(client_id)}:{quote_plus(client_secret)}".encode())
        self._headers = {"Authorization": f"Basic {basic.decode()}", "Accept": "application/json"}
        self._tokens: dict[str, _Token] = {}
        self._lock = threading.Lock()
        self._async_locks: dict[tuple[int, str], asyncio.Lock] = {}
        self.requests_made = 0  # token requests sent, for observability and tests

    # httpx.Auth: a 401 (revoked, or signed by a key the API lacks) gets one fresh-token retry.

    def sync_auth_flow(
        self, request: httpx.Request
    ) -> Generator[httpx.Request, httpx.Response, None]:
        for force in (False, True):
            request.headers["Authorization"] = "Bearer " + self.token(force=force)
            if (yield request).status_code != 401:
                return

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        for force in (False, True):
            request.headers["Authorization"] = "Bearer " + await self.atoken(force=force)
            if (yield request).status_code != 401:
                return

    # Tokens: cached, else fetched holding the lock by a flow (see _Flow)

    def token(
        self, scope: str | None = None, *, min_remaining: float | None = None, force: bool = False
    ) -> str:
        scope = scope or self._scope
        seen = self._tokens.get(scope)
        if not force and (hit := self._fresh(scope, min_remaining)) is not None:
            return hit.value
        with self._lock:
            return self._run(self._fetch(scope, min_remaining, seen))

    async def atoken(
        self, scope: str | None = None, *, min_remaining: float | None = None, force: bool = False
    ) -> str:
        scope = scope or self._scope
        seen = self._tokens.get(scope)
        if not force and (hit := self._fresh(scope, min_remaining)) is not None:
            return hit.value
        async with self._async_lock(scope):
            return await self._arun(self._fetch(scope, min_remaining, seen))

    def customer_token(self, customer_id: str) -> str:
        """A ``customer.<id>`` token with at least ten minutes left, for the LinkSDK."""
        return self.token(f"customer.{customer_id}", min_remaining=CUSTOMER_MIN_REMAINING)

    async def acustomer_token(self, customer_id: str) -> str:
        return await self.atoken(f"customer.{customer_id}", min_remaining=CUSTOMER_MIN_REMAINING)

    def _fresh(
        self, scope: str, min_remaining: float | None, unless: _Token | None = None
    ) -> _Token | None:
        """The cached token if it has enough time left and is not ``unless`` (one already
        found wanting, e.g. refused by the API)."""
        needed = self._margin if min_remaining is None else min_remaining
        token = self._tokens.get(scope)
        if token is not None and token is not unless and token.remaining() > needed:
            return token
        return None

    def _async_lock(self, scope: str) -> asyncio.Lock:
        # asyncio locks belong to one event loop: one per loop and scope.
        return self._async_locks.setdefault((id(asyncio.get_running_loop()), scope), asyncio.Lock())

    def _fetch(self, scope: str, min_remaining: float | None, seen: _Token | None) -> _Flow:
        """The flow of a ``scope`` token: one fetched while this caller waited for the lock (so
        not ``seen``), else a new one, with 429 and 503 retried after ``Retry-After``."""
        if (hit := self._fresh(scope, min_remaining, unless=seen)) is not None:
            return hit.value
        form = {"grant_type": "client_credentials", "scope": scope}
        wait = 0.0
        for attempt in range(self._max_retries + 1):
            try:
                response = yield wait, form
            except httpx.HTTPError as exc:
                raise TokenRequestError(f"token endpoint unreachable: {exc}") from exc
            if (retry_wait := self._retry_wait(response, attempt)) is None:
                break
            wait = retry_wait
        self._tokens[scope] = token = self._parse(response)
        return token.value

    def _run(self, flow: _Flow) -> str:
        try:
            wait, form = next(flow)  # one fetched meanwhile ends the flow here, before any client
            with httpx.Client(timeout=self._timeout) as http:
                while True:
                    time.sleep(wait)
                    self.requests_made += 1
                    try:
                        response = http.post(self._url, data=form, headers=self._headers)
                        wait, form = flow.send(response)
                    except httpx.HTTPError as exc:
                        wait, form = flow.throw(exc)
        except StopIteration as done:
            return cast(str, done.value)

    async def _arun(self, flow: _Flow) -> str:
        try:
            wait, form = next(flow)
            async with httpx.AsyncClient(timeout=self._timeout) as http:
                while True:
                    await asyncio.sleep(wait)
                    self.requests_made += 1
                    try:
                        response = await http.post(self._url, data=form, headers=self._headers)
                        wait, form = flow.send(response)
                    except httpx.HTTPError as exc:
                        wait, form = flow.throw(exc)
        except StopIteration as done:
            return cast(str, done.value)

    # The token endpoint's answers

    def _retry_wait(self, response: httpx.Response, attempt: int) -> float | None:
        """Seconds to wait before retrying, or None when this response is final."""
        if response.status_code not in RETRY_STATUSES or attempt >= self._max_retries:
            return None
        try:
            wait = float(response.headers.get("retry-after", "1"))
        except ValueError:
            wait = 1.0
        if wait > self._max_retry_wait:
            return None  # longer than a caller should block: report the refusal instead
        return max(0.0, wait)

    @staticmethod
    def _parse(response: httpx.Response) -> _Token:
        try:
            body = response.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            body = {}
        if response.status_code != 200 or "access_token" not in body:
            error, description = body.get("error"), body.get("error_description", "")
            message = f"token request refused: HTTP {response.status_code} {error or ''}"
            raise TokenRequestError(
                f"{message} {description}".strip(), status_code=response.status_code, error=error
            )
        return _Token(str(body["access_token"]), time.monotonic() + float(body["expires_in"]))
