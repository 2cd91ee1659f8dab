"""leanauth.verify's opt-in revocation check (Introspection, RFC 7662): against the real
server, a revoked token is refused within ``cache_seconds``; against introspection endpoints
on loopback that count, fail or lie, the answers are cached per jti as documented and an
endpoint that cannot answer is VerificationUnavailable, never InvalidToken.
"""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs

import httpx
import pytest

from conftest import AppCredentials, Env, Server, known_app, new_token, wait_for
from leanauth.verify import (
    Introspection,
    InvalidToken,
    TokenVerifier,
    VerificationUnavailable,
    VerifiedToken,
)
from test_verify import API_AUDIENCE, ISSUER, JwksServer, Key, ec_key
from test_verify_fetch import Behaviour, answer, dripping, hang_up, hostile

MODES = ["sync", "async"]


def run(verifier: TokenVerifier, token: str, mode: str) -> VerifiedToken:
    if mode == "sync":
        return verifier.verify(token)
    return asyncio.run(verifier.averify(token))


def is_refused(verifier: TokenVerifier, token: str, mode: str) -> bool:
    try:
        run(verifier, token, mode)
    except InvalidToken as refusal:
        return "not active" in refusal.reason
    return False


# Against the real server


@pytest.fixture(scope="module")
def resource_server_app(env: Env, server: Server) -> AppCredentials:
    """The resource server's own credentials: an app that may introspect any app's tokens."""
    return known_app(env, server, "--introspect")


def revoke(server: Server, owner: AppCredentials, token: str) -> None:
    form = {"token": token, "client_id": owner.client_id, "client_secret": owner.client_secret}
    response = httpx.post(server.url + "/oauth2/revoke", data=form, timeout=10)
    assert response.status_code == 200, response.text


def verifier_for(
    server: Server, introspection: Introspection | None = None, **options: Any
) -> TokenVerifier:
    return TokenVerifier(
        issuer=server.url,
        audience=API_AUDIENCE,
        jwks_url=server.url + "/oauth2/jwks",
        introspection=introspection,
        **options,
    )


def introspection_as(
    server: Server, creds: AppCredentials, cache_seconds: float = 0.5
) -> Introspection:
    return Introspection(
        server.url + "/oauth2/introspect",
        creds.client_id,
        creds.client_secret,
        cache_seconds=cache_seconds,
    )


@pytest.mark.parametrize("mode", MODES)
def test_a_revoked_token_is_refused_within_cache_seconds(
    server: Server, app: AppCredentials, resource_server_app: AppCredentials, mode: str
) -> None:
    verifier = verifier_for(server, introspection_as(server, resource_server_app, 0.5))
    token, other = new_token(server, app), new_token(server, app)
    assert run(verifier, token, mode).client_id == app.client_id
    assert run(verifier, other, mode).client_id == app.client_id
    revoke(server, app, token)
    took = wait_for(lambda: is_refused(verifier, token, mode), timeout=5)
    assert took < 0.5 + 1.0, f"still accepted {took:.1f} s after its revocation"
    assert run(verifier, other, mode).client_id == app.client_id  # not revoked: still good


def test_without_introspection_a_revoked_token_still_verifies(
    server: Server, app: AppCredentials
) -> None:
    # The documented limit of offline verification: it cannot see a revocation.
    verifier = verifier_for(server)
    token = new_token(server, app)
    revoke(server, app, token)
    assert verifier.verify(token).client_id == app.client_id


def test_an_active_answer_is_reused_for_cache_seconds(
    server: Server, app: AppCredentials, resource_server_app: AppCredentials
) -> None:
    verifier = verifier_for(server, introspection_as(server, resource_server_app, 60))
    token = new_token(server, app)
    assert verifier.verify(token)
    revoke(server, app, token)
    assert verifier.verify(token)  # the cached answer: a revocation takes up to 60 s here


@pytest.mark.parametrize("mode", MODES)
def test_bad_resource_server_credentials_are_unavailable_not_invalid(
    server: Server, app: AppCredentials, resource_server_app: AppCredentials, mode: str
) -> None:
    wrong_secret = "lsk_" + "w" * 40
    introspection = Introspection(
        server.url + "/oauth2/introspect", resource_server_app.client_id, wrong_secret
    )
    token = new_token(server, app)
    with pytest.raises(VerificationUnavailable) as caught:
        run(verifier_for(server, introspection), token, mode)
    reason = caught.value.reason
    assert "401" in reason
    assert "credentials" in reason
    for secret in (wrong_secret, token):
        assert secret not in reason
        assert secret not in repr(introspection)


# Against introspection endpoints on loopback


class IntrospectionEndpoint:
    """Answers ``{"active": ...}``, inactive for the tokens in ``inactive``; records each
    request's Authorization header and form."""

    def __init__(self) -> None:
        self.inactive: set[str] = set()
        self.requests: list[tuple[str, dict[str, list[str]]]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers["Content-Length"])
                form = parse_qs(self.rfile.read(length).decode(), strict_parsing=True)
                outer.requests.append((self.headers["Authorization"], form))
                active = form["token"][0] not in outer.inactive
                body = json.dumps({"active": active}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
        )
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/oauth2/introspect"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()


@pytest.fixture(scope="module")
def own_key() -> Key:
    return ec_key()


@pytest.fixture
def own_jwks(own_key: Key) -> Iterator[JwksServer]:
    jwks = JwksServer([own_key.jwk()])
    yield jwks
    jwks.close()


