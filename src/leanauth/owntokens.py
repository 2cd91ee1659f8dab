"""This server's own checks of the tokens it issued: for revocation, introspection and the
Customers API, against the keys it publishes now and the revocations it knows of."""

from __future__ import annotations

from typing import Any

import jwt

from leanauth.cache import RegistryCache
from leanauth.tokens import TokenIssuer
from leanauth.verify import REQUIRED_CLAIMS

# An access token here is a few hundred bytes; anything far larger is not one of ours.
MAX_TOKEN_LENGTH = 8192
# Seconds the nodes' clocks may differ by: a token issued by a node a little ahead is not
# "not yet valid" here, nor one a little past its expiry refused a moment early elsewhere.
# The same as leanauth.verify's default, so resource servers and this server agree.
TOKEN_TIME_LEEWAY = 30

Claims = dict[str, Any]


class OwnTokens:
    def __init__(self, cache: RegistryCache, issuer: str, lifetimes: TokenIssuer) -> None:
        self._cache = cache
        self._issuer = issuer
        self._lifetimes = lifetimes

    def decode(self, token: str, *, check_expiry: bool) -> Claims | None:
        """The claims of a token this server signed with a key it still publishes (not one
        it revoked), living no longer than this server issues tokens for; else None."""
        if len(token) > MAX_TOKEN_LENGTH:
            return None
        try:
            header = jwt.get_unverified_header(token)
            alg, key = self._cache.keyring.public_keys[header["kid"]]
            if header.get("typ") != "at+jwt" or header.get("alg") != alg:
                return None
            claims: Claims = jwt.decode(
                token,
                key,
                algorithms=[alg],
                issuer=self._issuer,
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
        if not isinstance(lifetime, int | float) or lifetime > self.longest_lifetime():
            # A token this server never issued: signed with a stolen key, most likely.
            return None
        return claims

    def longest_lifetime(self) -> int:
        """The longest lifetime of any token this server issues now."""
        return max(self._lifetimes.longest_default_lifetime, self._cache.longest_app_ttl)

    def current(self, claims: Claims | None) -> Claims | None:
        """``claims`` if the token still counts: not revoked, and its app neither disabled
        nor made to revoke its tokens since the token was issued (``apps revoke-tokens``)."""
        if claims is None or self._cache.is_revoked(claims["jti"]):
            return None
        if not self._cache.token_is_current(claims["client_id"], claims["iat"]):
            return None
        return claims
