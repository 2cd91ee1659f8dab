"""``POST /oauth2/revoke`` (RFC 7009) and ``POST /oauth2/introspect`` (RFC 7662).

Both authenticate the client exactly as the token endpoint does (same methods, same uniform
failure, same throttle) and check tokens against this server's own published keys.
"""

from __future__ import annotations

import time
from typing import Any

import jwt
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
from leanauth.services import Services
from leanauth.store.base import LimitReached, StoreError
from leanauth.store.models import App, RevokedToken
from leanauth.verify import REQUIRED_CLAIMS

REVOKE_PATH = "/oauth2/revoke"
INTROSPECT_PATH = "/oauth2/introspect"
# An access token here is a few hundred bytes; anything far larger is not one of ours.
MAX_TOKEN_LENGTH = 8192
# Seconds the nodes' clocks may differ by: a token issued by a node a little ahead is not
# "not yet valid" here, nor one a little past its expiry refused a moment early elsewhere.
# The same as leanauth.verify's default, so resource servers and this server agree.
TOKEN_TIME_LEEWAY = 30


def token_parameter(params: dict[str, str]) -> str:
    token = params.get("token")
    if token is None:
        raise InvalidRequest("The token parameter is required.")
    return token


def decode_own_token(
    services: Services, token: str, *, check_expiry: bool
) -> dict[str, Any] | None:
    """The claims of a token this server signed with a key it still publishes (not one it
    revoked), living no longer than this server issues tokens for; else None."""
    if len(token) > MAX_TOKEN_LENGTH:
        return None
    try:
        header = jwt.get_unverified_header(token)
        alg, key = services.cache.keyring.public_keys[header["kid"]]
        if header.get("typ") != "at+jwt" or header.get("alg") != alg:
            return None
        claims: dict[str, Any] = jwt.decode(
            token,
            key,
            algorithms=[alg],
            issuer=services.runtime.settings.issuer,
            leeway=TOKEN_TIME_LEEWAY,
            options={
                "verify_aud": False,
                "verify_exp": check_expiry,
                "require": REQUIRED_CLAIMS,
            },
        )
    except (jwt.PyJWTError, KeyError, TypeError, ValueError):
        return None
    lifetime = claims["exp"] - claims["iat"]
    if not isinstance(lifetime, int | float) or lifetime > longest_lifetime(services):
        # A token this server never issued: signed with a stolen key, most likely.
        return None
    return claims


def longest_lifetime(services: Services) -> int:
    """The longest lifetime of any token this server issues now."""
    return max(services.issuer.longest_default_lifetime, services.cache.longest_app_ttl)


def current_claims(services: Services, claims: dict[str, Any] | None) -> dict[str, Any] | None:
    """``claims`` if the token still counts: not revoked, and its app neither disabled nor
    made to revoke its tokens since the token was issued (``apps revoke-tokens``)."""
    if claims is None or services.cache.is_revoked(claims["jti"]):
        return None
    if not services.cache.token_is_current(claims["client_id"], claims["iat"]):
        return None
    return claims


class TokenCheckEndpoint(OAuthEndpoint):
    """An endpoint about a token: the form, the calling app, and the token's claims."""

    parameters = frozenset({"token", "token_type_hint", *CLIENT_PARAMETERS})

    def __init__(self, services: Services) -> None:
        super().__init__(services.audit, services.source_address)
        self._services = services

    async def caller_and_token(
        self, scope: Scope, receive: Receive, attempt: Attempt, now: float, *, expired: bool
    ) -> tuple[App, dict[str, Any] | None]:
        """The authenticated app and the claims of the ``token`` parameter (None when it is
        not a token of ours; with ``expired``, expired tokens still count as ours)."""
        form = await read_form(scope, receive, self.parameters)
        caller = self._services.clients.authenticate(
            form.authorization, form.params, attempt, now
        ).app
        token = token_parameter(form.params)
        return caller, decode_own_token(self._services, token, check_expiry=not expired)


class RevocationEndpoint(TokenCheckEndpoint):
    """RFC 7009: an app revokes its own tokens. Invalid or expired tokens answer 200 (the
    client cannot do anything about them); another app's token is refused. Every node keeps
    live revocations in memory, so an app may hold ``LEANAUTH_MAX_REVOCATIONS_PER_APP`` of
    them at once; past that, 429 until the oldest of them expires."""

    audit_kind = "revocation"

    async def handle(self, scope: Scope, receive: Receive, attempt: Attempt) -> bytes:
        services = self._services
        now = time.time()
        caller, claims = await self.caller_and_token(scope, receive, attempt, now, expired=True)
        # A token still passes checks for the leeway after its expiry: until then it is
        # worth revoking, and its revocation is kept.
        last_valid = claims["exp"] + TOKEN_TIME_LEEWAY if claims is not None else 0
        if claims is None or last_valid < now:
            metrics.REVOCATIONS.inc("not_revoked")
            services.audit.record("revocation", "not_revoked", caller.client_id, attempt.source)
            return b""
        if claims["client_id"] != caller.client_id:
            raise UnauthorizedClient("The token was not issued to this client.")
        revoked = RevokedToken(claims["jti"], caller.client_id, last_valid, int(now))
        cap = services.runtime.settings.max_revocations_per_app
        try:
            await services.cache.store_calls.run(
                services.runtime.store.revoke_token,
                revoked,
                cap,
            )
        except LimitReached as full:
            raise TooManyRequests(
                f"This app may hold {cap} revocations of live tokens at once.",
                retry_after=full.retry_after,
            ) from None
        except StoreError as exc:
            raise TemporarilyUnavailable(detail=str(exc)) from exc
        services.cache.add_revoked(revoked.jti, revoked.expires_at)
        metrics.REVOCATIONS.inc("revoked")
        detail = {"jti": revoked.jti, "exp": claims["exp"]}
        services.audit.record("revocation", "revoked", caller.client_id, attempt.source, detail)
        return b""


class IntrospectionEndpoint(TokenCheckEndpoint):
    """RFC 7662: the owning app, or an app flagged as a resource server, learns whether a
    token is active. A view of the revocation list older than the configured staleness answers
    503 rather than risk calling a revoked token active, or a good one inactive."""

    audit_kind = "introspection"

    async def handle(self, scope: Scope, receive: Receive, attempt: Attempt) -> bytes:
        services = self._services
        now = time.time()
        caller, claims = await self.caller_and_token(scope, receive, attempt, now, expired=False)
        allowed = claims is not None and (
            caller.introspect or claims["client_id"] == caller.client_id
        )
        if claims is None or not allowed:
            metrics.INTROSPECTIONS.inc("inactive")
            services.audit.record("introspection", "inactive", caller.client_id, attempt.source)
            return orjson.dumps({"active": False})
        staleness = time.monotonic() - services.cache.synced_at
        if staleness > services.runtime.settings.introspection_max_staleness:
            raise TemporarilyUnavailable(detail=f"revocation list {staleness:.0f}s old")
        if current_claims(services, claims) is None:
            metrics.INTROSPECTIONS.inc("inactive")
            services.audit.record("introspection", "inactive", caller.client_id, attempt.source)
            return orjson.dumps({"active": False})
        metrics.INTROSPECTIONS.inc("active")
        services.audit.record(
            "introspection", "active", caller.client_id, attempt.source, {"jti": claims["jti"]}
        )
        return orjson.dumps({"active": True, "token_type": "Bearer", **claims})


def oauth_routes(services: Services) -> list[Route]:
    return [
        Route(REVOKE_PATH, RevocationEndpoint(services)),
        Route(INTROSPECT_PATH, IntrospectionEndpoint(services)),
    ]
