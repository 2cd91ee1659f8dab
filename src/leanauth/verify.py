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
  leeway; ``exp - iat`` may not exceed the longest lifetime the server issues; every
  RFC 9068 claim is required; a ``crit`` header is refused (no extension is understood);
  ``jku``, ``x5u``, ``jwk`` and ``x5c`` are never followed;
- an unknown ``kid`` refetches the JWKS at most once per ``jwks_refetch_interval`` seconds;
- input size is bounded before any parsing, so huge or deeply nested tokens cost little;
  so is every answer fetched (its bytes, and its time: ``timeout`` for the whole fetch).

Offline verification cannot see a revocation: a revoked token verifies until it expires.
``introspection=Introspection(...)`` opts in to asking the server (RFC 7662), with a short
cache. A JWKS or introspection endpoint that cannot answer is no verdict on the token: it
raises :class:`VerificationUnavailable` (answer 503), never :class:`InvalidToken` (401).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import math
import re
import ssl
import threading
import time
from collections import OrderedDict
from collections.abc import Generator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast
from urllib.parse import quote_plus

import httpx
import jwt

__all__ = [
    "Introspection",
    "InvalidToken",
    "TokenVerifier",
    "VerificationUnavailable",
    "VerifiedToken",
]

ALLOWED_ALGORITHMS = ("ES256", "EdDSA", "PS256", "RS256")
REQUIRED_CLAIMS = ["iss", "sub", "aud", "exp", "iat", "jti", "client_id", "scope"]
ACCEPTED_TYPES = frozenset({"at+jwt", "application/at+jwt"})
MAX_TOKEN_BYTES = 8 * 1024
MAX_JWKS_BYTES = 64 * 1024
MAX_INTROSPECTION_BYTES = 64 * 1024
MAX_KID_LENGTH = 128
# The longest lifetime a leanauth server gives a token (leanauth.settings.MAX_TOKEN_TTL, not
# imported: resource servers need not load the server's settings). A token that claims to
# live longer was not issued by a leanauth server, or was issued by a broken one.
MAX_TOKEN_LIFETIME = 86_400
# How long past jwks_max_age a key set may still be used while its refresh fails, so that a
# JWKS outage does not take every resource server down at the same moment.
JWKS_STALE_IF_ERROR = 3600.0
INTROSPECTION_CACHE_SIZE = 10_000
# Retry-After for an introspection outage (a JWKS outage says when the next fetch is due).
INTROSPECTION_RETRY_AFTER = 5
# Threads that run sync fetches, so that a caller can stop waiting at the deadline.
FETCH_WORKERS = 16
INTERRUPTED = "the last fetch of the JWKS was interrupted"
CUSTOMER_PREFIX = "customer."
COMPACT_JWS = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")
CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


