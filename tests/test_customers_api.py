"""The Customers API (/customers/v1/) over HTTP against a real server: creating, reading and
listing customers with api and customer tokens, Lean-style errors, RFC 6750 refusals."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import (
    RELAXED_THROTTLE,
    AppCredentials,
    Env,
    Server,
    known_app,
    new_token,
    request_token,
    serving,
    start_server,
)

BASE = "/customers/v1/"
JSON = "application/json"
LEAN_ERROR_KEYS = {"status", "message", "timestamp"}
# This module waits for its apps with failing token requests; the throttle must not mind.


# Fixtures and helpers


@pytest.fixture(scope="module")
def api_env(tmp_path_factory: pytest.TempPathFactory) -> Env:
    return Env(tmp_path_factory.mktemp("customers-api"), dict(RELAXED_THROTTLE))


@pytest.fixture(scope="module")
def api_server(api_env: Env) -> Iterator[Server]:
    with serving(api_env) as running:
        yield running


@pytest.fixture(scope="module")
def owner(api_env: Env, api_server: Server) -> AppCredentials:
    return known_app(api_env, api_server, "--scopes", "api,customer")


@pytest.fixture(scope="module")
def other(api_env: Env, api_server: Server) -> AppCredentials:
    return known_app(api_env, api_server, "--scopes", "api,customer")


@pytest.fixture(scope="module")
def owner_token(api_server: Server, owner: AppCredentials) -> str:
    return new_token(api_server, owner)


@pytest.fixture(scope="module")
def other_token(api_server: Server, other: AppCredentials) -> str:
    return new_token(api_server, other)


@pytest.fixture
def http(api_server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=api_server.url, timeout=10) as client:
        yield client


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def create(
    http: httpx.Client, token: str, app_user_id: str | None = None, path: str = BASE
) -> httpx.Response:
    body = {"app_user_id": app_user_id or f"user-{uuid.uuid4()}"}
    return http.post(path, json=body, headers=bearer(token))


def created_id(http: httpx.Client, token: str, app_user_id: str | None = None) -> str:
    response = create(http, token, app_user_id)
    assert response.status_code == 201, response.text
    return str(response.json()["customer_id"])


@pytest.fixture(scope="module")
def customers(api_server: Server, owner_token: str) -> tuple[str, str]:
    """Two customers of the owner app."""
    with httpx.Client(base_url=api_server.url, timeout=10) as client:
        return created_id(client, owner_token), created_id(client, owner_token)


def assert_lean_error(
    response: httpx.Response, status_code: int, status: str, extra: frozenset[str] = frozenset()
) -> dict[str, Any]:
    assert response.status_code == status_code, response.text
    body = response.json()
    assert set(body) == LEAN_ERROR_KEYS | extra, body
    assert body["status"] == status
    assert isinstance(body["message"], str)
    assert body["message"]
    time.strptime(body["timestamp"], "%Y-%m-%dT%H:%M:%SZ")
    return dict(body)


def assert_bearer_refusal(response: httpx.Response, status_code: int, error: str) -> None:
    assert response.status_code == status_code, response.text
    challenge = response.headers["www-authenticate"]
    assert challenge.startswith("Bearer")
    assert f'error="{error}"' in challenge
    assert response.json()["error"] == error


# Creating customers


@pytest.mark.parametrize("path", ["/customers/v1/", "/customers/v1"])
def test_create_returns_the_customer(http: httpx.Client, owner_token: str, path: str) -> None:
    app_user_id = f"user-{uuid.uuid4()}"
    response = create(http, owner_token, app_user_id, path)
    assert response.status_code == 201, response.text
    body = response.json()
    assert set(body) == {"customer_id", "app_user_id"}
    assert str(uuid.UUID(body["customer_id"])) == body["customer_id"]
    assert body["app_user_id"] == app_user_id
    assert response.headers["cache-control"] == "no-store"


def test_new_customer_gets_a_customer_token_at_once(
    api_server: Server, http: httpx.Client, owner: AppCredentials, owner_token: str
) -> None:
    customer_id = created_id(http, owner_token)
    response = request_token(api_server, owner, f"customer.{customer_id}")
    assert response.status_code == 200, response.text
    assert response.json()["scope"] == f"customer.{customer_id}"


def test_duplicate_app_user_id_in_one_app_is_409(http: httpx.Client, owner_token: str) -> None:
    app_user_id = f"user-{uuid.uuid4()}"
    first = create(http, owner_token, app_user_id)
    assert first.status_code == 201
    response = create(http, owner_token, app_user_id)
    body = assert_lean_error(response, 409, "CUSTOMER_ALREADY_EXISTS", frozenset({"customer_id"}))
    # The existing customer, so that the app can carry on with it.
    assert body["customer_id"] == first.json()["customer_id"]


def test_same_app_user_id_in_another_app_is_201(
    http: httpx.Client, owner_token: str, other_token: str
) -> None:
    app_user_id = f"user-{uuid.uuid4()}"
    first = create(http, owner_token, app_user_id)
    second = create(http, other_token, app_user_id)
    assert first.status_code == 201, first.text
    assert second.status_code == 201, second.text
    assert first.json()["customer_id"] != second.json()["customer_id"]


@pytest.mark.parametrize("length", [1, 255])
def test_app_user_id_lengths_accepted(http: httpx.Client, owner_token: str, length: int) -> None:
    app_user_id = uuid.uuid4().hex[:length].ljust(length, "x")
    response = create(http, owner_token, app_user_id)
    assert response.status_code == 201, response.text
    assert response.json()["app_user_id"] == app_user_id


BAD_BODIES = {
    "not JSON": (b'{"app_user_id": ', JSON, "JSON"),
    "empty body": (b"", JSON, "JSON"),
    "JSON array": (b'["x"]', JSON, "app_user_id"),
    "JSON string": (b'"x"', JSON, "app_user_id"),
    "missing app_user_id": (b'{"user_id": "x"}', JSON, "app_user_id"),
    "empty app_user_id": (b'{"app_user_id": ""}', JSON, "app_user_id"),
    "256 characters": (json.dumps({"app_user_id": "a" * 256}).encode(), JSON, "app_user_id"),
    "a number": (b'{"app_user_id": 42}', JSON, "app_user_id"),
    "null": (b'{"app_user_id": null}', JSON, "app_user_id"),
    "text/plain": (b'{"app_user_id": "x"}', "text/plain", "JSON"),
    "form": (b"app_user_id=x", "application/x-www-form-urlencoded", "JSON"),
    "no content type": (b'{"app_user_id": "x"}', None, "JSON"),
    # PostgreSQL refuses a NUL in text (it used to answer 503); no control character belongs
    # in an id that backends store, log and show.
    "a NUL": (b'{"app_user_id": "a\\u0000b"}', JSON, "app_user_id"),
    "a newline": (b'{"app_user_id": "a\\nb"}', JSON, "app_user_id"),
    "an escape sequence": (b'{"app_user_id": "\\u001b[2J"}', JSON, "app_user_id"),
}


@pytest.mark.parametrize("case", list(BAD_BODIES))
def test_bad_bodies_are_400(http: httpx.Client, owner_token: str, case: str) -> None:
    content, content_type, mentions = BAD_BODIES[case]
    headers = bearer(owner_token)
    if content_type is not None:
        headers["Content-Type"] = content_type
    response = http.post(BASE, content=content, headers=headers)
    body = assert_lean_error(response, 400, "INVALID_PARAMETERS")
    assert mentions in body["message"]


def test_json_content_type_with_charset_is_accepted(http: httpx.Client, owner_token: str) -> None:
    headers = bearer(owner_token) | {"Content-Type": "application/json; charset=utf-8"}
    body = json.dumps({"app_user_id": f"user-{uuid.uuid4()}"}).encode()
    response = http.post(BASE, content=body, headers=headers)
    assert response.status_code == 201, response.text


def padded_body(size: int) -> bytes:
    base = {"app_user_id": f"user-{uuid.uuid4()}", "pad": ""}
    empty = len(json.dumps(base).encode())
    base["pad"] = "p" * (size - empty)
    body = json.dumps(base).encode()
    assert len(body) == size
    return body


def test_body_of_4_kib_is_accepted(http: httpx.Client, owner_token: str) -> None:
    headers = bearer(owner_token) | {"Content-Type": JSON}
    response = http.post(BASE, content=padded_body(4096), headers=headers)
    assert response.status_code == 201, response.text


def test_body_over_4_kib_is_413(http: httpx.Client, owner_token: str) -> None:
    headers = bearer(owner_token) | {"Content-Type": JSON}
    response = http.post(BASE, content=padded_body(4097), headers=headers)
    assert response.status_code == 413, response.text
    response = http.post(BASE, content=padded_body(64 * 1024), headers=headers)
    assert response.status_code == 413, response.text


def test_customer_token_cannot_create(
    api_server: Server, http: httpx.Client, owner: AppCredentials, customers: tuple[str, str]
) -> None:
    token = new_token(api_server, owner, f"customer.{customers[0]}")
    assert_bearer_refusal(create(http, token), 403, "insufficient_scope")


# Reading one customer


def test_owner_reads_its_customer(
    http: httpx.Client, owner_token: str, customers: tuple[str, str]
) -> None:
    response = http.get(BASE + customers[0], headers=bearer(owner_token))
    assert response.status_code == 200, response.text
    assert response.json()["customer_id"] == customers[0]
    assert set(response.json()) == {"customer_id", "app_user_id"}
    assert response.headers["cache-control"] == "no-store"


def test_customer_id_in_upper_case_is_found(
    http: httpx.Client, owner_token: str, customers: tuple[str, str]
) -> None:
    response = http.get(BASE + customers[0].upper(), headers=bearer(owner_token))
    assert response.status_code == 200, response.text
    assert response.json()["customer_id"] == customers[0]


def test_another_apps_customer_is_not_found(
    http: httpx.Client, other_token: str, owner_token: str, customers: tuple[str, str]
) -> None:
    foreign = http.get(BASE + customers[0], headers=bearer(other_token))
    missing = http.get(BASE + str(uuid.uuid4()), headers=bearer(owner_token))
    foreign_body = assert_lean_error(foreign, 404, "CUSTOMER_NOT_FOUND")
    missing_body = assert_lean_error(missing, 404, "CUSTOMER_NOT_FOUND")
    # Nothing tells a foreign customer from one that does not exist.
    assert foreign_body["message"] == missing_body["message"]


def test_customer_token_reads_its_own_customer(
    api_server: Server, http: httpx.Client, owner: AppCredentials, customers: tuple[str, str]
) -> None:
    token = new_token(api_server, owner, f"customer.{customers[0]}")
    response = http.get(BASE + customers[0], headers=bearer(token))
    assert response.status_code == 200, response.text
    assert response.json()["customer_id"] == customers[0]


def test_customer_token_of_another_customer_is_403(
    api_server: Server, http: httpx.Client, owner: AppCredentials, customers: tuple[str, str]
) -> None:
    token = new_token(api_server, owner, f"customer.{customers[1]}")
    response = http.get(BASE + customers[0], headers=bearer(token))
    assert_bearer_refusal(response, 403, "insufficient_scope")


def test_customer_token_of_another_app_is_refused(
    api_server: Server,
    http: httpx.Client,
    other: AppCredentials,
    other_token: str,
    customers: tuple[str, str],
) -> None:
    foreign_customer = created_id(http, other_token)
    token = new_token(api_server, other, f"customer.{foreign_customer}")
    response = http.get(BASE + customers[0], headers=bearer(token))
    assert response.status_code in (403, 404), response.text


@pytest.mark.parametrize("bad_id", ["not-a-uuid", "1234", "x" * 300])
def test_malformed_customer_id_is_404(http: httpx.Client, owner_token: str, bad_id: str) -> None:
    response = http.get(BASE + bad_id, headers=bearer(owner_token))
    assert_lean_error(response, 404, "CUSTOMER_NOT_FOUND")


# Listing customers


@pytest.fixture(scope="module")
def seven(api_env: Env, api_server: Server) -> tuple[str, list[str]]:
    """A fresh app's api token and its seven customers' ids, in creation order."""
    creds = known_app(api_env, api_server, "--scopes", "api,customer")
    token = new_token(api_server, creds)
    with httpx.Client(base_url=api_server.url, timeout=10) as client:
        ids = [created_id(client, token, f"seven-{n}") for n in range(7)]
    return token, ids


def walk(http: httpx.Client, token: str, size: int | None) -> list[dict[str, Any]]:
    """Every page of the listing, following ``next``."""
    pages: list[dict[str, Any]] = []
    params: dict[str, Any] = {} if size is None else {"size": size}
    while True:
        response = http.get(BASE, params=params, headers=bearer(token))
        assert response.status_code == 200, response.text
        assert response.headers["cache-control"] == "no-store"
        page = response.json()
        assert set(page) == {"data", "next"}
        pages.append(page)
        if page["next"] is None:
            return pages
        assert len(pages) < 20, "the listing does not end"
        params["after"] = page["next"]


@pytest.mark.parametrize("size", [1, 3, 6, 7, 8, 500, None])
def test_paging_visits_every_customer_once(
    http: httpx.Client, seven: tuple[str, list[str]], size: int | None
) -> None:
    token, ids = seven
    pages = walk(http, token, size)
    listed = [c["customer_id"] for page in pages for c in page["data"]]
    assert sorted(listed) == sorted(ids)
    step = size or 50
    assert [len(p["data"]) for p in pages] == [min(step, 7 - n) for n in range(0, 7, step)]
    assert pages[-1]["next"] is None
    for page in pages[:-1]:
        assert page["next"] == page["data"][-1]["customer_id"]


def test_paging_follows_creation_order(http: httpx.Client, seven: tuple[str, list[str]]) -> None:
    token, ids = seven
    pages = walk(http, token, 3)
    app_user_ids = [c["app_user_id"] for page in pages for c in page["data"]]
    assert app_user_ids == [f"seven-{n}" for n in range(7)]
    assert [c["customer_id"] for page in pages for c in page["data"]] == ids


def test_listing_shows_only_the_apps_customers(
    http: httpx.Client, owner_token: str, seven: tuple[str, list[str]]
) -> None:
    listed = [c["customer_id"] for p in walk(http, owner_token, 500) for c in p["data"]]
    assert not set(listed) & set(seven[1])


@pytest.mark.parametrize("params", ["size=0", "size=501", "size=abc", "size=-1", "after=nope"])
def test_bad_paging_parameters_are_400(http: httpx.Client, owner_token: str, params: str) -> None:
    response = http.get(f"{BASE}?{params}", headers=bearer(owner_token))
    assert_lean_error(response, 400, "INVALID_PARAMETERS")


def test_customer_token_cannot_list(
    api_server: Server, http: httpx.Client, owner: AppCredentials, customers: tuple[str, str]
) -> None:
    token = new_token(api_server, owner, f"customer.{customers[0]}")
    assert_bearer_refusal(http.get(BASE, headers=bearer(token)), 403, "insufficient_scope")


# Refused tokens (RFC 6750 §3)

ENDPOINTS = [("POST", BASE), ("GET", BASE), ("GET", BASE + "{id}")]


def send(
    http: httpx.Client, method: str, path: str, customer: str, headers: dict[str, str]
) -> httpx.Response:
    path = path.format(id=customer)
    if method == "POST":
        return http.post(path, json={"app_user_id": f"user-{uuid.uuid4()}"}, headers=headers)
    return http.get(path, headers=headers)


@pytest.mark.parametrize(("method", "path"), ENDPOINTS)
def test_no_token_is_401_with_bearer_challenge(
    http: httpx.Client, customers: tuple[str, str], method: str, path: str
) -> None:
    response = send(http, method, path, customers[0], {})
    assert response.status_code == 401, response.text
    challenge = response.headers["www-authenticate"]
    assert challenge.startswith("Bearer")
    # RFC 6750 §3.1: a request without credentials gets no error code in the challenge.
    assert "error=" not in challenge


@pytest.mark.parametrize(("method", "path"), ENDPOINTS)
@pytest.mark.parametrize("garbage", ["garbage", "a.b.c", "eyJhbGciOiJub25lIn0.e30."])
def test_garbage_token_is_401_invalid_token(
    http: httpx.Client, customers: tuple[str, str], method: str, path: str, garbage: str
) -> None:
    response = send(http, method, path, customers[0], bearer(garbage))
    assert_bearer_refusal(response, 401, "invalid_token")


def test_revoked_api_token_is_401(
    api_server: Server, http: httpx.Client, owner: AppCredentials, customers: tuple[str, str]
) -> None:
    token = new_token(api_server, owner)
    assert create(http, token).status_code == 201
    form = {"token": token, "client_id": owner.client_id, "client_secret": owner.client_secret}
    revoked = http.post("/oauth2/revoke", data=form)
    assert revoked.status_code == 200, revoked.text
    assert_bearer_refusal(create(http, token), 401, "invalid_token")
    refused = http.get(BASE + customers[0], headers=bearer(token))
    assert_bearer_refusal(refused, 401, "invalid_token")
    assert_bearer_refusal(http.get(BASE, headers=bearer(token)), 401, "invalid_token")


# A server without the Customers API


@pytest.fixture(scope="module")
def disabled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, str]]:
    data_dir: Path = tmp_path_factory.mktemp("customers-api-off")
    env = Env(data_dir, {**RELAXED_THROTTLE, "LEANAUTH_CUSTOMERS_API": "false"})
    running = start_server(env)
    try:
        creds = known_app(env, running, "--scopes", "api,customer")
        yield running, new_token(running, creds)
    finally:
        running.stop()


@pytest.mark.parametrize(("method", "path"), [*ENDPOINTS, ("POST", "/customers/v1")])
def test_disabled_customers_api_is_404(
    disabled: tuple[Server, str], method: str, path: str
) -> None:
    server, token = disabled
    with httpx.Client(base_url=server.url, timeout=10) as client:
        response = send(client, method, path, str(uuid.uuid4()), bearer(token))
    assert response.status_code == 404, response.text


def test_token_of_another_installation_is_401(
    disabled: tuple[Server, str], http: httpx.Client
) -> None:
    _, foreign_token = disabled
    assert_bearer_refusal(create(http, foreign_token), 401, "invalid_token")
