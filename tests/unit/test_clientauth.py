"""Client authentication (leanauth.clientauth): which credentials a request presents, and
their check against the registry view; every failure is the one uniform invalid_client."""

from __future__ import annotations

import base64
import os
from collections.abc import Callable

import pytest

from leanauth.audit import Attempt
from leanauth.cache import CachedClient
from leanauth.clientauth import (
    Authenticated,
    ClientAuthenticator,
    PresentedCredentials,
    authenticate,
    presented_credentials,
)
from leanauth.credentials import SecretHasher, new_client_secret
from leanauth.errors import InvalidClient, InvalidRequest, TooManyRequests
from leanauth.store.models import App
from leanauth.throttle import FailureThrottle

CLIENT_ID = "3f0c8d7e-2b1a-4c5d-9e8f-7a6b5c4d3e2f"
SECRET = "lsk_" + "s" * 43
NOW = 1_700_000_000.0


def basic(text: str | bytes, scheme: bytes = b"Basic") -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return scheme + b" " + base64.b64encode(raw)


# presented_credentials: what is accepted


@pytest.mark.parametrize(
    ("authorization", "params", "expected"),
    [
        pytest.param(
            None,
            {"client_id": CLIENT_ID, "client_secret": SECRET},
            (CLIENT_ID, SECRET),
            id="post",
        ),
        pytest.param(basic(f"{CLIENT_ID}:{SECRET}"), {}, (CLIENT_ID, SECRET), id="basic"),
        pytest.param(
            basic(f"{CLIENT_ID}:{SECRET}", b"basic"), {}, (CLIENT_ID, SECRET), id="lower-case"
        ),
        pytest.param(
            basic(f"{CLIENT_ID}:{SECRET}", b"BASIC"), {}, (CLIENT_ID, SECRET), id="upper-case"
        ),
        pytest.param(
            b"  " + basic(f"{CLIENT_ID}:{SECRET}") + b"  ",
            {},
            (CLIENT_ID, SECRET),
            id="surrounding-spaces",
        ),
        pytest.param(
            b"Basic   " + base64.b64encode(f"{CLIENT_ID}:{SECRET}".encode()),
            {},
            (CLIENT_ID, SECRET),
            id="several-spaces-after-scheme",
        ),
        pytest.param(
            basic(f"{CLIENT_ID}:{SECRET}"),
            {"client_id": CLIENT_ID},
            (CLIENT_ID, SECRET),
            id="basic-with-matching-body-id",
        ),
        pytest.param(basic("id:se:cr:et"), {}, ("id", "se:cr:et"), id="colons-in-secret"),
        # RFC 6749 §2.3.1: id and secret are form-urlencoded before Base64.
        pytest.param(basic("my+id:s%2Bc%3At"), {}, ("my id", "s+c:t"), id="form-urlencoded"),
        pytest.param(basic("my%20id:p%40ss"), {}, ("my id", "p@ss"), id="percent-20"),
        pytest.param(basic("a%3Ab:c"), {}, ("a:b", "c"), id="escaped-colon-in-id"),
        pytest.param(
            basic("\u00e9t\u00e9:s\u00fbr".encode()), {}, ("\u00e9t\u00e9", "s\u00fbr"), id="utf8"
        ),
        pytest.param(basic("%C3%A9:x"), {}, ("\u00e9", "x"), id="escaped-utf8"),
        # The truncated and malformed forms refused below, as a well-formed header.
        pytest.param(b"Basic aWQ6c2VjcmV0", {}, ("id", "secret"), id="literal-base64"),
    ],
)
def test_presented_credentials(
    authorization: bytes | None, params: dict[str, str], expected: tuple[str, str]
) -> None:
    assert presented_credentials(authorization, params) == PresentedCredentials(*expected)


# presented_credentials: failures to authenticate (uniform invalid_client)