class InvalidToken(Exception):
    """The token is not acceptable; ``reason`` says why (for logs, not for clients)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class VerificationUnavailable(Exception):
    """The token cannot be checked now: the JWKS or the introspection endpoint is unreachable,
    too slow, failing, answers garbage or refuses our credentials. No verdict on the token, so
    not an :class:`InvalidToken`: answer 503 with ``Retry-After: retry_after``, never 401 (a
    client fetches a new token on 401, adding load to the outage). ``reason`` is for logs."""

    def __init__(self, reason: str, retry_after: int) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


class _FetchFailed(Exception):
    """A JWKS or introspection fetch gave no usable answer; ``reason`` says why."""

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
class Introspection:
    """The opt-in revocation check: once the offline checks pass, the verifier asks the
    introspection endpoint (RFC 7662) whether the token is still active, as the app
    ``client_id``. Create that app with ``leanauth apps create --introspect``: any other app
    is told nothing of tokens not its own, so every such token would look inactive.

    Answers are cached per ``jti``: an active one for ``cache_seconds`` (a revocation takes
    effect within that), an inactive one until the token expires; at most ``cache_size``
    answers, the oldest out."""

    url: str
    client_id: str
    client_secret: str = field(repr=False)
    cache_seconds: float = 10.0
    cache_size: int = INTROSPECTION_CACHE_SIZE

    def __post_init__(self) -> None:
        if self.cache_seconds < 0 or self.cache_size < 1:
            raise ValueError("cache_seconds must be >= 0 and cache_size >= 1")


@dataclass(frozen=True)
class _KeySet:
    keys: dict[str, tuple[str, Any]]  # kid → (alg, public key)
    fetched_at: float


class _Answers:
    """Introspection answers by jti, each good until a wall-clock time; the oldest go first
    when there are more than ``size``."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._entries: OrderedDict[str, tuple[bool, float]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, jti: str) -> bool | None:
        with self._lock:
            entry = self._entries.get(jti)
            if entry is None:
                return None
            active, until = entry
            if until <= time.time():
                del self._entries[jti]
                return None
            return active

    def put(self, jti: str, active: bool, until: float) -> None:
        with self._lock:
            self._entries.pop(jti, None)
            self._entries[jti] = (active, until)
            while len(self._entries) > self._size:
                self._entries.popitem(last=False)


@dataclass(frozen=True)
class _Fetch:
    """A step of a flow (see _Flow): fetch ``request``. The result is the status and, for a
    200, the body: at most ``limit`` bytes, all of it by ``deadline`` (monotonic)."""

    request: httpx.Request
    limit: int
    deadline: float

    def remaining(self) -> float:
        """Seconds left for the fetch; TimeoutError when none are."""
        if (left := self.deadline - time.monotonic()) <= 0:
            raise TimeoutError
        return left

    def wants_body(self, response: httpx.Response) -> bool:
        """Whether to read the body: a 200's only, refused before it is read if it says it is
        too large or is compressed (a small compressed body can inflate to anything)."""
        if response.status_code != 200:
            return False
        if response.headers.get("content-encoding", "identity").lower() != "identity":
            raise _FetchFailed("the answer is content-encoded")
        try:
            too_large = int(response.headers.get("content-length", "0")) > self.limit
        except ValueError:
            too_large = True
        if too_large:
            raise _FetchFailed(f"the answer is larger than {self.limit} bytes")
        return True

    def add(self, body: bytearray, chunk: bytes) -> None:
        """Add ``chunk`` to ``body``; refused past ``limit`` bytes or past ``deadline``."""
        body += chunk
        if len(body) > self.limit:
            raise _FetchFailed(f"the answer is larger than {self.limit} bytes")
        if time.monotonic() > self.deadline:
            raise _FetchFailed("the answer is too slow")


@dataclass(frozen=True)
class _Locked:
    """A step of a flow: run ``flow`` holding the JWKS lock (callers who waited for it then use
    the key set it fetched). The result is the flow's; TimeoutError if the lock stays taken."""

    flow: _Flow[str | None]


# verify and averify are written once, as generators that do no I/O (flows, like httpx's
# Auth.auth_flow): a flow yields each step it needs taken and is sent its result, or has the
# exception that stopped it thrown in (a cancellation too), so that every decision is the
# flow's. The sync and the async driver (_run, _arun) only take the steps.
T = TypeVar("T")
_Step = _Fetch | _Locked
_Flow = Generator[_Step, Any, T]


