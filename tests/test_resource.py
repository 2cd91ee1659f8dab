"""Protecting Starlette endpoints with leanauth tokens (leanauth.resource, RFC 6750): a
Starlette app served by uvicorn in a thread, verifying real tokens from a running server."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from conftest import (
    AppCredentials,
    Env,
    Server,
    create_app,
    free_port,
    request_token,
    start_server,
    wait_for,
    wait_until_known,
)
from leanauth.resource import BearerError, RequireToken, ServiceUnavailable, token_required
from leanauth.verify import Introspection, TokenVerifier, VerifiedToken

API_AUDIENCE = "urn:leanauth:api"
LINK_AUDIENCE = "urn:leanauth:link"
BARE_CHALLENGE = 'Bearer realm="leanauth"'


def verifier_for(server: Server, audience: str) -> TokenVerifier:
    return TokenVerifier(issuer=server.url, audience=audience, jwks_url=server.url + "/oauth2/jwks")


def resource_app(server: Server, customer_audience: str) -> Starlette:
    """An API with an api-token endpoint, a customer-token endpoint and a FastAPI-style one."""
    api = verifier_for(server, API_AUDIENCE)
    link = verifier_for(server, customer_audience)
    require_api = RequireToken(api, "api")

    @token_required(api, "api")
    async def accounts(request: Request) -> Response:
        token: VerifiedToken = request.state.token
        return JSONResponse({"accounts": ["acc-1"], "client_id": token.client_id})

    @token_required(link, "customer", customer_param="customer_id")
    async def customer_accounts(request: Request) -> Response:
        token: VerifiedToken = request.state.token
        return JSONResponse({"customer_id": token.customer_id, "accounts": ["acc-2"]})

    async def dependency_style(request: Request) -> Response:
        # As FastAPI runs a dependency: awaited with the request; a raised HTTPException
        # becomes the response (here by Starlette's own HTTPException handler).
        token = await require_api(request)
        return JSONResponse({"client_id": token.client_id})

    return Starlette(
        routes=[
            Route("/accounts", accounts),
            Route("/customers/{customer_id}/accounts", customer_accounts),
            Route("/dependency", dependency_style),
        ]
    )


@dataclass
class Resource:
    url: str
    server: Server
    app: AppCredentials
    customer_id: str

    def get(self, path: str, token: str | None = None, **kwargs: Any) -> httpx.Response:
        headers = kwargs.pop("headers", None)
        if headers is None and token is not None:
            headers = {"Authorization": f"Bearer {token}"}
        return httpx.get(self.url + path, headers=headers, timeout=10, **kwargs)

    def token(self, scope: str = "api") -> str:
        response = request_token(self.server, self.app, scope)
        assert response.status_code == 200, response.text
        return str(response.json()["access_token"])

    def customer_token(self) -> str:
        return self.token(f"customer.{self.customer_id}")


@contextlib.contextmanager
def serve_in_thread(app: Starlette) -> Iterator[str]:
    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="warning", lifespan="off", loop="asyncio"
    )
    uvicorn_server = uvicorn.Server(config)
    thread = threading.Thread(target=uvicorn_server.run, daemon=True)
    thread.start()
    wait_for(lambda: uvicorn_server.started, timeout=10)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        uvicorn_server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def resource(server: Server, app: AppCredentials, customer_id: str) -> Iterator[Resource]:
    """The default installation: api and customer tokens have different audiences."""
    with serve_in_thread(resource_app(server, LINK_AUDIENCE)) as url:
        yield Resource(url, server, app, customer_id)


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Resource]:
    """An installation whose customer tokens carry the api audience too, so that a good
    token of the wrong class reaches the class check."""
    env = Env(
        tmp_path_factory.mktemp("shared-audience"),
        extra={"LEANAUTH_CUSTOMER_AUDIENCE": API_AUDIENCE},
    )
    running = start_server(env)
    try:
        creds = create_app(env, "--name", "Shared", "--scopes", "api,customer")
        wait_until_known(running, creds)
        customer = env.cli("customers", "create", "--app", creds.client_id, "--app-user-id", "u")
        with serve_in_thread(resource_app(running, API_AUDIENCE)) as url:
            yield Resource(url, running, creds, str(customer["customer_id"]))
    finally:
        running.stop()


@pytest.fixture(scope="module")
def api_token(resource: Resource) -> str:
    return resource.token()


@pytest.fixture(scope="module")
def customer_token(resource: Resource) -> str:
    return resource.customer_token()


def challenge(response: httpx.Response) -> str:
    return response.headers.get("www-authenticate", "")


def assert_refused(response: httpx.Response, status: int, error: str | None) -> None:
    assert response.status_code == status, response.text
    assert challenge(response).startswith(BARE_CHALLENGE)
    if error is None:
        assert "error=" not in challenge(response)
    else:
        assert f'error="{error}"' in challenge(response)
        assert response.json()["error"] == error


# The decorator


def test_api_token_gets_the_api_endpoint(
    resource: Resource, api_token: str, app: AppCredentials
) -> None:
    response = resource.get("/accounts", api_token)
    assert response.status_code == 200
    assert response.json() == {"accounts": ["acc-1"], "client_id": app.client_id}


def test_customer_token_gets_its_customer(
    resource: Resource, customer_token: str, customer_id: str
) -> None:
    for path_id in (customer_id, customer_id.upper()):
        response = resource.get(f"/customers/{path_id}/accounts", customer_token)
        assert response.status_code == 200, response.text
        assert response.json() == {"customer_id": customer_id, "accounts": ["acc-2"]}


@pytest.mark.parametrize("path", ["/accounts", "/customers/x/accounts", "/dependency"])
def test_no_authorization_is_401_with_a_bare_challenge(resource: Resource, path: str) -> None:
    response = resource.get(path)
    assert_refused(response, 401, None)
    assert challenge(response) == BARE_CHALLENGE


@pytest.mark.parametrize(
    "token",
    ["x.y.z", "garbage", "eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0."],
    ids=["three-parts", "one-part", "alg-none"],
)
def test_bad_token_is_401_invalid_token(resource: Resource, token: str) -> None:
    assert_refused(resource.get("/accounts", token), 401, "invalid_token")


def test_tampered_real_token_is_401_invalid_token(resource: Resource, api_token: str) -> None:
    header, claims, signature = api_token.split(".")
    flipped = signature[:-2] + ("AA" if not signature.endswith("AA") else "BA")
    assert_refused(resource.get("/accounts", f"{header}.{claims}.{flipped}"), 401, "invalid_token")


def test_customer_token_for_another_customer_is_403(
    resource: Resource, customer_token: str
) -> None:
    other = str(uuid.uuid4())
    response = resource.get(f"/customers/{other}/accounts", customer_token)
    assert_refused(response, 403, "insufficient_scope")
    assert f'scope="customer.{other}"' in challenge(response)


def test_token_for_the_other_audience_is_401_invalid_token(
    resource: Resource, api_token: str, customer_token: str, customer_id: str
) -> None:
    # By default each class has its own audience: a token of the other class is not for
    # this verifier at all, so it is invalid here rather than of insufficient scope.
    response = resource.get(f"/customers/{customer_id}/accounts", api_token)
    assert_refused(response, 401, "invalid_token")
    assert_refused(resource.get("/accounts", customer_token), 401, "invalid_token")


def test_api_token_on_a_customer_endpoint_is_403_insufficient_scope(shared: Resource) -> None:
    response = shared.get(f"/customers/{shared.customer_id}/accounts", shared.token())
    assert_refused(response, 403, "insufficient_scope")
    assert 'scope="customer.' in challenge(response)


def test_customer_token_on_an_api_endpoint_is_403_insufficient_scope(shared: Resource) -> None:
    response = shared.get("/accounts", shared.customer_token())
    assert_refused(response, 403, "insufficient_scope")
    assert 'scope="api"' in challenge(response)


def test_shared_audience_right_tokens_still_pass(shared: Resource) -> None:
    assert shared.get("/accounts", shared.token()).status_code == 200
    path = f"/customers/{shared.customer_id}/accounts"
    assert shared.get(path, shared.customer_token()).status_code == 200


def test_two_authorization_headers_are_400_invalid_request(
    resource: Resource, api_token: str
) -> None:
    headers = [("Authorization", f"Bearer {api_token}")] * 2
    assert_refused(resource.get("/accounts", headers=headers), 400, "invalid_request")


@pytest.mark.parametrize(
    "authorization",
    ["Basic YXBwOnNlY3JldA==", "Token abc", "Bearerabc", "Digest x", "abc"],
)
def test_other_schemes_are_401_with_a_bare_challenge(
    resource: Resource, authorization: str
) -> None:
    response = resource.get("/accounts", headers={"Authorization": authorization})
    assert_refused(response, 401, None)


@pytest.mark.parametrize("authorization", ["Bearer", "Bearer a b", "Bearer x.y.z extra"])
def test_malformed_bearer_credentials_are_400_invalid_request(
    resource: Resource, authorization: str
) -> None:
    response = resource.get("/accounts", headers={"Authorization": authorization})
    assert_refused(response, 400, "invalid_request")


def test_bearer_scheme_is_case_insensitive(resource: Resource, api_token: str) -> None:
    for scheme in ("bearer", "BEARER"):
        response = resource.get("/accounts", headers={"Authorization": f"{scheme} {api_token}"})
        assert response.status_code == 200, response.text


def test_refusals_are_json(resource: Resource) -> None:
    response = resource.get("/accounts", "x.y.z")
    assert response.headers["content-type"].startswith("application/json")
    assert set(response.json()) == {"error", "error_description"}


# RequireToken as a dependency


def test_dependency_style_endpoint(resource: Resource, api_token: str) -> None:
    assert resource.get("/dependency", api_token).status_code == 200
    response = resource.get("/dependency", "x.y.z")
    assert response.status_code == 401
    assert 'error="invalid_token"' in challenge(response)


def http_request(
    authorization: list[str] | None = None, path_params: dict[str, str] | None = None
) -> Request:
    headers = [(b"authorization", value.encode()) for value in authorization or []]
    scope = {
        "type": "http",
        "method": "GET",
        "path": "/",
        "raw_path": b"/",
        "query_string": b"",
        "headers": headers,
        "path_params": path_params or {},
    }
    return Request(scope)


def call(requirement: RequireToken, request: Request) -> VerifiedToken:
    return asyncio.run(requirement(request))


def refusal(requirement: RequireToken, request: Request) -> BearerError:
    with pytest.raises(BearerError) as caught:
        call(requirement, request)
    return caught.value


def test_require_token_returns_the_verified_token(
    server: Server, api_token: str, app: AppCredentials
) -> None:
    token = call(
        RequireToken(verifier_for(server, API_AUDIENCE), "api"),
        http_request([f"Bearer {api_token}"]),
    )
    assert (token.client_id, token.scope, token.customer_id) == (app.client_id, "api", None)
    assert token.expires_at > time.time()


def test_require_token_customer(server: Server, customer_token: str, customer_id: str) -> None:
    requirement = RequireToken(
        verifier_for(server, LINK_AUDIENCE), "customer", customer_param="customer_id"
    )
    request = http_request([f"Bearer {customer_token}"], {"customer_id": customer_id})
    assert call(requirement, request).customer_id == customer_id
    other = http_request([f"Bearer {customer_token}"], {"customer_id": str(uuid.uuid4())})
    refused = refusal(requirement, other)
    assert (refused.status_code, refused.error) == (403, "insufficient_scope")


def test_require_token_refusals(server: Server, api_token: str) -> None:
    api = verifier_for(server, API_AUDIENCE)
    missing = refusal(RequireToken(api, "api"), http_request())
    assert (missing.status_code, missing.error) == (401, None)
    assert missing.headers == {"WWW-Authenticate": BARE_CHALLENGE}

    bad = refusal(RequireToken(api, "api"), http_request(["Bearer x.y.z"]))
    assert (bad.status_code, bad.error) == (401, "invalid_token")
    assert 'error="invalid_token"' in (bad.headers or {})["WWW-Authenticate"]

    two = refusal(RequireToken(api, "api"), http_request([f"Bearer {api_token}"] * 2))
    assert (two.status_code, two.error) == (400, "invalid_request")

    # A good token of the wrong class (this verifier accepts its audience).
    wrong_class = refusal(RequireToken(api, "customer"), http_request([f"Bearer {api_token}"]))
    assert (wrong_class.status_code, wrong_class.error) == (403, "insufficient_scope")
    assert "insufficient_scope" in (wrong_class.headers or {})["WWW-Authenticate"]


def test_require_token_any_class(server: Server, api_token: str) -> None:
    requirement = RequireToken(verifier_for(server, API_AUDIENCE), "any")
    assert call(requirement, http_request([f"Bearer {api_token}"])).scope == "api"


# Outages: 503 with Retry-After, not 401 (a client refetches its token on 401)


def guarded_app(verifier: TokenVerifier) -> Starlette:
    """/accounts guarded by token_required(), /dependency by RequireToken as FastAPI runs it."""
    require_api = RequireToken(verifier, "api")

    @token_required(verifier, "api")
    async def accounts(request: Request) -> Response:
        return JSONResponse({"client_id": request.state.token.client_id})

    async def dependency_style(request: Request) -> Response:
        token = await require_api(request)
        return JSONResponse({"client_id": token.client_id})

    return Starlette(routes=[Route("/accounts", accounts), Route("/dependency", dependency_style)])


@pytest.fixture(scope="module")
def nowhere() -> str:
    """A loopback address where nothing listens."""
    return f"http://127.0.0.1:{free_port()}"


def jwks_outage_verifier(server: Server, nowhere: str) -> TokenVerifier:
    return TokenVerifier(
        issuer=server.url, audience=API_AUDIENCE, jwks_url=nowhere + "/oauth2/jwks"
    )


@pytest.fixture(scope="module")
def jwks_outage(server: Server, nowhere: str) -> Iterator[str]:
    with serve_in_thread(guarded_app(jwks_outage_verifier(server, nowhere))) as url:
        yield url


def get(url: str, token: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    return httpx.get(url, headers=headers, timeout=10)


def assert_unavailable(response: httpx.Response, max_retry_after: int) -> None:
    assert response.status_code == 503, response.text
    assert 1 <= int(response.headers["retry-after"]) <= max_retry_after
    assert "www-authenticate" not in response.headers


def test_a_jwks_outage_is_503_with_retry_after(
    jwks_outage: str, api_token: str, caplog: pytest.LogCaptureFixture
) -> None:
    response = get(jwks_outage + "/accounts", api_token)
    assert_unavailable(response, 30)  # the JWKS is fetched again within 30 s
    assert response.json() == {
        "error": "temporarily_unavailable",
        "error_description": "The access token cannot be checked now; retry later.",
    }
    assert_unavailable(get(jwks_outage + "/dependency", api_token), 30)
    assert "JWKS unavailable" in caplog.text
    assert api_token not in caplog.text


@pytest.mark.parametrize("path", ["/accounts", "/dependency"])
def test_during_a_jwks_outage_the_rfc6750_answers_stand(
    jwks_outage: str, api_token: str, path: str
) -> None:
    assert_refused(get(jwks_outage + path), 401, None)
    for bad in ("x.y.z", "eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.", api_token + "="):
        assert get(jwks_outage + path, bad).status_code == 401
    assert_refused(get(jwks_outage + "/accounts", "x.y.z"), 401, "invalid_token")


def test_an_introspection_outage_is_503_with_retry_after(
    server: Server, nowhere: str, api_token: str
) -> None:
    verifier = TokenVerifier(
        issuer=server.url,
        audience=API_AUDIENCE,
        jwks_url=server.url + "/oauth2/jwks",
        introspection=Introspection(nowhere + "/oauth2/introspect", "app_rs", "lsk_unused"),
    )
    with serve_in_thread(guarded_app(verifier)) as url:
        assert_unavailable(get(url + "/accounts", api_token), 60)
        assert_unavailable(get(url + "/dependency", api_token), 60)
        assert_refused(get(url + "/accounts", "x.y.z"), 401, "invalid_token")


def test_require_token_raises_503_on_an_outage(
    server: Server, nowhere: str, api_token: str
) -> None:
    requirement = RequireToken(jwks_outage_verifier(server, nowhere), "api")
    with pytest.raises(ServiceUnavailable) as caught:
        call(requirement, http_request([f"Bearer {api_token}"]))
    assert caught.value.status_code == 503
    assert int((caught.value.headers or {})["Retry-After"]) >= 1
