"""``POST /oauth2/token``: the client-credentials grant (RFC 6749 §3.2, §4.4, §5.1, §5.2).

A thin ASGI handler rather than a Starlette route: this is the hot path, and the framework's
routing and Request/Response objects cost 25-40% of its throughput (measured, DESIGN.md).
The request goes through a short list of named checks, then the token is issued:

    reject_other_methods → reject_secret_in_query → require_form_body → read_body →
    parse_form (rejects repeats) → check_grant_type → throttle.check → authenticate →
    authorize_scope → usage.check (quota) → issue → count, audit

Everything the request leaves behind (usage counts, last use of the secret, the audit
record, a failure for the throttle) goes to memory; background jobs write it out.
"""

from __future__ import annotations

import time

import orjson

from leanauth.cache import CachedClient, RegistryCache
from leanauth.endpoints.oauthbase import Attempt, OAuthEndpoint, Receive, Scope
from leanauth.errors import (
    InvalidRequest,
    InvalidScope,
    TemporarilyUnavailable,
    UnsupportedGrantType,
)
from leanauth.scopes import RequestedScope, parse_scope
from leanauth.store.base import StoreError


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


class TokenEndpoint(OAuthEndpoint):
    audit_kind = "token"

    async def handle(self, scope: Scope, receive: Receive, attempt: Attempt) -> bytes:
        services = self._services
        form = await self.read_form(scope, receive, attempt)
        attempt.scope = form.params.get("scope")
        check_grant_type(form.params)
        now = time.time()
        authenticated = self.authenticate(form, attempt, now)
        app = authenticated.client.app
        requested = parse_scope(attempt.scope)
        await authorize_scope(authenticated.client, requested, services.cache)
        services.usage.check(app, now)
        token = services.issuer.issue(
            services.cache.keyring.signer, app.client_id, requested, app.token_ttl
        )
        services.usage.count(app.client_id)
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
