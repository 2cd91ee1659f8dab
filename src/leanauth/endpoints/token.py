"""``POST /oauth2/token``: the client-credentials grant (RFC 6749 §3.2, §4.4, §5.1, §5.2).

A thin ASGI handler rather than a Starlette route: this is the hot path, and the framework's
routing and Request/Response objects cost 25-40% of its throughput (measured; bench/README.md).
:meth:`TokenEndpoint.handle` is the whole pipeline, one named step per line. Everything the
request leaves behind (usage counts, last use of the secret, the audit record, a failure for
the throttle) goes to memory; background jobs write it out.
"""

from __future__ import annotations

import asyncio
import time

import orjson

from leanauth import metrics
from leanauth.audit import Attempt
from leanauth.cache import NewIdLookupsSpent
from leanauth.clientauth import CLIENT_PARAMETERS
from leanauth.endpoints.form import Receive, Scope, read_form
from leanauth.endpoints.oauthbase import OAuthEndpoint
from leanauth.errors import (
    InvalidRequest,
    InvalidScope,
    TemporarilyUnavailable,
    UnsupportedGrantType,
)
from leanauth.scopes import RequestedScope, ScopeError, parse_scope
from leanauth.services import Services
from leanauth.store.base import StoreError
from leanauth.store.models import App
from leanauth.tokens import IssuedToken

TOKEN_PATH = "/oauth2/token"  # noqa: S105 (a path)
PARAMETERS = frozenset({"grant_type", "scope", *CLIENT_PARAMETERS})
# Longest a token request waits for its app's not-before time (see wait_for_not_before).
MAX_NOT_BEFORE_WAIT = 2.0


class TokenEndpoint(OAuthEndpoint):
    audit_kind = "token"

    def __init__(self, services: Services) -> None:
        super().__init__(services.audit, services.source_address)
        self._clients = services.clients
        self._cache = services.cache
        self._throttle = services.throttle
        self._usage = services.usage
        self._issuer = services.issuer
        self._secret_use = services.secret_use

    async def handle(self, scope: Scope, receive: Receive, attempt: Attempt) -> bytes:
        form = await read_form(scope, receive, PARAMETERS)
        attempt.scope = form.params.get("scope")
        check_grant_type(form.params)
        now = time.time()
        caller = self._clients.authenticate(form.authorization, form.params, attempt, now)
        app = caller.app
        requested = await self.authorize_scope(app, attempt.scope, now)
        self._usage.check(app, now)
        # The clock again: the customer look-up may have waited for the store, and the token
        # must live its whole lifetime from the moment it is issued.
        now = await wait_for_not_before(app, time.time())
        token = self._issuer.issue(
            self._cache.keyring.signer, app.client_id, requested, app.token_ttl, now
        )
        self._usage.count(app.client_id)
        self._secret_use.record(caller.secret_id, now)
        self.record_issued(app, token, requested, attempt.source)
        return token_response(token)

    async def authorize_scope(self, app: App, raw: str | None, now: float) -> RequestedScope:
        """The requested scope, if the app may have it; a refusal counts toward the app's
        allowance of refused scopes, past which it is answered 429."""
        try:
            requested = parse_scope(raw)
            await self._check_allowed(app, requested, now)
        except ScopeError as refused:
            throttled = self._throttle.refuse_scope(app.client_id, now)
            if throttled is not None:
                raise throttled from None
            raise InvalidScope(str(refused)) from None
        return requested

    async def _check_allowed(self, app: App, requested: RequestedScope, now: float) -> None:
        if requested.scope_class not in app.scopes:
            raise ScopeError(f"This app may not request {requested.scope_class} tokens.")
        if requested.customer_id is None or requested.customer_key is None:
            return
        # An app past its allowance of refused scopes causes no more look-ups in the store.
        may_ask_store = not self._throttle.scope_blocked(app.client_id, now)
        try:
            owned = await self._cache.owns_customer(
                app.client_id, requested.customer_id, requested.customer_key, may_ask_store, now
            )
        except StoreError as exc:
            # Past the deadline too: no token is issued once the request has given up waiting.
            raise TemporarilyUnavailable(detail=str(exc)) from exc
        except NewIdLookupsSpent:
            raise TemporarilyUnavailable(detail="new customer look-ups spent") from None
        if not owned:
            # A customer of another app is refused exactly as an unknown one.
            raise ScopeError("Unknown customer for this app.")

    def record_issued(
        self, app: App, token: IssuedToken, requested: RequestedScope, source: str
    ) -> None:
        metrics.TOKENS_ISSUED.inc(requested.scope_class)
        detail = {"scope": token.scope, "jti": token.jti, "exp": token.expires_at}
        self._audit.record("token", "issued", app.client_id, source, detail)


def check_grant_type(params: dict[str, str]) -> None:
    grant_type = params.get("grant_type")
    if grant_type is None:
        raise InvalidRequest("The grant_type parameter is required.")
    if grant_type != "client_credentials":
        raise UnsupportedGrantType


async def wait_for_not_before(app: App, now: float) -> float:
    """After ``apps revoke-tokens`` the app's tokens must be issued at or after its
    not-before time (the next whole second): wait for it, briefly, and return the time after
    waiting; a node whose clock is far behind answers 503 instead of issuing tokens that
    are refused everywhere."""
    if app.tokens_not_before is None or now >= app.tokens_not_before:
        return now
    delay = app.tokens_not_before - now
    if delay > MAX_NOT_BEFORE_WAIT:
        raise TemporarilyUnavailable(detail="tokens_not_before ahead of this node's clock")
    await asyncio.sleep(delay + 0.005)  # asyncio's clock may wake a hair early
    return time.time()


def token_response(token: IssuedToken) -> bytes:
    """RFC 6749 §5.1."""
    return orjson.dumps(
        {
            "access_token": token.access_token,
            "token_type": "Bearer",
            "expires_in": token.expires_in,
            "scope": token.scope,
        }
    )