class TokenVerifier:
    """``verify`` and ``averify`` return the checked token, raise :class:`InvalidToken` for a
    token to refuse (401), and :class:`VerificationUnavailable` when it cannot be checked now
    (503). ``timeout`` bounds each fetch as a whole: connect, headers and body. A key set
    older than ``jwks_max_age`` is refreshed; while that fails, it still serves for
    ``jwks_stale_if_error`` seconds more. ``max_lifetime`` caps ``exp - iat``."""

    def __init__(
        self,
        *,
        issuer: str,
        audience: str,
        jwks_url: str,
        algorithms: Sequence[str] = ALLOWED_ALGORITHMS,
        leeway: float = 30.0,
        max_lifetime: float = MAX_TOKEN_LIFETIME,
        jwks_max_age: float = 300.0,
        jwks_refetch_interval: float = 30.0,
        jwks_stale_if_error: float = JWKS_STALE_IF_ERROR,
        timeout: float = 5.0,
        introspection: Introspection | None = None,
    ) -> None:
        unknown = set(algorithms) - set(ALLOWED_ALGORITHMS)
        if unknown or not algorithms:
            raise ValueError(f"algorithms must be among {ALLOWED_ALGORITHMS}")
        if max_lifetime <= 0 or jwks_stale_if_error < 0 or timeout <= 0:
            raise ValueError("max_lifetime and timeout must be > 0, jwks_stale_if_error >= 0")
        self.issuer = issuer
        self.audience = audience
        self.jwks_url = jwks_url
        self._algorithms = frozenset(algorithms)
        self._leeway = leeway
        self._max_lifetime = max_lifetime
        self._max_age = jwks_max_age
        self._refetch_interval = jwks_refetch_interval
        self._stale_if_error = jwks_stale_if_error
        self._timeout = timeout
        self._introspection = introspection
        self._answers = _Answers(introspection.cache_size if introspection else 1)
        self._keys = _KeySet({}, float("-inf"))
        self._last_fetch_attempt = float("-inf")
        self._fetch_error: str | None = None  # why the last JWKS fetch failed, if it did
        self._lock = threading.Lock()
        self._async_lock = asyncio.Lock()  # bound to an event loop on first contention
        self._workers = ThreadPoolExecutor(FETCH_WORKERS, thread_name_prefix="leanauth-verify")
        self._tls: ssl.SSLContext | None = None
        self._tls_lock = threading.Lock()

    # Public API: one flow, two drivers

    def verify(self, token: str) -> VerifiedToken:
        return self._run(self._verify(token))

    async def averify(self, token: str) -> VerifiedToken:
        return await self._arun(self._verify(token))

    def _verify(self, token: str) -> _Flow[VerifiedToken]:
        header = self._header(token)
        kid = header["kid"]
        key = None if self._stale() else self._keys.keys.get(kid)
        if key is None:
            try:
                failure = yield _Locked(self._refresh(kid, self._deadline()))
            except TimeoutError:  # waiting for the lock
                failure = "another fetch of the JWKS is taking too long"
            key = self._key_after_refresh(kid, failure)
        verified = self._check(token, header, key)
        if self._introspection is not None:
            yield from self._introspect(self._introspection, token, verified)
        return verified

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

    def _age(self) -> float:
        return time.monotonic() - self._keys.fetched_at

    def _stale(self) -> bool:
        return self._age() > self._max_age

    def _key_after_refresh(self, kid: str, failure: str | None) -> tuple[str, Any]:
        """The key named ``kid`` once a refresh was tried (or was not due). While the JWKS
        cannot be fetched, a stale set serves for ``jwks_stale_if_error`` more seconds, and a
        kid it lacks is no verdict: the key may be new."""
        failure = failure or self._fetch_error
        key = self._keys.keys.get(kid)
        if key is not None and (
            failure is None or self._age() <= self._max_age + self._stale_if_error
        ):
            return key
        if failure is not None:
            raise VerificationUnavailable(f"JWKS unavailable: {failure}", self._retry_after())
        raise InvalidToken("unknown kid")

    def _retry_after(self) -> int:
        """Seconds until the JWKS may be fetched again."""
        due = self._last_fetch_attempt + self._refetch_interval - time.monotonic()
        return max(1, math.ceil(due))

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
        verified = verified_from_claims(claims)
        # A stolen token that lives for years is worth stealing; the server never issues one.
        if claims["exp"] - claims["iat"] > self._max_lifetime:
            raise InvalidToken("exp - iat exceeds the longest lifetime the server issues")
        return verified

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

    def _refresh(self, kid: str, deadline: float) -> _Flow[str | None]:
        """Refresh the key set if due (run holding the lock); why that failed, if it did."""
        if not self._should_fetch(kid):
            return None
        try:
            headers = {"Accept": "application/json", "Accept-Encoding": "identity"}
            request = httpx.Request("GET", self.jwks_url, headers=headers)
            status, body = yield from self._fetched(request, MAX_JWKS_BYTES, deadline)
            self._keys = self._parse_jwks(status, body)
        except _FetchFailed as exc:
            self._fetch_error = exc.reason
            return exc.reason
        except BaseException:  # cancelled, say: the next fetch is an interval away
            self._fetch_error = INTERRUPTED
            raise
        self._fetch_error = None
        return None

    def _parse_jwks(self, status: int, body: bytes) -> _KeySet:
        if status != 200:
            raise _FetchFailed(f"the JWKS answered HTTP {status}")
        keys: dict[str, tuple[str, Any]] = {}
        try:
            entries = json.loads(body)["keys"]
        except (ValueError, KeyError, TypeError, RecursionError):
            entries = None
        if not isinstance(entries, list):
            raise _FetchFailed("the JWKS is not a key set")
        for entry in entries:
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

    # Introspection

    def _introspect(
        self, introspection: Introspection, token: str, verified: VerifiedToken
    ) -> _Flow[None]:
        active = self._answers.get(verified.jti)
        if active is None:
            request = _introspection_request(introspection, token)
            try:
                status, body = yield from self._fetched(request, MAX_INTROSPECTION_BYTES)
                active = self._remember(introspection, verified, status, body)
            except _FetchFailed as exc:
                reason = f"introspection unavailable: {exc.reason}"
                raise VerificationUnavailable(reason, INTROSPECTION_RETRY_AFTER) from None
        if not active:
            raise InvalidToken("the token is not active (revoked, say)")

    def _remember(
        self, introspection: Introspection, verified: VerifiedToken, status: int, body: bytes
    ) -> bool:
        """Whether the answer says active, cached: an active answer for ``cache_seconds``
        but never past ``exp``; an inactive one until the token fails the offline checks."""
        active = _activity(status, body)
        exp = float(verified.claims["exp"])
        if active:
            until = min(time.time() + introspection.cache_seconds, exp)
        else:
            until = exp + self._leeway
        self._answers.put(verified.jti, active, until)
        return active

    # Fetching, bounded in bytes and in time

    def _fetched(
        self, request: httpx.Request, limit: int, deadline: float | None = None
    ) -> _Flow[tuple[int, bytes]]:
        """The status of ``request`` and, for a 200, its body (see _Fetch), by ``deadline``
        (by default ``timeout`` from now); any failure is a _FetchFailed."""
        deadline = self._deadline() if deadline is None else deadline
        try:
            answer: tuple[int, bytes] = yield _Fetch(request, limit, deadline)
        except TimeoutError:
            raise _FetchFailed(f"no answer within {self._timeout:g} s") from None
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise _FetchFailed(f"unreachable ({type(exc).__name__}: {exc})") from None
        return answer

    def _deadline(self) -> float:
        return time.monotonic() + self._timeout

    def _tls_context(self) -> ssl.SSLContext:
        """One TLS context for every fetch: building one loads the CA bundle (tens of ms)."""
        with self._tls_lock:
            if self._tls is None:
                self._tls = httpx.create_ssl_context()
            return self._tls

    # The drivers: they take each step of a flow, blocking or on the event loop

    def _run(self, flow: _Flow[T]) -> T:
        try:
            step = next(flow)
            while True:
                try:
                    result = self._take(step)
                except BaseException as exc:  # the flow's to judge
                    step = flow.throw(exc)
                else:
                    step = flow.send(result)
        except StopIteration as done:
            return cast(T, done.value)

    def _take(self, step: _Step) -> Any:
        if isinstance(step, _Fetch):
            return self._fetch(step)
        if not self._lock.acquire(timeout=self._timeout):
            raise TimeoutError
        try:
            return self._run(step.flow)
        finally:
            self._lock.release()

    def _fetch(self, fetch: _Fetch) -> tuple[int, bytes]:
        """Take ``fetch`` in a worker thread, waited for until its deadline: httpx's timeouts
        bound each read, not the fetch, so a server that drips a byte at a time could hold a
        caller for ever. Abandoned, the fetch ends at its next chunk past the deadline, or
        once its connection is closed under it."""
        remaining = fetch.remaining()
        client = httpx.Client(timeout=remaining, verify=self._tls_context())
        future = self._workers.submit(_read, client, fetch)
        try:
            return future.result(timeout=remaining)
        except TimeoutError:
            future.cancel()
            client.close()
            raise

    async def _arun(self, flow: _Flow[T]) -> T:
        try:
            step = next(flow)
            while True:
                try:
                    result = await self._atake(step)
                except BaseException as exc:  # the flow's to judge, a cancellation too
                    step = flow.throw(exc)
                else:
                    step = flow.send(result)
        except StopIteration as done:
            return cast(T, done.value)

    async def _atake(self, step: _Step) -> Any:
        if isinstance(step, _Fetch):
            return await self._afetch(step)
        async with asyncio.timeout(self._timeout):
            await self._async_lock.acquire()
        try:
            return await self._arun(step.flow)
        finally:
            self._async_lock.release()

    async def _afetch(self, fetch: _Fetch) -> tuple[int, bytes]:
        remaining = fetch.remaining()
        async with (
            asyncio.timeout(remaining),
            httpx.AsyncClient(timeout=remaining, verify=self._tls_context()) as client,
            contextlib.aclosing(await client.send(fetch.request, stream=True)) as response,
        ):
            body = bytearray()
            if fetch.wants_body(response):
                async for chunk in response.aiter_raw():
                    fetch.add(body, chunk)
            return response.status_code, bytes(body)