@pytest.fixture
def endpoint() -> Iterator[IntrospectionEndpoint]:
    running = IntrospectionEndpoint()
    yield running
    running.close()


def own_verifier(jwks: JwksServer, url: str, **introspection: Any) -> TokenVerifier:
    options = {"cache_seconds": 10.0, **introspection}
    return TokenVerifier(
        issuer=ISSUER,
        audience=API_AUDIENCE,
        jwks_url=jwks.jwks_url,
        introspection=Introspection(url, "rs_client", "rs_secret", **options),
    )


@pytest.mark.parametrize("mode", MODES)
def test_the_request_uses_basic_auth_per_rfc6749_and_hints_an_access_token(
    own_key: Key, own_jwks: JwksServer, endpoint: IntrospectionEndpoint, mode: str
) -> None:
    verifier = TokenVerifier(
        issuer=ISSUER,
        audience=API_AUDIENCE,
        jwks_url=own_jwks.jwks_url,
        introspection=Introspection(endpoint.url, "rs id:1", "se+cr%t é"),
    )
    token = own_key.token()
    assert run(verifier, token, mode)
    [(authorization, form)] = endpoint.requests
    # RFC 6749 §2.3.1: each part form-urlencoded, then joined by ":" and Base64'd.
    pair = base64.b64encode(b"rs+id%3A1:se%2Bcr%25t+%C3%A9").decode()
    assert authorization == f"Basic {pair}"
    assert form == {"token": [token], "token_type_hint": ["access_token"]}


@pytest.mark.parametrize("mode", MODES)
def test_an_active_answer_is_cached_for_cache_seconds(
    own_key: Key, own_jwks: JwksServer, endpoint: IntrospectionEndpoint, mode: str
) -> None:
    verifier = own_verifier(own_jwks, endpoint.url, cache_seconds=0.3)
    token = own_key.token()
    for _ in range(3):
        assert run(verifier, token, mode)
    assert len(endpoint.requests) == 1
    time.sleep(0.4)
    assert run(verifier, token, mode)
    assert len(endpoint.requests) == 2


@pytest.mark.parametrize("mode", MODES)
def test_an_active_answer_is_not_cached_past_exp(
    own_key: Key, own_jwks: JwksServer, endpoint: IntrospectionEndpoint, mode: str
) -> None:
    # Expired 5 s ago, still within the 30 s leeway of the offline checks.
    token = own_key.token(exp=int(time.time()) - 5)
    verifier = own_verifier(own_jwks, endpoint.url, cache_seconds=60)
    assert run(verifier, token, mode)
    assert run(verifier, token, mode)
    assert len(endpoint.requests) == 2


@pytest.mark.parametrize("mode", MODES)
def test_an_inactive_answer_is_cached_until_exp(
    own_key: Key, own_jwks: JwksServer, endpoint: IntrospectionEndpoint, mode: str
) -> None:
    verifier = own_verifier(own_jwks, endpoint.url, cache_seconds=0)
    token = own_key.token()
    endpoint.inactive.add(token)
    for _ in range(3):
        assert is_refused(verifier, token, mode)
    assert len(endpoint.requests) == 1


def test_the_cache_is_bounded_oldest_out(
    own_key: Key, own_jwks: JwksServer, endpoint: IntrospectionEndpoint
) -> None:
    verifier = own_verifier(own_jwks, endpoint.url, cache_size=2)
    first, second, third = (own_key.token() for _ in range(3))
    for token in (first, second, third):
        verifier.verify(token)
    assert len(endpoint.requests) == 3
    verifier.verify(third)
    assert len(endpoint.requests) == 3  # still cached
    verifier.verify(first)
    assert len(endpoint.requests) == 4  # pushed out by the third


FAILURES: dict[str, Behaviour] = {
    "500": answer(500, b"oops"),
    "503": answer(503, b'{"error": "temporarily_unavailable"}', "Retry-After: 3"),
    "400": answer(400, b'{"error": "invalid_request"}'),
    "html": answer(200, b"<html>maintenance</html>"),
    "no-active": answer(200, b'{"scope": "api"}'),
    "active-as-a-string": answer(200, b'{"active": "true"}'),
    "a-list": answer(200, b"[true]"),
    "huge": answer(200, b'{"active": true, "x": "' + b"x" * 100_000 + b'"}'),
    "hang-up": hang_up,
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", list(FAILURES))
def test_a_failing_introspection_endpoint_is_unavailable_not_invalid(
    own_key: Key, own_jwks: JwksServer, mode: str, case: str
) -> None:
    with hostile(FAILURES[case]) as failing:
        verifier = own_verifier(own_jwks, failing.url)
        with pytest.raises(VerificationUnavailable) as caught:
            run(verifier, own_key.token(), mode)
    assert caught.value.reason.startswith("introspection unavailable")
    assert caught.value.retry_after >= 1


@pytest.mark.parametrize("mode", MODES)
def test_a_slow_introspection_endpoint_is_unavailable_at_the_deadline(
    own_key: Key, own_jwks: JwksServer, mode: str
) -> None:
    with hostile(dripping("body")) as slow:
        verifier = TokenVerifier(
            issuer=ISSUER,
            audience=API_AUDIENCE,
            jwks_url=own_jwks.jwks_url,
            timeout=1,
            introspection=Introspection(slow.url, "rs_client", "rs_secret"),
        )
        start = time.monotonic()
        with pytest.raises(VerificationUnavailable):
            run(verifier, own_key.token(), mode)
        assert time.monotonic() - start < 1 + 1
