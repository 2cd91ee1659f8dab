"""The SDK's ``ClientCredentials`` (an ``httpx.Auth``) against a real server, and against a
tiny fake token endpoint for the 429/503 retry behaviour."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import jwt
import pytest

from conftest import (
    RELAXED_THROTTLE,
    AppCredentials,
    Env,
    Server,
    known_app,
    serving,
)
from leanauth.client import ClientCredentials, TokenRequestError
from secret_sweep import record_token

# This module waits for its apps with failing token requests; the throttle must not mind.
CONCURRENCY = 100


# Fixtures and helpers


@pytest.fixture(scope="module")
def sdk_env(tmp_path_factory: pytest.TempPathFactory) -> Env:
    return Env(tmp_path_factory.mktemp("sdk"), dict(RELAXED_THROTTLE))


@pytest.fixture(scope="module")
def sdk_server(sdk_env: Env) -> Iterator[Server]:
    with serving(sdk_env) as running:
        yield running


@pytest.fixture(scope="module")
def sdk_app(sdk_env: Env, sdk_server: Server) -> AppCredentials:
    return known_app(sdk_env, sdk_server, "--scopes", "api,customer")


@pytest.fixture(scope="module")
def short_app(sdk_env: Env, sdk_server: Server) -> AppCredentials:
    """An app whose tokens live 60 s."""
    return known_app(sdk_env, sdk_server, "--scopes", "api,customer", "--token-ttl", "60")


def auth_for(server: Server, creds: AppCredentials, **options: Any) -> ClientCredentials:
    return ClientCredentials(creds.client_id, creds.client_secret, server.token_url, **options)


def customers_url(server: Server) -> str:
    return server.url + "/customers/v1/"


def new_user() -> dict[str, str]:
    return {"app_user_id": f"user-{uuid.uuid4()}"}


def create_customer(server: Server, auth: ClientCredentials) -> str:
    with httpx.Client(auth=auth, timeout=10) as api:
        response = api.post(customers_url(server), json=new_user())
    assert response.status_code == 201, response.text
    return str(response.json()["customer_id"])


def claims_of(token: str) -> dict[str, Any]:
    record_token(token)
    return dict(jwt.decode(token, options={"verify_signature": False}))


def revoke(server: Server, creds: AppCredentials, token: str) -> None:
    form = {"token": token, "client_id": creds.client_id, "client_secret": creds.client_secret}
    response = httpx.post(server.url + "/oauth2/revoke", data=form, timeout=10)
    assert response.status_code == 200, response.text


# The api token


def test_auth_calls_the_customers_api_with_one_token(
    sdk_server: Server, sdk_app: AppCredentials
) -> None:
    auth = auth_for(sdk_server, sdk_app)
    with httpx.Client(auth=auth, timeout=10) as api:
        for _ in range(3):
            response = api.post(customers_url(sdk_server), json=new_user())
            assert response.status_code == 201, response.text
        listed = api.get(customers_url(sdk_server), params={"size": 1})
        assert listed.status_code == 200, listed.text
    assert auth.requests_made == 1
    claims = claims_of(auth.token())
    assert claims["scope"] == "api"
    assert claims["client_id"] == sdk_app.client_id
    assert auth.requests_made == 1


def test_async_client_calls_the_customers_api(sdk_server: Server, sdk_app: AppCredentials) -> None:
    auth = auth_for(sdk_server, sdk_app)

    async def main() -> list[int]:
        async with httpx.AsyncClient(auth=auth, timeout=10) as api:
            return [
                (await api.post(customers_url(sdk_server), json=new_user())).status_code
                for _ in range(2)
            ]

    assert asyncio.run(main()) == [201, 201]
    assert auth.requests_made == 1


def test_token_is_refreshed_before_it_expires(
    sdk_server: Server, short_app: AppCredentials
) -> None:
    auth = auth_for(sdk_server, short_app, refresh_margin=59.5)
    with httpx.Client(auth=auth, timeout=10) as api:
        assert api.post(customers_url(sdk_server), json=new_user()).status_code == 201
        first = auth.token()
        assert auth.requests_made == 1
        time.sleep(1.0)
        response = api.post(customers_url(sdk_server), json=new_user())
        assert response.status_code == 201, response.text
    assert auth.requests_made == 2
    second = auth.token()
    assert second != first
    assert claims_of(second)["jti"] != claims_of(first)["jti"]


def test_concurrent_async_callers_share_one_request(
    sdk_server: Server, sdk_app: AppCredentials
) -> None:
    auth = auth_for(sdk_server, sdk_app)

    async def main() -> list[str]:
        return await asyncio.gather(*(auth.atoken() for _ in range(CONCURRENCY)))

    tokens = asyncio.run(main())
    assert len(set(tokens)) == 1
    assert auth.requests_made == 1
    claims_of(tokens[0])


def test_concurrent_async_client_calls_share_one_request(
    sdk_server: Server, sdk_app: AppCredentials
) -> None:
    auth = auth_for(sdk_server, sdk_app)
    customer_id = create_customer(sdk_server, auth_for(sdk_server, sdk_app))

    async def main() -> list[int]:
        limits = httpx.Limits(max_connections=CONCURRENCY)
        async with httpx.AsyncClient(auth=auth, timeout=30, limits=limits) as api:
            url = customers_url(sdk_server) + customer_id
            responses = await asyncio.gather(*(api.get(url) for _ in range(CONCURRENCY)))
        return [r.status_code for r in responses]

    assert asyncio.run(main()) == [200] * CONCURRENCY
    assert auth.requests_made == 1


def test_concurrent_threads_share_one_request(sdk_server: Server, sdk_app: AppCredentials) -> None:
    auth = auth_for(sdk_server, sdk_app)
    barrier = threading.Barrier(CONCURRENCY)
    tokens: list[str] = []
    errors: list[BaseException] = []

    def call() -> None:
        try:
            barrier.wait(timeout=10)
            tokens.append(auth.token())
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(CONCURRENCY)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not errors
    assert len(tokens) == CONCURRENCY
    assert len(set(tokens)) == 1
    assert auth.requests_made == 1


# Customer tokens


def test_customer_token_is_long_lived_and_cached(
    sdk_server: Server, sdk_app: AppCredentials
) -> None:
    auth = auth_for(sdk_server, sdk_app)
    first_customer = create_customer(sdk_server, auth)
    second_customer = create_customer(sdk_server, auth)
    assert auth.requests_made == 1  # the api token

    token = auth.customer_token(first_customer)
    claims = claims_of(token)
    assert claims["exp"] - time.time() >= 600
    assert claims["scope"] == f"customer.{first_customer}"
    assert claims["customers"] == [{"id": first_customer}]
    assert auth.requests_made == 2

    assert auth.customer_token(first_customer) == token
    assert auth.requests_made == 2

    other = auth.customer_token(second_customer)
    assert claims_of(other)["scope"] == f"customer.{second_customer}"
    assert auth.requests_made == 3
    assert auth.customer_token(first_customer) == token
    assert auth.customer_token(second_customer) == other
    auth.token()  # the api token is still cached beside them
    assert auth.requests_made == 3


def test_acustomer_token_is_long_lived_and_cached(
    sdk_server: Server, sdk_app: AppCredentials
) -> None:
    creator = auth_for(sdk_server, sdk_app)
    first_customer = create_customer(sdk_server, creator)
    second_customer = create_customer(sdk_server, creator)
    auth = auth_for(sdk_server, sdk_app)

    async def main() -> tuple[list[str], list[str], str]:
        firsts = await asyncio.gather(*(auth.acustomer_token(first_customer) for _ in range(10)))
        again = await asyncio.gather(*(auth.acustomer_token(first_customer) for _ in range(3)))
        other = await auth.acustomer_token(second_customer)
        return list(firsts), list(again), other

    firsts, again, other = asyncio.run(main())
    assert len(set(firsts + again)) == 1
    claims = claims_of(firsts[0])
    assert claims["exp"] - time.time() >= 600
    assert claims["scope"] == f"customer.{first_customer}"
    assert claims_of(other)["scope"] == f"customer.{second_customer}"
    assert auth.requests_made == 2


def test_customer_token_of_a_short_lived_app_has_ten_minutes_left(
    sdk_server: Server, short_app: AppCredentials
) -> None:
    """An app with 60 s tokens still gets customer tokens the LinkSDK accepts: at least ten
    minutes left when the SDK hands them out."""
    auth = auth_for(sdk_server, short_app)
    customer_id = create_customer(sdk_server, auth)
    token = auth.customer_token(customer_id)
    assert claims_of(token)["exp"] - time.time() >= 600


def test_customer_token_of_a_short_lived_app_is_cached(
    sdk_server: Server, short_app: AppCredentials
) -> None:
    auth = auth_for(sdk_server, short_app)
    customer_id = create_customer(sdk_server, auth)
    before = auth.requests_made
    token = auth.customer_token(customer_id)
    claims_of(token)
    again = auth.customer_token(customer_id)
    assert auth.requests_made == before + 1, "the second call fetched a new token"
    assert again == token


# Refusals


def test_a_401_refetches_the_token_once_and_retries(
    sdk_server: Server, sdk_app: AppCredentials
) -> None:
    auth = auth_for(sdk_server, sdk_app)
    with httpx.Client(auth=auth, timeout=10) as api:
        assert api.post(customers_url(sdk_server), json=new_user()).status_code == 201
        revoked = auth.token()
        revoke(sdk_server, sdk_app, revoked)
        assert auth.requests_made == 1
        response = api.post(customers_url(sdk_server), json=new_user())
        assert response.status_code == 201, response.text
        assert auth.requests_made == 2
        assert auth.token() != revoked
        assert api.post(customers_url(sdk_server), json=new_user()).status_code == 201
    assert auth.requests_made == 2


def test_a_401_refetches_the_token_once_and_retries_async(
    sdk_server: Server, sdk_app: AppCredentials
) -> None:
    auth = auth_for(sdk_server, sdk_app)

    async def main() -> tuple[int, int]:
        async with httpx.AsyncClient(auth=auth, timeout=10) as api:
            first = await api.post(customers_url(sdk_server), json=new_user())
            revoke(sdk_server, sdk_app, await auth.atoken())
            second = await api.post(customers_url(sdk_server), json=new_user())
            return first.status_code, second.status_code

    assert asyncio.run(main()) == (201, 201)
    assert auth.requests_made == 2


def test_an_api_that_keeps_refusing_is_retried_only_once(
    sdk_server: Server, sdk_app: AppCredentials
) -> None:
    auth = auth_for(sdk_server, sdk_app)
    with httpx.Client(auth=auth, timeout=10) as api:
        # The token endpoint itself answers 405 to GET: not a 401, so no refetch at all.
        assert api.get(sdk_server.token_url).status_code == 405
        assert auth.requests_made == 1
        # An endpoint that answers 401 whatever the token: one refetch, one retry, then 401.
        response = api.post(sdk_server.url + "/oauth2/introspect", data={"token": "x"})
        assert response.status_code == 401
    assert auth.requests_made == 2


def test_wrong_secret_raises_at_once(sdk_server: Server, sdk_app: AppCredentials) -> None:
    auth = ClientCredentials(sdk_app.client_id, "lsk_wrong", sdk_server.token_url)
    with httpx.Client(auth=auth, timeout=10) as api, pytest.raises(TokenRequestError) as info:
        api.post(customers_url(sdk_server), json=new_user())
    assert info.value.error == "invalid_client"
    assert info.value.status_code == 401
    assert auth.requests_made == 1
    with pytest.raises(TokenRequestError) as again:
        asyncio.run(auth.atoken())
    assert again.value.error == "invalid_client"
    assert auth.requests_made == 2


def test_unreachable_token_endpoint_raises() -> None:
    from conftest import free_port

    auth = ClientCredentials("id", "secret", f"http://127.0.0.1:{free_port()}/oauth2/token")
    with pytest.raises(TokenRequestError) as info:
        auth.token()
    assert info.value.status_code is None
    assert auth.requests_made == 1


# Retries against a fake token endpoint


@dataclass
class FakeTokenEndpoint:
    """Answers token requests from a script of (status, headers); the last one repeats."""

    url: str = ""
    script: list[tuple[int, dict[str, str]]] = field(default_factory=list)
    hits: list[float] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def answer(self) -> tuple[int, dict[str, str], bytes]:
        with self.lock:
            self.hits.append(time.monotonic())
            status, headers = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        if status == 200:
            token = f"fake.token.{uuid.uuid4().hex}"
            body = {"access_token": token, "token_type": "Bearer", "expires_in": 3600}
        else:
            error = "too_many_requests" if status == 429 else "temporarily_unavailable"
            body = {"error": error, "error_description": "Try later."}
        return status, {"Content-Type": "application/json", **headers}, json.dumps(body).encode()


@pytest.fixture
def fake() -> Iterator[FakeTokenEndpoint]:
    endpoint = FakeTokenEndpoint()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", "0")))
            status, headers, body = endpoint.answer()
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    endpoint.url = f"http://127.0.0.1:{httpd.server_address[1]}/oauth2/token"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield endpoint
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


def test_503_with_retry_after_is_retried_after_waiting(fake: FakeTokenEndpoint) -> None:
    fake.script = [(503, {"Retry-After": "1"}), (200, {})]
    auth = ClientCredentials("id", "secret", fake.url)
    started = time.monotonic()
    token = auth.token()
    elapsed = time.monotonic() - started
    assert token.startswith("fake.token.")
    assert auth.requests_made == 2
    assert len(fake.hits) == 2
    assert 0.9 <= fake.hits[1] - fake.hits[0] < 3
    assert elapsed < 5


def test_429_with_retry_after_is_retried_after_waiting_async(fake: FakeTokenEndpoint) -> None:
    fake.script = [(429, {"Retry-After": "1"}), (200, {})]
    auth = ClientCredentials("id", "secret", fake.url)
    token = asyncio.run(auth.atoken())
    assert token.startswith("fake.token.")
    assert auth.requests_made == 2
    assert 0.9 <= fake.hits[1] - fake.hits[0] < 3


@pytest.mark.parametrize("use_async", [False, True])
def test_retry_after_longer_than_max_wait_raises_at_once(
    fake: FakeTokenEndpoint, use_async: bool
) -> None:
    fake.script = [(429, {"Retry-After": "120"})]
    auth = ClientCredentials("id", "secret", fake.url)
    started = time.monotonic()
    fetch = (lambda: asyncio.run(auth.atoken())) if use_async else auth.token
    with pytest.raises(TokenRequestError) as info:
        fetch()
    assert time.monotonic() - started < 1
    assert info.value.status_code == 429
    assert info.value.error == "too_many_requests"
    assert auth.requests_made == 1
    assert len(fake.hits) == 1


def test_retries_are_bounded(fake: FakeTokenEndpoint) -> None:
    fake.script = [(503, {"Retry-After": "0"})]
    auth = ClientCredentials("id", "secret", fake.url, max_retries=3)
    with pytest.raises(TokenRequestError) as info:
        auth.token()
    assert info.value.status_code == 503
    assert info.value.error == "temporarily_unavailable"
    assert auth.requests_made == 4
    assert len(fake.hits) == 4


def test_retries_are_bounded_async(fake: FakeTokenEndpoint) -> None:
    fake.script = [(503, {"Retry-After": "0"})]
    auth = ClientCredentials("id", "secret", fake.url, max_retries=2)
    with pytest.raises(TokenRequestError) as info:
        asyncio.run(auth.atoken())
    assert info.value.status_code == 503
    assert auth.requests_made == 3
    assert len(fake.hits) == 3


def test_unreachable_token_endpoint_raises_async() -> None:
    from conftest import free_port

    auth = ClientCredentials("id", "secret", f"http://127.0.0.1:{free_port()}/oauth2/token")
    with pytest.raises(TokenRequestError) as info:
        asyncio.run(auth.atoken())
    assert info.value.status_code is None
    assert "unreachable" in str(info.value)
    assert auth.requests_made == 1


def test_other_errors_are_not_retried(fake: FakeTokenEndpoint) -> None:
    fake.script = [(500, {"Retry-After": "0"})]
    auth = ClientCredentials("id", "secret", fake.url)
    with pytest.raises(TokenRequestError) as info:
        auth.token()
    assert info.value.status_code == 500
    assert len(fake.hits) == 1
