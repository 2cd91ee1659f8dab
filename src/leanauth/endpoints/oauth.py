"""``POST /oauth2/revoke`` (RFC 7009) and ``POST /oauth2/introspect`` (RFC 7662).

Both authenticate the client exactly as the token endpoint does (same methods, same uniform
failure, same throttle) and check tokens against this server's own published keys.
"""

from __future__ import annotations

import time

import orjson
from starlette.routing import Route

from leanauth import metrics
from leanauth.audit import Attempt
from leanauth.clientauth import CLIENT_PARAMETERS
from leanauth.endpoints.form import Receive, Scope, read_form
from leanauth.endpoints.oauthbase import OAuthEndpoint
from leanauth.errors import (
    InvalidRequest,
    TemporarilyUnavailable,
    TooManyRequests,
    UnauthorizedClient,
)
from leanauth.owntokens import TOKEN_TIME_LEEWAY, Claims
from leanauth.services import Services
from leanauth.store.base import LimitReached, StoreError
from leanauth.store.models import App, RevokedToken

REVOKE_PATH = "/oauth2/revoke"
INTROSPECT_PATH = "/oauth2/introspect"


def token_parameter(params: dict[str, str]) -> str:
    token = params.get("token")
    if token is None:
        raise InvalidRequest("The token parameter is required.")
    return token


class TokenCheckEndpoint(OAuthEndpoint):
    """An endpoint about a token: the form, the calling app, and the token's claims."""

    parameters = frozenset({"token", "token_type_hint", *CLIENT_PARAMETERS})

    def __init__(self, services: Services) -> None:
        super().__init__(services.audit, services.source_address)
        self._clients = services.clients
        self._tokens = services.own_tokens
        self._cache = services.cache

    async def caller_and_token(
        self, scope: Scope, receive: Receive, attempt: Attempt, now: float, *, expired: bool
    ) -> tuple[App, Claims | None]:
        """The authenticated app and the claims of the ``token`` parameter (None when it is
        not a token of ours; with ``expired``, expired tokens still count as ours)."""
        form = await read_form(scope, receive, self.parameters)
        caller = self._clients.authenticate(form.authorization, form.params, attempt, now).app
        token = token_parameter(form.params)
        return caller, self._tokens.decode(token, check_expiry=not expired)


class RevocationEndpoint(TokenCheckEndpoint):
    """RFC 7009: an app revokes its own tokens. Invalid or expired tokens answer 200 (the
    client cannot do anything about them); another app's token is refused. Every node keeps
    live revocations in memory, so an app may hold ``LEANAUTH_MAX_REVOCATIONS_PER_APP`` of
    them at once; past that, 429 until the oldest of them expires."""

    audit_kind = "revocation"

    def __init__(self, services: Services) -> None:
        super().__init__(services)
        self._revoke_token = services.runtime.store.revoke_token
        self._cap = services.runtime.settings.max_revocations_per_app

    async def handle(self, scope: Scope, receive: Receive, attempt: Attempt) -> bytes:
        now = time.time()
        caller, claims = await self.caller_and_token(scope, receive, attempt, now, expired=True)
        # A token still passes checks for the leeway after its expiry: until then it is
        # worth revoking, and its revocation is kept.
        last_valid = claims["exp"] + TOKEN_TIME_LEEWAY if claims is not None else 0
        if claims is None or last_valid < now:
            metrics.REVOCATIONS.inc("not_revoked")
            self._audit.record("revocation", "not_revoked", caller.client_id, attempt.source)
            return b""
        if claims["client_id"] != caller.client_id:
            raise UnauthorizedClient("The token was not issued to this client.")
        revoked = RevokedToken(claims["jti"], caller.client_id, last_valid, int(now))
        try:
            await self._cache.store_calls.run(self._revoke_token, revoked, self._cap)
        except LimitReached as full:
            raise TooManyRequests(
                f"This app may hold {self._cap} revocations of live tokens at once.",
                retry_after=full.retry_after,
            ) from None
        except StoreError as exc:
            raise TemporarilyUnavailable(detail=str(exc)) from exc
        self._cache.add_revoked(revoked.jti, revoked.expires_at)
        metrics.REVOCATIONS.inc("revoked")
        detail = {"jti": revoked.jti, "exp": claims["exp"]}
        self._audit.record("revocation", "revoked", caller.client_id, attempt.source, detail)
        return b""


class IntrospectionEndpoint(TokenCheckEndpoint):
    """RFC 7662: the owning app, or an app flagged as a resource server, learns whether a
    token is active. A view of the revocation list older than the configured staleness answers
    503 rather than risk calling a revoked token active, or a good one inactive."""

    audit_kind = "introspection"

    def __init__(self, services: Services) -> None:
        super().__init__(services)
        self._max_staleness = services.runtime.settings.introspection_max_staleness

    async def handle(self, scope: Scope, receive: Receive, attempt: Attempt) -> bytes:
        now = time.time()
        caller, claims = await self.caller_and_token(scope, receive, attempt, now, expired=False)
        allowed = claims is not None and (
            caller.introspect or claims["client_id"] == caller.client_id
        )
        if claims is None or not allowed:
            metrics.INTROSPECTIONS.inc("inactive")
            self._audit.record("introspection", "inactive", caller.client_id, attempt.source)
            return orjson.dumps({"active": False})
        staleness = time.monotonic() - self._cache.synced_at
        if staleness > self._max_staleness:
            raise TemporarilyUnavailable(detail=f"revocation list {staleness:.0f}s old")
        if self._tokens.current(claims) is None:
            metrics.INTROSPECTIONS.inc("inactive")
            self._audit.record("introspection", "inactive", caller.client_id, attempt.source)
            return orjson.dumps({"active": False})
        metrics.INTROSPECTIONS.inc("active")
        self._audit.record(
            "introspection", "active", caller.client_id, attempt.source, {"jti": claims["jti"]}
        )
        return orjson.dumps({"active": True, "token_type": "Bearer", **claims})


def oauth_routes(services: Services) -> list[Route]:
    return [
        Route(REVOKE_PATH, RevocationEndpoint(services)),
        Route(INTROSPECT_PATH, IntrospectionEndpoint(services)),
    ]