@pytest.mark.parametrize(
    ("authorization", "params", "detail"),
    [
        pytest.param(None, {}, "no_credentials", id="nothing"),
        pytest.param(None, {"client_id": CLIENT_ID}, "no_credentials", id="id-only"),
        pytest.param(None, {"client_secret": SECRET}, "no_credentials", id="secret-only"),
        pytest.param(
            None, {"client_id": "", "client_secret": SECRET}, "no_credentials", id="empty-id"
        ),
        pytest.param(
            None, {"client_id": CLIENT_ID, "client_secret": ""}, "no_credentials", id="empty-pw"
        ),
        pytest.param(b"Bearer abc", {}, "unsupported_scheme", id="bearer"),
        pytest.param(b"Digest username=x", {}, "unsupported_scheme", id="digest"),
        pytest.param(b"Basically " + b"eDp5", {}, "unsupported_scheme", id="scheme-prefix"),
        pytest.param(base64.b64encode(b"id:secret"), {}, "unsupported_scheme", id="no-scheme"),
        pytest.param(b"", {}, "unsupported_scheme", id="empty-header"),
        pytest.param(b"Basic", {}, "malformed_credentials", id="scheme-only"),
        pytest.param(b"Basic ", {}, "malformed_credentials", id="scheme-and-space"),
        pytest.param(b"Basic !!!!", {}, "malformed_credentials", id="not-base64"),
        pytest.param(b"Basic aWQ6c2VjcmV", {}, "malformed_credentials", id="truncated"),
        pytest.param(b"Basic aWQ6c2Vj=cmV0", {}, "malformed_credentials", id="inner-padding"),
        pytest.param(b"Basic aWQ6c2Vj cmV0", {}, "malformed_credentials", id="inner-space"),
        pytest.param(b"Basic aWQ6c2VjcmV0\x00", {}, "malformed_credentials", id="nul"),
        pytest.param(basic(b"\xff\xfe:secret"), {}, "malformed_credentials", id="not-utf8"),
        pytest.param(basic("idsecret"), {}, "malformed_credentials", id="no-colon"),
        pytest.param(basic(":secret"), {}, "malformed_credentials", id="empty-id"),
        pytest.param(basic("id:"), {}, "malformed_credentials", id="empty-secret"),
        pytest.param(basic(":"), {}, "malformed_credentials", id="colon-only"),
        pytest.param(basic(""), {}, "malformed_credentials", id="empty-credentials"),
    ],
)
def test_credentials_that_cannot_authenticate(
    authorization: bytes | None, params: dict[str, str], detail: str
) -> None:
    with pytest.raises(InvalidClient) as caught:
        presented_credentials(authorization, params)
    assert caught.value.detail == detail
    assert_uniform(caught.value)


# presented_credentials: bad requests (invalid_request, not a failed authentication)


@pytest.mark.parametrize(
    ("authorization", "params", "description"),
    [
        pytest.param(
            basic(f"{CLIENT_ID}:{SECRET}"),
            {"client_secret": SECRET},
            "Use one client authentication method, not both.",
            id="basic-and-post",
        ),
        pytest.param(
            basic(f"{CLIENT_ID}:{SECRET}"),
            {"client_id": CLIENT_ID, "client_secret": "other"},
            "Use one client authentication method, not both.",
            id="basic-and-post-other-secret",
        ),
        pytest.param(
            b"Bearer x",
            {"client_id": CLIENT_ID, "client_secret": SECRET},
            "Use one client authentication method, not both.",
            id="other-scheme-and-post",
        ),
        pytest.param(
            basic(f"{CLIENT_ID}:{SECRET}"),
            {"client_id": "someone-else"},
            "The client_id in the body does not match the Authorization header.",
            id="body-id-mismatch",
        ),
        pytest.param(
            basic(f"{CLIENT_ID}:{SECRET}"),
            {"client_id": CLIENT_ID.upper()},
            "The client_id in the body does not match the Authorization header.",
            id="body-id-other-case",
        ),
        pytest.param(
            basic("my+id:x"),
            {"client_id": "my+id"},
            "The client_id in the body does not match the Authorization header.",
            id="body-id-compared-decoded",
        ),
        pytest.param(
            basic("id\x01:secret"),
            {},
            "Client credentials must not contain control characters.",
            id="raw-control-in-id",
        ),
        pytest.param(
            basic("id:sec\x7fret"),
            {},
            "Client credentials must not contain control characters.",
            id="raw-del-in-secret",
        ),
        pytest.param(
            basic("id:secret%0A"),
            {},
            "Client credentials must not contain control characters.",
            id="escaped-newline",
        ),
        pytest.param(
            basic("id%00:secret"),
            {},
            "Client credentials must not contain control characters.",
            id="escaped-nul",
        ),
        pytest.param(
            basic("id:%C2%85"),
            {},
            "Client credentials must not contain control characters.",
            id="escaped-c1",
        ),
    ],
)
def test_bad_requests(
    authorization: bytes | None, params: dict[str, str], description: str
) -> None:
    with pytest.raises(InvalidRequest) as caught:
        presented_credentials(authorization, params)
    assert type(caught.value) is InvalidRequest
    assert caught.value.status_code == 400
    assert caught.value.description == description


