"""Client authentication (RFC 6749 §2.3.1): ``client_secret_basic`` and ``client_secret_post``.

"The client MUST NOT use more than one authentication method in each request": a secret in
both the Authorization header and the body is an ``invalid_request``. Every failure to
authenticate (unknown client, wrong secret, disabled app, missing or undecodable credentials)
is the same :class:`~leanauth.errors.InvalidClient`, and the secret check costs the same
time whether or not the client exists.
"""

from __future__ import annotations

import base64
import binascii
from typing import NamedTuple
from urllib.parse import unquote_plus

from leanauth.audit import Attempt
from leanauth.cache import CachedClient, RegistryCache
from leanauth.credentials import SecretHasher
from leanauth.errors import InvalidClient, InvalidRequest
from leanauth.safetext import has_control_characters
from leanauth.store.models import App
from leanauth.throttle import FailureThrottle

# The form parameters of client_secret_post.
CLIENT_PARAMETERS = frozenset({"client_id", "client_secret"})


class PresentedCredentials(NamedTuple):
    client_id: str
    client_secret: str


def presented_credentials(
    authorization: bytes | None, params: dict[str, str]
) -> PresentedCredentials:
    """The credentials the request carries, by whichever one method (RFC 6749 §2.3.1)."""
    body_id = params.get("client_id")
    body_secret = params.get("client_secret")
    if authorization is None:
        if not body_id or not body_secret:
            raise InvalidClient(detail="no_credentials")
        return PresentedCredentials(body_id, body_secret)
    if body_secret is not None:
        raise InvalidRequest("Use one client authentication method, not both.")
    client_id, client_secret = _decode_basic(authorization)
    if body_id is not None and body_id != client_id:
        raise InvalidRequest("The client_id in the body does not match the Authorization header.")
    return PresentedCredentials(client_id, client_secret)


def _decode_basic(authorization: bytes) -> tuple[str, str]:
    """RFC 6749 §2.3.1: id and secret are each form-urlencoded, then joined and Base64'd."""
    scheme, _, encoded = authorization.strip().partition(b" ")
    if scheme.lower() != b"basic":
        raise InvalidClient(detail="unsupported_scheme")
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        raise InvalidClient(detail="malformed_credentials") from None
    client_id, colon, client_secret = decoded.partition(":")
    if not colon:
        raise InvalidClient(detail="malformed_credentials")
    client_id, client_secret = unquote_plus(client_id), unquote_plus(client_secret)
    if not client_id or not client_secret:
        raise InvalidClient(detail="malformed_credentials")
    if has_control_characters(decoded) or has_control_characters(client_id + client_secret):
        raise InvalidRequest("Client credentials must not contain control characters.")
    return client_id, client_secret


class Authenticated(NamedTuple):
    client: CachedClient
    secret_id: str

    @property
    def app(self) -> App:
        return self.client.app


def authenticate(
    credentials: PresentedCredentials, cache: RegistryCache, hasher: SecretHasher, now: float
) -> Authenticated:
    client = cache.client(credentials.client_id)
    hashes = client.secret_hashes if client is not None else ()
    # The hash is checked before the other conditions so every failure costs the same.
    matched = hasher.match(credentials.client_secret, hashes)
    if client is None:
        raise InvalidClient(detail="unknown_client")
    if matched is None:
        raise InvalidClient(detail="wrong_secret")
    if client.secret_expiries[matched] <= now:
        raise InvalidClient(detail="expired_secret")
    if not client.app.enabled:
        raise InvalidClient(detail="disabled_app")
    return Authenticated(client, client.secret_ids[matched])


class ClientAuthenticator:
    """Client authentication with the brute-force throttle behind it. The secret is checked
    before the throttle is consulted, so correct credentials always succeed; a failure is
    counted, and answered 429 instead of 401 once its pair or source has used up its
    allowance."""

    def __init__(
        self, cache: RegistryCache, hasher: SecretHasher, throttle: FailureThrottle
    ) -> None:
        self._cache = cache
        self._hasher = hasher
        self._throttle = throttle

    def authenticate(
        self, authorization: bytes | None, params: dict[str, str], attempt: Attempt, now: float
    ) -> Authenticated:
        try:
            presented = presented_credentials(authorization, params)
            attempt.client_id = presented.client_id
            return authenticate(presented, self._cache, self._hasher, now)
        except InvalidClient as failure:
            throttled = self._throttle.refuse(attempt.client_id, attempt.source, now)
            if throttled is not None:
                throttled.detail = failure.detail
                raise throttled from None
            raise
