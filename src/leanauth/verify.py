"""Verify leanauth access tokens on a resource server (RFC 9068, RFC 8725), on PyJWT.

    verifier = TokenVerifier(
        issuer="https://auth.example.com",
        audience="urn:leanauth:api",
        jwks_url="https://auth.example.com/oauth2/jwks",
    )
    token = verifier.verify(access_token)       # or: await verifier.averify(access_token)
    token.client_id, token.scope, token.customer_id, token.expires_at, token.jti

The secure choice is the only one:

- the algorithm comes from the JWKS key named by ``kid`` and must be in the allow-list
  (ES256, EdDSA, PS256, RS256); the header's ``alg`` must equal it; ``none`` and HMAC never
  verify (a public key can never be used as an HMAC secret);
- ``typ`` must be ``at+jwt``; ``iss`` must equal the issuer exactly; ``aud`` must be a single
  string equal to our audience; ``exp``, ``nbf`` and ``iat`` are checked with a small
  leeway; every RFC 9068 claim is required; a ``crit`` header is refused (no extension is
  understood); ``jku``, ``x5u``, ``jwk`` and ``x5c`` are never followed;
- an unknown ``kid`` refetches the JWKS at most once per ``jwks_refetch_interval`` seconds;
- input size is bounded before any parsing, so huge or deeply nested tokens cost little.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import jwt

__all__ = ["InvalidToken", "TokenVerifier", "VerifiedToken"]

ALLOWED_ALGORITHMS = ("ES256", "EdDSA", "PS256", "RS256")
REQUIRED_CLAIMS = ["iss", "sub", "aud", "exp", "iat", "jti", "client_id", "scope"]
ACCEPTED_TYPES = frozenset({"at+jwt", "application/at+jwt"})
MAX_TOKEN_BYTES = 8 * 1024
MAX_JWKS_BYTES = 64 * 1024
MAX_KID_LENGTH = 128
CUSTOMER_PREFIX = "customer."
COMPACT_JWS = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")
CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


class InvalidToken(Exception):
    """The token is not acceptable; ``reason`` says why (for logs, not for clients)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class VerifiedToken:
    client_id: str
    scope: str
    customer_id: str | None
    expires_at: int
    issued_at: int
    jti: str
    subject: str
    claims: dict[str, Any]

    @property
    def scope_class(self) -> str:
        return "customer" if self.customer_id is not None else self.scope


@dataclass(frozen=True)
class _KeySet:
    keys: dict[str, tuple[str, Any]]  # kid → (alg, public key)
    fetched_at: float