# authenticate, against a small registry view


class FakeRegistry:
    """What :func:`authenticate` asks of the RegistryCache: ``client(client_id)``."""

    def __init__(self, *clients: CachedClient) -> None:
        self._clients = {c.app.client_id: c for c in clients}
        self.asked: list[str] = []

    def client(self, client_id: str) -> CachedClient | None:
        self.asked.append(client_id)
        return self._clients.get(client_id)


HASHER = SecretHasher(os.urandom(32))
OLD_SECRET = new_client_secret()
NEW_SECRET = new_client_secret()


def cached(
    *,
    enabled: bool = True,
    secrets: tuple[tuple[str, str, float], ...] = (("sec_old", OLD_SECRET, float("inf")),),
) -> CachedClient:
    app = App(CLIENT_ID, "Unit app", frozenset({"api"}), None, enabled, 0)
    expiries = tuple(expiry for _, _, expiry in secrets)
    return CachedClient(
        app,
        tuple(HASHER.hash(secret) for _, secret, _ in secrets),
        tuple(secret_id for secret_id, _, _ in secrets),
        expiries,
        min(expiries, default=float("inf")),
    )


def attempt(registry: FakeRegistry, secret: str, client_id: str = CLIENT_ID) -> Authenticated:
    return authenticate(PresentedCredentials(client_id, secret), registry, HASHER, NOW)


def test_the_right_secret_authenticates() -> None:
    client = cached()
    result = attempt(FakeRegistry(client), OLD_SECRET)
    assert result == Authenticated(client, "sec_old")


def test_either_of_two_live_secrets_authenticates_naming_its_own_id() -> None:
    client = cached(
        secrets=(("sec_old", OLD_SECRET, NOW + 60), ("sec_new", NEW_SECRET, float("inf")))
    )
    registry = FakeRegistry(client)
    assert attempt(registry, OLD_SECRET).secret_id == "sec_old"
    assert attempt(registry, NEW_SECRET).secret_id == "sec_new"


ROTATED = (("sec_old", OLD_SECRET, NOW), ("sec_new", NEW_SECRET, float("inf")))

FAILURES: list[tuple[str, Callable[[], CachedClient], str, str]] = [
    ("unknown_client", cached, OLD_SECRET, "00000000-0000-4000-8000-000000000000"),
    ("wrong_secret", cached, NEW_SECRET, CLIENT_ID),
    ("wrong_secret", cached, OLD_SECRET.upper(), CLIENT_ID),
    ("wrong_secret", cached, OLD_SECRET.removeprefix("lsk_"), CLIENT_ID),
    ("wrong_secret", cached, OLD_SECRET + " ", CLIENT_ID),
    ("wrong_secret", lambda: cached(secrets=()), OLD_SECRET, CLIENT_ID),
    ("wrong_secret", lambda: cached(enabled=False), NEW_SECRET, CLIENT_ID),
    # A secret whose end is now has ended (``<=``).
    ("expired_secret", lambda: cached(secrets=ROTATED), OLD_SECRET, CLIENT_ID),
    (
        "expired_secret",
        lambda: cached(secrets=(("sec_old", OLD_SECRET, NOW - 1),)),
        OLD_SECRET,
        CLIENT_ID,
    ),
    ("disabled_app", lambda: cached(enabled=False), OLD_SECRET, CLIENT_ID),
]


@pytest.mark.parametrize(
    ("detail", "make_client", "secret", "client_id"),
    FAILURES,
    ids=[f"{i}-{f[0]}" for i, f in enumerate(FAILURES)],
)
def test_authentication_failures(
    detail: str, make_client: Callable[[], CachedClient], secret: str, client_id: str
) -> None:
    registry = FakeRegistry(make_client())
    with pytest.raises(InvalidClient) as caught:
        attempt(registry, secret, client_id)
    assert caught.value.detail == detail
    assert registry.asked == [client_id]
    assert_uniform(caught.value)


def test_rotated_secret_still_live_just_before_its_end() -> None:
    client = cached(secrets=(("sec_old", OLD_SECRET, NOW + 0.5), ("sec_new", NEW_SECRET, 1e18)))
    assert attempt(FakeRegistry(client), OLD_SECRET).secret_id == "sec_old"


# The uniform failure


UNIFORM_BODY = b'{"error":"invalid_client","error_description":"Client authentication failed."}'
UNIFORM_HEADERS = [(b"www-authenticate", b'Basic realm="leanauth", charset="UTF-8"')]


