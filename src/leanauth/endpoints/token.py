"""``POST /oauth2/token``: the client-credentials grant (RFC 6749 §3.2, §4.4, §5.1, §5.2).

A thin ASGI handler rather than a Starlette route: this is the hot path, and the framework's
routing and Request/Response objects cost 25-40% of its throughput (measured; bench/README.md).
The request goes through a short list of named checks, then the token is issued:

    reject_other_methods → reject_secret_in_query → require_form_body → read_body →
    parse_form (known parameters; rejects repeats and control characters) →
    check_grant_type → authenticate (a failure counts toward the throttle) →
    authorize_scope → usage.check (quota) → wait_for_not_before → issue → count, audit

Everything the request leaves behind (usage counts, last use of the secret, the audit
record, a failure for the throttle) goes to memory; background jobs write it out.
"""

from __future__ import annotations

import asyncio
import time

import orjson

from leanauth import metrics
from leanauth.cache import CachedClient, NewIdLookupsSpent
from leanauth.endpoints.oauthbase import (
    CLIENT_PARAMETERS,
    Attempt,
    OAuthEndpoint,
    Receive,
    Scope,
)
from leanauth.errors import (
    InvalidRequest,
    InvalidScope,
    TemporarilyUnavailable,
    UnsupportedGrantType,
)
from leanauth.scopes import RequestedScope, parse_scope
from leanauth.services import Services
from leanauth.store.base import StoreError
from leanauth.store.models import App

# Longest a token request waits for its app's not-before time (see wait_for_not_before).
TOKEN_PATH = "/oauth2/token"  # noqa: S105 (a path)
MAX_NOT_BEFORE_WAIT = 2.0


def check_grant_type(params: dict[str, str]) -> None:
    grant_type = params.get("grant_type")
    if grant_type is None:
        raise InvalidRequest("The grant_type parameter is required.")
    if grant_type != "client_credentials":
        raise UnsupportedGrantType


async def authorize_scope(
    client: CachedClient, requested: RequestedScope, services: Services
) -> None:
    app = client.app
    if requested.scope_class not in app.scopes:
        raise InvalidScope(f"This app may not request {requested.scope_class} tokens.")
    if requested.customer_id is None or requested.customer_key is None:
        return
    # An app past its allowance of refused scopes causes no more look-ups in the store.
    may_ask_store = not services.throttle.scope_blocked(app.client_id, time.time())
    try:
        owned = await services.cache.owns_customer(
            app.client_id,
            requested.customer_id,
            requested.customer_key,
            may_ask_store,
            services.runtime.settings.db_request_timeout,
        )
    except StoreError as exc:
        # Past the deadline too: no token is issued once the request has given up waiting.
        raise TemporarilyUnavailable(detail=str(exc)) from exc
    except NewIdLookupsSpent:
        raise TemporarilyUnavailable(detail="new customer look-ups spent") from None
    if not owned:
        # A customer of another app is refused exactly as an unknown one.
        raise InvalidScope("Unknown customer for this app.")


async def wait_for_not_before(app: App, now: float) -> None:
    """After ``apps revoke-tokens`` the app's tokens must be issued at or after its
    not-before time (the next whole second): wait for it, briefly; a node whose clock is
    far behind answers 503 instead of issuing tokens that are refused everywhere."""
    if app.tokens_not_before is None or now >= app.tokens_not_before:
        return
    delay = app.tokens_not_before - now
    if delay > MAX_NOT_BEFORE_WAIT:
        raise TemporarilyUnavailable(detail="tokens_not_before ahead of this node's clock")
    await asyncio.sleep(delay + 0.005)  # asyncio's clock may wake a hair early


class TokenEndpoint(OAuthEndpoint):
    audit_kind = "token"
    parameters = frozenset({"grant_type", "scope", *CLIENT_PARAMETERS})

    async def handle(self, scope: Scope, receive: Receive, attempt: Attempt) -> bytes:
        services = self._services
        form = await self.read_form(scope, receive, attempt)
        attempt.scope = form.params.get("scope")
        check_grant_type(form.params)
        now = time.time()
        authenticated = self.authenticate(form, attempt, now)
        app = authenticated.client.app
        try:
            requested = parse_scope(attempt.scope)
            await authorize_scope(authenticated.client, requested, services)
        except InvalidScope:
            throttled = services.throttle.refuse_scope(app.client_id, now)
            if throttled is not None:
                raise throttled from None
            raise
        services.usage.check(app, now)
        if app.tokens_not_before is not None:
            await wait_for_not_before(app, now)
        token = services.issuer.issue(
            services.cache.keyring.signer, app.client_id, requested, app.token_ttl
        )
        services.usage.count(app.client_id)
        metrics.TOKENS_ISSUED.inc(requested.scope_class)
        services.secret_use[authenticated.secret_id] = int(now)
        services.audit.record(
            "token",
            "issued",
            app.client_id,
            attempt.source,
            {"scope": token.scope, "jti": token.jti, "exp": token.expires_at},
        )
        return orjson.dumps(
            {
                "access_token": token.access_token,
                "token_type": "Bearer",
                "expires_in": token.expires_in,
                "scope": token.scope,
            }
        )