class TokenVerifier:
    def __init__(
        self,
        *,
        issuer: str,
        audience: str,
        jwks_url: str,
        algorithms: Sequence[str] = ALLOWED_ALGORITHMS,
        leeway: float = 30.0,
        jwks_max_age: float = 300.0,
        jwks_refetch_interval: float = 30.0,
        timeout: float = 5.0,
    ) -> None:
        unknown = set(algorithms) - set(ALLOWED_ALGORITHMS)
        if unknown or not algorithms:
            raise ValueError(f"algorithms must be among {ALLOWED_ALGORITHMS}")
        self.issuer = issuer
        self.audience = audience
        self.jwks_url = jwks_url
        self._algorithms = frozenset(algorithms)
        self._leeway = leeway
        self._max_age = jwks_max_age
        self._refetch_interval = jwks_refetch_interval
        self._timeout = timeout
        self._keys = _KeySet({}, float("-inf"))
        self._last_fetch_attempt = float("-inf")
        self._lock = threading.Lock()
        self._async_lock: asyncio.Lock | None = None

    # Public API

    def verify(self, token: str) -> VerifiedToken:
        header = self._header(token)
        key = self._key_for(header, self._refresh_sync)
        return self._check(token, header, key)

    async def averify(self, token: str) -> VerifiedToken:
        header = self._header(token)
        key = self._keys.keys.get(header["kid"]) if not self._stale() else None
        if key is None:
            await self._refresh_async(header["kid"])
            key = self._keys.keys.get(header["kid"])
        if key is None:
            raise InvalidToken("unknown kid")
        return self._check(token, header, key)

    # Steps

    def _header(self, token: str) -> dict[str, Any]:
        if not isinstance(token, str) or len(token) > MAX_TOKEN_BYTES:
            raise InvalidToken("not a token of a plausible size")
        # Three unpadded base64url segments (RFC 7515 §7.1): one token, one spelling.
        if COMPACT_JWS.fullmatch(token) is None:
            raise InvalidToken("not a JWS in compact form")
        try:
            header: dict[str, Any] = jwt.get_unverified_header(token)
        except (jwt.PyJWTError, ValueError, RecursionError) as exc:
            raise InvalidToken(f"undecodable header: {exc}") from None
        if "crit" in header:
            raise InvalidToken("crit header: no extension is understood")
        typ = header.get("typ")
        if not isinstance(typ, str) or typ.lower() not in ACCEPTED_TYPES:
            raise InvalidToken("typ is not at+jwt")
        kid = header.get("kid")
        if not isinstance(kid, str) or not 0 < len(kid) <= MAX_KID_LENGTH:
            raise InvalidToken("no usable kid")
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self._algorithms:
            raise InvalidToken("algorithm not allowed")
        return header

    def _stale(self) -> bool:
        return time.monotonic() - self._keys.fetched_at > self._max_age

    def _key_for(self, header: dict[str, Any], refresh: Any) -> tuple[str, Any]:
        key = self._keys.keys.get(header["kid"]) if not self._stale() else None
        if key is None:
            refresh(header["kid"])
            key = self._keys.keys.get(header["kid"])
        if key is None:
            raise InvalidToken("unknown kid")
        return key

    def _check(self, token: str, header: dict[str, Any], key: tuple[str, Any]) -> VerifiedToken:
        alg, public_key = key
        # The key decides the algorithm; a header that says otherwise is refused.
        if header["alg"] != alg:
            raise InvalidToken("header alg does not match the key")
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                public_key,
                algorithms=[alg],
                issuer=self.issuer,
                audience=self.audience,
                leeway=self._leeway,
                options={"require": REQUIRED_CLAIMS, "strict_aud": True},
            )
        except (jwt.PyJWTError, ValueError, RecursionError) as exc:
            raise InvalidToken(str(exc) or type(exc).__name__) from None
        return verified_from_claims(claims)

    # The JWKS

    def _should_fetch(self, kid: str) -> bool:
        """Fetch when the set is stale or lacks ``kid`` — at most once per refetch interval,
        whether or not the last attempt succeeded, so a failing or hostile JWKS endpoint is
        not asked once per token."""
        now = time.monotonic()
        if kid in self._keys.keys and not self._stale():
            return False
        if now - self._last_fetch_attempt < self._refetch_interval:
            return False
        self._last_fetch_attempt = now
        return True

    def _refresh_sync(self, kid: str) -> None:
        with self._lock:
            if not self._should_fetch(kid):
                return
            try:
                response = httpx.get(self.jwks_url, timeout=self._timeout)
            except httpx.HTTPError as exc:
                raise InvalidToken(f"JWKS unreachable: {exc}") from None
            self._keys = self._parse_jwks(response)

    async def _refresh_async(self, kid: str) -> None:
        if self._async_lock is None:
            self._async_lock = asyncio.Lock()
        async with self._async_lock:
            if not self._should_fetch(kid):
                return
            try:
                async with httpx.AsyncClient(timeout=self._timeout) as client:
                    response = await client.get(self.jwks_url)
            except httpx.HTTPError as exc:
                raise InvalidToken(f"JWKS unreachable: {exc}") from None
            self._keys = self._parse_jwks(response)

    def _parse_jwks(self, response: httpx.Response) -> _KeySet:
        if response.status_code != 200 or len(response.content) > MAX_JWKS_BYTES:
            raise InvalidToken(f"JWKS answered HTTP {response.status_code}")
        keys: dict[str, tuple[str, Any]] = {}
        try:
            entries = response.json()["keys"]
        except (ValueError, KeyError, TypeError):
            raise InvalidToken("JWKS is not a key set") from None
        for entry in entries if isinstance(entries, list) else []:
            if not isinstance(entry, dict):
                continue
            alg, kid = entry.get("alg"), entry.get("kid")
            if not isinstance(alg, str) or alg not in self._algorithms or not isinstance(kid, str):
                continue  # HMAC, "none" and keys without an algorithm are never used
            if entry.get("use", "sig") != "sig":
                continue
            try:
                keys[kid] = (alg, jwt.PyJWK(entry, algorithm=alg).key)
            except (jwt.PyJWTError, ValueError, TypeError):
                continue
        return _KeySet(keys, time.monotonic())


def verified_from_claims(claims: dict[str, Any]) -> VerifiedToken:
    """The typed view of checked claims; refuses scopes and claims that do not agree."""
    scope, client_id = claims["scope"], claims["client_id"]
    if not isinstance(scope, str) or not isinstance(client_id, str):
        raise InvalidToken("scope and client_id must be strings")
    for name in ("exp", "iat", "nbf"):
        value = claims.get(name, 0)
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise InvalidToken(f"{name} must be a number")  # RFC 7519 NumericDate
    if claims["sub"] != client_id:
        raise InvalidToken("sub is not the client id")
    customer_id = None
    if scope.startswith(CUSTOMER_PREFIX):
        customer_id = scope[len(CUSTOMER_PREFIX) :]
        if CANONICAL_UUID.fullmatch(customer_id) is None:
            raise InvalidToken("the customer id is not a UUID")
        customers = claims.get("customers")
        if customers != [{"id": customer_id}]:
            raise InvalidToken("customer scope without a matching customers claim")
    elif scope != "api":
        raise InvalidToken("unknown scope")
    return VerifiedToken(
        client_id=client_id,
        scope=scope,
        customer_id=customer_id,
        expires_at=int(claims["exp"]),
        issued_at=int(claims["iat"]),
        jti=str(claims["jti"]),
        subject=str(claims["sub"]),
        claims=claims,
    )