def assert_uniform(error: InvalidClient) -> None:
    """Every authentication failure looks the same from outside; only ``detail`` (logged,
    never sent) tells them apart."""
    assert type(error) is InvalidClient
    assert error.status_code == 401
    assert error.error == "invalid_client"
    assert error.body() == UNIFORM_BODY
    assert error.extra_headers_list() == UNIFORM_HEADERS
    assert error.detail is not None
    assert error.detail.encode() not in error.body()


def test_every_failure_has_its_own_detail_and_the_same_answer() -> None:
    errors: list[InvalidClient] = []
    for authorization, params in (
        (None, {}),
        (b"Bearer x", {}),
        (basic("no-colon"), {}),
    ):
        with pytest.raises(InvalidClient) as caught:
            presented_credentials(authorization, params)
        errors.append(caught.value)
    for detail, make_client, secret, client_id in FAILURES:
        with pytest.raises(InvalidClient) as caught:
            attempt(FakeRegistry(make_client()), secret, client_id)
        assert caught.value.detail == detail
        errors.append(caught.value)
    assert {e.detail for e in errors} == {
        "no_credentials",
        "unsupported_scheme",
        "malformed_credentials",
        "unknown_client",
        "wrong_secret",
        "expired_secret",
        "disabled_app",
    }
    assert {(e.status_code, e.body(), tuple(e.extra_headers_list())) for e in errors} == {
        (401, UNIFORM_BODY, tuple(UNIFORM_HEADERS))
    }


# ClientAuthenticator: authentication with the brute-force throttle behind it

SOURCE = "198.51.100.23"


def authenticator(pair_limit: int = 2) -> ClientAuthenticator:
    throttle = FailureThrottle(f"{pair_limit} per minute", "1000 per minute", "10 per minute", None)
    return ClientAuthenticator(FakeRegistry(cached()), HASHER, throttle)  # type: ignore[arg-type]


def post(secret: str, client_id: str = CLIENT_ID) -> dict[str, str]:
    return {"client_id": client_id, "client_secret": secret}


def test_authenticator_notes_the_client_id_presented() -> None:
    clients = authenticator()
    attempt = Attempt(SOURCE)
    result = clients.authenticate(None, post(OLD_SECRET), attempt, NOW)
    assert (result.app.client_id, result.secret_id) == (CLIENT_ID, "sec_old")
    assert attempt.client_id == CLIENT_ID
    failed = Attempt(SOURCE)
    with pytest.raises(InvalidClient):
        clients.authenticate(basic("someone:else"), {}, failed, NOW)
    assert failed.client_id == "someone"
    anonymous = Attempt(SOURCE)
    with pytest.raises(InvalidClient):
        clients.authenticate(None, {}, anonymous, NOW)
    assert anonymous.client_id is None


def test_failures_past_the_allowance_are_answered_429_and_the_right_secret_still_works() -> None:
    clients = authenticator(pair_limit=2)
    for _ in range(2):
        with pytest.raises(InvalidClient):
            clients.authenticate(None, post(NEW_SECRET), Attempt(SOURCE), NOW)
    with pytest.raises(TooManyRequests) as caught:
        clients.authenticate(None, post(NEW_SECRET), Attempt(SOURCE), NOW)
    # The reason of the failure is kept for the audit record, never sent.
    assert caught.value.detail == "wrong_secret"
    assert b"wrong_secret" not in caught.value.body()
    # Correct credentials are never refused by the throttle.
    result = clients.authenticate(basic(f"{CLIENT_ID}:{OLD_SECRET}"), {}, Attempt(SOURCE), NOW)
    assert result.secret_id == "sec_old"
    # Another source is counted apart.
    with pytest.raises(InvalidClient):
        clients.authenticate(None, post(NEW_SECRET), Attempt("198.51.100.24"), NOW)


def test_bad_requests_are_not_counted_as_failed_authentications() -> None:
    clients = authenticator(pair_limit=1)
    both = {"client_id": CLIENT_ID, "client_secret": OLD_SECRET}
    for _ in range(5):
        with pytest.raises(InvalidRequest) as caught:
            clients.authenticate(basic(f"{CLIENT_ID}:{OLD_SECRET}"), both, Attempt(SOURCE), NOW)
        assert type(caught.value) is InvalidRequest
    with pytest.raises(InvalidClient):
        clients.authenticate(None, post(NEW_SECRET), Attempt(SOURCE), NOW)
