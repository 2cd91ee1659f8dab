"""The token endpoint of the real application, served in process: no server subprocess, no
sockets. The database is prepared once for the module as ``leanauth init`` does, the apps are
made with the registry functions the CLI uses, and the ASGI lifespan runs as under uvicorn.
Requests go through httpx's ASGI transport on one event loop kept for the module."""

from __future__ import annotations

import asyncio
import base64
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import jwt
import pytest

from leanauth import registry
from leanauth.app import LeanAuthApp, create_app
from leanauth.bootstrap import open_runtime
from leanauth.settings import Settings

TOKEN_URL = "/oauth2/token"
FORM = {"content-type": "application/x-www-form-urlencoded"}
UNIFORM_401 = {"error": "invalid_client", "error_description": "Client authentication failed."}
WWW_AUTHENTICATE = 'Basic realm="leanauth", charset="UTF-8"'


@dataclass
class Credentials:
    client_id: str
    client_secret: str


class Lifespan:
    """Runs an ASGI application's lifespan as a server does (startup, then shutdown)."""

    def __init__(self, asgi: Any) -> None:
        self._asgi = asgi
        self._to_app: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._from_app: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    async def startup(self) -> None:
        scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
        self._task = asyncio.create_task(self._asgi(scope, self._to_app.get, self._from_app.put))
        await self._to_app.put({"type": "lifespan.startup"})
        message = await self._from_app.get()
        assert message["type"] == "lifespan.startup.complete", message

    async def shutdown(self) -> None:
        await self._to_app.put({"type": "lifespan.shutdown"})
        message = await self._from_app.get()
        assert message["type"] == "lifespan.shutdown.complete", message
        assert self._task is not None
        await self._task


@dataclass
class Served:
    """The application in process, and what the module's tests need of it."""

    runner: asyncio.Runner
    client: httpx.AsyncClient
    asgi: LeanAuthApp
    settings: Settings
    both: Credentials  # an app allowed api and customer tokens
    api_only: Credentials
    disabled: Credentials
    other: Credentials  # another app allowed customer tokens
    customer_id: str  # a customer of ``both``

    def request(self, method: str, url: str = TOKEN_URL, **kwargs: Any) -> httpx.Response:
        return self.runner.run(self.client.request(method, url, **kwargs))

    def post(self, data: dict[str, str] | None = None, **kwargs: Any) -> httpx.Response:
        return self.request("POST", data=data, **kwargs)


def token_form(creds: Credentials, scope: str = "api", **changes: str) -> dict[str, str]:
    return {
        "grant_type": "client_credentials",
        "client_id": creds.client_id,
        "client_secret": creds.client_secret,
        "scope": scope,
        **changes,
    }


def basic(client_id: str, secret: str) -> dict[str, str]:
    encoded = base64.b64encode(f"{client_id}:{secret}".encode()).decode()
    return {"authorization": f"Basic {encoded}"}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    data_dir = tmp_path_factory.mktemp("inprocess")
    settings = Settings.from_env(
        {
            "LEANAUTH_DATABASE_URL": f"sqlite:///{data_dir / 'leanauth.db'}",
            "LEANAUTH_KEY_ENCRYPTION_KEY": os.urandom(32).hex(),
            "LEANAUTH_JOURNAL_DIR": str(data_dir / "journal"),
            "LEANAUTH_METRICS_DIR": str(data_dir / "metrics"),
            # This module's own refusals must not trip the brute-force throttle.
            "LEANAUTH_AUTH_FAILURE_LIMIT": "1000 per minute",
            "LEANAUTH_AUTH_FAILURE_ADDRESS_LIMIT": "10000 per minute",
        }
    )
    # What `leanauth init` and `leanauth apps create` do, in process.
    admin = open_runtime(settings, schema="upgrade", actor="unit-test")
    try:
        both = registry.create_app(admin, "Both scopes", frozenset({"api", "customer"}))
        api_only = registry.create_app(admin, "API only", frozenset({"api"}))
        disabled = registry.create_app(admin, "Disabled", frozenset({"api"}))
        registry.set_enabled(admin, disabled.app.client_id, False)
        other = registry.create_app(admin, "Other", frozenset({"customer"}))
        customer = registry.create_customer(admin, both.app.client_id, "user-1")
    finally:
        admin.store.close()
    # What a `leanauth serve` worker builds, started by its ASGI lifespan.
    asgi = create_app(settings)
    runner = asyncio.Runner()
    lifespan = Lifespan(asgi)
    runner.run(lifespan.startup())
    client = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=asgi), base_url="http://127.0.0.1:8000"
    )
    try:
        yield Served(
            runner,
            client,
            asgi,
            settings,
            Credentials(both.app.client_id, both.client_secret),
            Credentials(api_only.app.client_id, api_only.client_secret),
            Credentials(disabled.app.client_id, disabled.client_secret),
            Credentials(other.app.client_id, other.client_secret),
            customer.customer_id,
        )
    finally:
        runner.run(client.aclose())
        runner.run(lifespan.shutdown())
        runner.close()