def _read(client: httpx.Client, fetch: _Fetch) -> tuple[int, bytes]:
    """Take ``fetch`` with ``client``, in a worker thread (see TokenVerifier._fetch)."""
    with client, contextlib.closing(client.send(fetch.request, stream=True)) as response:
        body = bytearray()
        if fetch.wants_body(response):
            for chunk in response.iter_raw():
                fetch.add(body, chunk)
        return response.status_code, bytes(body)


def _introspection_request(introspection: Introspection, token: str) -> httpx.Request:
    # RFC 6749 §2.3.1: id and secret are each form-urlencoded before they are joined.
    pair = f"{quote_plus(introspection.client_id)}:{quote_plus(introspection.client_secret)}"
    headers = {
        "Authorization": "Basic " + base64.b64encode(pair.encode()).decode("ascii"),
        "Accept": "application/json",
        "Accept-Encoding": "identity",
    }
    form = {"token": token, "token_type_hint": "access_token"}
    return httpx.Request("POST", introspection.url, data=form, headers=headers)


def _activity(status: int, body: bytes) -> bool:
    """The ``active`` member of an introspection answer (RFC 7662 §2.2)."""
    if status == 401:
        raise _FetchFailed(
            "the introspection endpoint refused the resource server's credentials (HTTP 401):"
            " a configuration error, check Introspection.client_id and client_secret"
        )
    if status != 200:
        raise _FetchFailed(f"the introspection endpoint answered HTTP {status}")
    try:
        answer = json.loads(body)
    except (ValueError, RecursionError):
        raise _FetchFailed("the introspection answer is not JSON") from None
    active = answer.get("active") if isinstance(answer, dict) else None
    if not isinstance(active, bool):
        raise _FetchFailed("the introspection answer has no boolean active member")
    return active


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