def assert_error(
    response: httpx.Response, status: int, error: str, description: str | None = None
) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] == error, body
    if description is not None:
        assert body["error_description"] == description
    assert set(body) == {"error", "error_description"}
    assert_no_store(response)


def assert_no_store(response: httpx.Response) -> None:
    assert response.headers["content-type"] == "application/json"
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["pragma"] == "no-cache"
    assert response.headers["x-request-id"]


# Refusals before authentication


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PATCH"])
def test_other_methods_405(served: Served, method: str) -> None:
    response = served.request(method)
    assert_error(response, 405, "invalid_request", "The token endpoint accepts only POST.")
    assert response.headers["allow"] == "POST"


def test_secret_in_query_refused(served: Served) -> None:
    response = served.post(
        token_form(served.both), params={"client_secret": served.both.client_secret}
    )
    assert_error(
        response, 400, "invalid_request", "Client credentials must not be sent in the URL."
    )


@pytest.mark.parametrize(
    "content_type", ["application/json", "text/plain", "multipart/form-data; boundary=x"]
)
def test_wrong_content_type_refused(served: Served, content_type: str) -> None:
    response = served.post(
        content=b"grant_type=client_credentials", headers={"content-type": content_type}
    )
    assert_error(
        response, 400, "invalid_request", "The body must be application/x-www-form-urlencoded."
    )


def test_json_body_refused(served: Served) -> None:
    response = served.request("POST", json=token_form(served.both))
    assert_error(
        response, 400, "invalid_request", "The body must be application/x-www-form-urlencoded."
    )


@pytest.mark.parametrize("name", ["grant_type", "scope", "client_id", "client_secret"])
def test_repeated_parameter_refused(served: Served, name: str) -> None:
    form = token_form(served.both)
    body = "&".join(f"{k}={v}" for k, v in form.items()) + f"&{name}={form[name]}"
    response = served.post(content=body.encode(), headers=FORM)
    assert_error(response, 400, "invalid_request", f"The parameter {name} is repeated.")


def test_missing_grant_type_refused_before_authentication(served: Served) -> None:
    for form in (
        {k: v for k, v in token_form(served.both).items() if k != "grant_type"},
        token_form(served.both, grant_type=""),
        {"client_id": "nobody", "client_secret": "wrong"},
    ):
        response = served.post(form)
        assert_error(response, 400, "invalid_request", "The grant_type parameter is required.")


@pytest.mark.parametrize(
    "grant_type",
    [
        "password",
        "authorization_code",
        "refresh_token",
        "Client_Credentials",
        "client_credentials ",
    ],
)
def test_unsupported_grant_type_refused(served: Served, grant_type: str) -> None:
    response = served.post(token_form(served.both, grant_type=grant_type))
    assert_error(
        response,
        400,
        "unsupported_grant_type",
        "Only the client_credentials grant is supported.",
    )


def test_body_too_large_refused(served: Served) -> None:
    response = served.post(content=b"scope=" + b"a" * 20_000, headers=FORM)
    assert_error(response, 413, "invalid_request", "The request body is too large.")


def test_control_character_refused(served: Served) -> None:
    response = served.post(token_form(served.both, scope="api\n"))
    assert_error(
        response, 400, "invalid_request", "The parameter scope contains a control character."
    )


def test_both_authentication_methods_refused(served: Served) -> None:
    creds = served.both
    response = served.post(token_form(creds), headers=basic(creds.client_id, creds.client_secret))
    assert_error(
        response, 400, "invalid_request", "Use one client authentication method, not both."
    )


# Failed authentication: one uniform 401


def failed_authentications(served: Served) -> dict[str, httpx.Response]:
    both, disabled = served.both, served.disabled
    unknown = "00000000-0000-4000-8000-000000000000"
    return {
        "unknown client (post)": served.post(token_form(Credentials(unknown, both.client_secret))),
        "unknown client (basic)": served.post(
            {"grant_type": "client_credentials", "scope": "api"},
            headers=basic(unknown, both.client_secret),
        ),
        "wrong secret (post)": served.post(
            token_form(both, client_secret=served.api_only.client_secret)
        ),
        "wrong secret (basic)": served.post(
            {"grant_type": "client_credentials", "scope": "api"},
            headers=basic(both.client_id, both.client_secret + "x"),
        ),
        "no secret": served.post(token_form(both, client_secret="")),
        "no credentials": served.post({"grant_type": "client_credentials", "scope": "api"}),
        "bearer": served.post(
            {"grant_type": "client_credentials", "scope": "api"},
            headers={"authorization": "Bearer abc"},
        ),
        "malformed basic": served.post(
            {"grant_type": "client_credentials", "scope": "api"},
            headers={"authorization": "Basic !!!"},
        ),
        "disabled app": served.post(token_form(disabled)),
    }


def test_every_failed_authentication_is_the_same_401(served: Served) -> None:
    for case, response in failed_authentications(served).items():
        assert response.status_code == 401, case
        assert response.json() == UNIFORM_401, case
        assert response.headers["www-authenticate"] == WWW_AUTHENTICATE, case
        assert_no_store(response)


# Scopes


@pytest.mark.parametrize(
    ("scope", "description"),
    [
        (None, "The scope parameter is required: 'api' or 'customer.<customer_id>'."),
        ("openid", "Unknown scope; use 'api', 'customer.<customer_id>' or 'admin'."),
        ("api openid", "Request exactly one scope."),
        ("customer.12345", "The customer id must be a UUID."),
        ("customer.00000000-0000-4000-8000-000000000000", "Unknown customer for this app."),
    ],
)
def test_invalid_scope_refused(served: Served, scope: str | None, description: str) -> None:
    form = token_form(served.both)
    if scope is None:
        del form["scope"]
    else:
        form["scope"] = scope
    assert_error(served.post(form), 400, "invalid_scope", description)


def test_scope_class_not_allowed_for_the_app(served: Served) -> None:
    response = served.post(token_form(served.api_only, scope="customer." + served.customer_id))
    assert_error(response, 400, "invalid_scope", "This app may not request customer tokens.")


def test_another_apps_customer_is_an_unknown_one(served: Served) -> None:
    response = served.post(token_form(served.other, scope="customer." + served.customer_id))
    assert_error(response, 400, "invalid_scope", "Unknown customer for this app.")


# Tokens


def jwks_keys(served: Served) -> dict[str, Any]:
    response = served.request("GET", "/oauth2/jwks")
    assert response.status_code == 200
    return {key["kid"]: key for key in response.json()["keys"]}


def verified_claims(served: Served, token: str, audience: str) -> dict[str, Any]:
    header = jwt.get_unverified_header(token)
    assert header["typ"] == "at+jwt"
    jwk = jwks_keys(served)[header["kid"]]
    return dict(
        jwt.decode(
            token,
            jwt.PyJWK(jwk).key,
            algorithms=[jwk["alg"]],
            audience=audience,
            issuer=served.settings.issuer,
        )
    )


def test_api_token_issued(served: Served) -> None:
    response = served.post(token_form(served.both))
    assert response.status_code == 200, response.text
    assert_no_store(response)
    body = response.json()
    assert set(body) == {"access_token", "token_type", "expires_in", "scope"}
    assert (body["token_type"], body["expires_in"], body["scope"]) == ("Bearer", 3600, "api")
    claims = verified_claims(served, body["access_token"], served.settings.api_audience)
    assert claims["sub"] == claims["client_id"] == served.both.client_id
    assert claims["scope"] == "api"
    assert claims["exp"] - claims["iat"] == 3600


def test_api_token_with_basic_authentication(served: Served) -> None:
    creds = served.api_only
    response = served.post(
        {"grant_type": "client_credentials", "scope": "api", "client_id": creds.client_id},
        headers=basic(creds.client_id, creds.client_secret),
    )
    assert response.status_code == 200, response.text
    claims = verified_claims(served, response.json()["access_token"], served.settings.api_audience)
    assert claims["sub"] == creds.client_id


def test_customer_token_issued_with_the_canonical_scope(served: Served) -> None:
    creds = served.both
    response = served.post(
        {"grant_type": "client_credentials", "scope": "customer." + served.customer_id.upper()},
        headers=basic(creds.client_id, creds.client_secret),
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["scope"] == "customer." + served.customer_id
    claims = verified_claims(served, body["access_token"], served.settings.customer_audience)
    assert claims["customers"] == [{"id": served.customer_id}]
    assert claims["exp"] - claims["iat"] >= 600


def test_unknown_parameters_are_ignored(served: Served) -> None:
    body = "&".join(f"{k}={v}" for k, v in token_form(served.both).items())
    response = served.post(
        content=(body + "&foo=1&foo=2&audience=x").encode(),
        headers={"content-type": "Application/X-WWW-Form-Urlencoded; charset=UTF-8"},
    )
    assert response.status_code == 200, response.text
