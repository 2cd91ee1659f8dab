"""POST /oauth2/token over HTTP against a real server: RFC 6749 §2.3.1, §3.2, §4.4, §5.1, §5.2."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote_plus, urlencode

import httpx
import pytest

from conftest import (
    AppCredentials,
    Env,
    Server,
    create_app,
    request_token,
    wait_for,
    wait_until_known,
)

FORM = "application/x-www-form-urlencoded"
MAX_BODY = 16 * 1024
ERROR_KEYS = {"error", "error_description"}
INVALID_CLIENT_BODY = {
    "error": "invalid_client",
    "error_description": "Client authentication failed.",
}
UNSUPPORTED_GRANT_BODY = {
    "error": "unsupported_grant_type",
    "error_description": "Only the client_credentials grant is supported.",
}
TOO_LARGE_BODY = {"error": "invalid_request", "error_description": "The request body is too large."}
METHOD_BODY = {
    "error": "invalid_request",
    "error_description": "The token endpoint accepts only POST.",
}
# RFC 6749 §5.2: error_description is limited to %x20-21 / %x23-5B / %x5D-7E.
DESCRIPTION_CHARS = {chr(c) for c in range(0x20, 0x7F)} - {'"', "\\"}

Pairs = list[tuple[str, str]]


# Helpers


def assert_token_headers(response: httpx.Response) -> None:
    """RFC 6749 §5.1: every token-endpoint response is JSON and must not be cached."""
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["pragma"] == "no-cache"
    assert response.headers["content-type"] == "application/json"


def assert_error(response: httpx.Response, status: int, error: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert_token_headers(response)
    body: dict[str, Any] = response.json()
    assert set(body) == ERROR_KEYS, body
    assert body["error"] == error, body
    description = body["error_description"]
    assert isinstance(description, str)
    assert description
    assert set(description) <= DESCRIPTION_CHARS, description
    return body


def assert_token(response: httpx.Response, scope: str) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    assert_token_headers(response)
    body: dict[str, Any] = response.json()
    assert set(body) == {"access_token", "token_type", "expires_in", "scope"}, body
    assert body["token_type"] == "Bearer"
    assert isinstance(body["access_token"], str)
    assert body["access_token"].count(".") == 2
    assert type(body["expires_in"]) is int
    assert body["expires_in"] > 0
    assert body["scope"] == scope
    return body


def form(creds: AppCredentials, scope: str = "api", **extra: str | None) -> dict[str, str]:
    """A valid client_secret_post form; ``extra`` overrides members (None drops one)."""
    fields: dict[str, str | None] = {
        "grant_type": "client_credentials",
        "client_id": creds.client_id,
        "client_secret": creds.client_secret,
        "scope": scope,
        **extra,
    }
    return {name: value for name, value in fields.items() if value is not None}


def basic(client_id: str, client_secret: str) -> str:
    """RFC 6749 §2.3.1: each part form-urlencoded, joined with a colon, then Base64."""
    raw = f"{quote_plus(client_id)}:{quote_plus(client_secret)}"
    return "Basic " + base64.b64encode(raw.encode()).decode()


def basic_raw(decoded: bytes | str) -> str:
    """A Basic header over exactly these decoded bytes (no form-urlencoding)."""
    data = decoded.encode() if isinstance(decoded, str) else decoded
    return "Basic " + base64.b64encode(data).decode()


def post_raw(
    server: Server,
    body: bytes | str,
    *,
    content_type: str | None = FORM,
    headers: dict[str, str] | None = None,
    params: str = "",
) -> httpx.Response:
    all_headers = dict(headers or {})
    if content_type is not None:
        all_headers["content-type"] = content_type
    url = server.token_url + (f"?{params}" if params else "")
    content = body.encode() if isinstance(body, str) else body
    return httpx.post(url, content=content, headers=all_headers, timeout=10)


def post_form(
    server: Server, data: dict[str, str] | Pairs, headers: dict[str, str] | None = None
) -> httpx.Response:
    return post_raw(server, urlencode(data), headers=headers)


def wait_until_answering(server: Server, creds: AppCredentials, scope: str) -> None:
    """Wait until the server knows an app (for apps that may not request ``api``)."""
    wait_for(lambda: request_token(server, creds, scope).status_code != 401)


# Fixtures: more apps in the session database


@dataclass
class OtherApps:
    other: AppCredentials
    other_customer: str
    api_only: AppCredentials
    api_only_customer: str
    customer_only: AppCredentials
    customer_only_customer: str


def new_customer(env: Env, creds: AppCredentials, user: str) -> str:
    data = env.cli("customers", "create", "--app", creds.client_id, "--app-user-id", user)
    return str(data["customer_id"])


@pytest.fixture(scope="module")
def others(env: Env, server: Server, app: AppCredentials) -> OtherApps:
    other = create_app(env, "--name", "Other app", "--scopes", "api,customer")
    api_only = create_app(env, "--name", "API only", "--scopes", "api")
    customer_only = create_app(env, "--name", "Customer only", "--scopes", "customer")
    apps = OtherApps(
        other,
        new_customer(env, other, "other-user"),
        api_only,
        new_customer(env, api_only, "api-only-user"),
        customer_only,
        new_customer(env, customer_only, "customer-only-user"),
    )
    wait_until_known(server, other)
    wait_until_known(server, api_only)
    wait_until_answering(server, customer_only, f"customer.{apps.customer_only_customer}")
    return apps


@pytest.fixture(scope="module")
def invalid_client_reference(server: Server) -> httpx.Response:
    """The invalid_client answer to an unknown client: every other failure must match it."""
    unknown = AppCredentials(str(uuid.uuid4()), "lsk_" + "x" * 43, {})
    response = request_token(server, unknown)
    assert_error(response, 401, "invalid_client")
    assert response.json() == INVALID_CLIENT_BODY
    return response


def assert_same_invalid_client(response: httpx.Response, reference: httpx.Response) -> None:
    assert_error(response, 401, "invalid_client")
    assert response.headers["www-authenticate"].startswith("Basic")
    assert response.headers["www-authenticate"] == reference.headers["www-authenticate"]
    assert response.content == reference.content


# Success


def test_client_secret_post_issues_an_api_token(server: Server, app: AppCredentials) -> None:
    body = assert_token(post_form(server, form(app)), "api")
    assert body["expires_in"] == 3600
    assert "refresh_token" not in body


def test_customer_scope_issues_a_customer_token(
    server: Server, app: AppCredentials, customer_id: str
) -> None:
    scope = f"customer.{customer_id}"
    assert_token(post_form(server, form(app, scope)), scope)


def test_customer_scope_with_upper_case_uuid_is_granted_in_lower_case(
    server: Server, app: AppCredentials, customer_id: str
) -> None:
    response = post_form(server, form(app, f"customer.{customer_id.upper()}"))
    assert_token(response, f"customer.{customer_id.lower()}")


@pytest.mark.parametrize("scheme", ["Basic", "basic", "BASIC"])
def test_client_secret_basic_issues_a_token(
    server: Server, app: AppCredentials, scheme: str
) -> None:
    header = basic(app.client_id, app.client_secret).replace("Basic", scheme, 1)
    data = form(app, client_id=None, client_secret=None)
    assert_token(post_form(server, data, {"authorization": header}), "api")


def _encode_char(text: str, char: str) -> str:
    assert char in text
    return text.replace(char, f"%{ord(char):02X}")


def _encode_all(text: str) -> str:
    return "".join(f"%{ord(c):02X}" for c in text)


@pytest.mark.parametrize(
    ("encode_id", "encode_secret"),
    [
        pytest.param(lambda i: _encode_char(i, "-"), lambda s: s, id="hyphen-in-id"),
        pytest.param(lambda i: i, lambda s: _encode_char(s, "_"), id="underscore-in-secret"),
        pytest.param(
            lambda i: _encode_char(i, "-").lower(),
            lambda s: _encode_char(s, "_"),
            id="lower-case-hex-escapes",
        ),
        pytest.param(_encode_all, _encode_all, id="every-character"),
    ],
)
def test_client_secret_basic_parts_are_form_urldecoded(
    server: Server,
    app: AppCredentials,
    encode_id: Callable[[str], str],
    encode_secret: Callable[[str], str],
) -> None:
    client_id, secret = encode_id(app.client_id), encode_secret(app.client_secret)
    assert (client_id, secret) != (app.client_id, app.client_secret)
    header = basic_raw(f"{client_id}:{secret}")
    data = form(app, client_id=None, client_secret=None)
    assert_token(post_form(server, data, {"authorization": header}), "api")


def test_client_secret_basic_with_matching_client_id_in_body(
    server: Server, app: AppCredentials
) -> None:
    data = form(app, client_secret=None)
    headers = {"authorization": basic(app.client_id, app.client_secret)}
    assert_token(post_form(server, data, headers), "api")


@pytest.mark.parametrize(
    "content_type",
    [
        "application/x-www-form-urlencoded; charset=UTF-8",
        "application/x-www-form-urlencoded;charset=utf-8",
        "Application/X-WWW-Form-Urlencoded",
    ],
)
def test_form_content_type_with_parameters_or_other_case_is_accepted(
    server: Server, app: AppCredentials, content_type: str
) -> None:
    response = post_raw(server, urlencode(form(app)), content_type=content_type)
    assert_token(response, "api")


@pytest.mark.parametrize(
    "extra", [{"audience": "https://example.com"}, {"foo": "bar", "resource": "x"}]
)
def test_unknown_parameters_are_ignored(
    server: Server, app: AppCredentials, extra: dict[str, str]
) -> None:
    assert_token(post_form(server, {**form(app), **extra}), "api")


def test_body_of_exactly_16_kib_is_accepted(server: Server, app: AppCredentials) -> None:
    body = urlencode(form(app)) + "&pad="
    body += "a" * (MAX_BODY - len(body))
    assert len(body) == MAX_BODY
    assert_token(post_raw(server, body), "api")


# Client authentication methods


@pytest.mark.parametrize("body_secret", ["real", "wrong"])
def test_basic_and_post_authentication_together_are_refused(
    server: Server, app: AppCredentials, body_secret: str
) -> None:
    secret = app.client_secret if body_secret == "real" else "lsk_wrong"
    data = form(app, client_secret=secret)
    headers = {"authorization": basic(app.client_id, app.client_secret)}
    assert_error(post_form(server, data, headers), 400, "invalid_request")


def test_two_authorization_headers_are_invalid_request(server: Server, app: AppCredentials) -> None:
    header = basic(app.client_id, app.client_secret)
    headers = [("content-type", FORM), ("authorization", header), ("authorization", header)]
    body = urlencode(form(app, client_id=None, client_secret=None))
    response = httpx.post(server.token_url, content=body, headers=headers, timeout=10)
    assert_error(response, 400, "invalid_request")


# grant_type


@pytest.mark.parametrize("grant_type", [None, ""], ids=["missing", "empty"])
def test_missing_grant_type_is_invalid_request(
    server: Server, app: AppCredentials, grant_type: str | None
) -> None:
    data = form(app, grant_type=grant_type)
    assert_error(post_form(server, data), 400, "invalid_request")


@pytest.mark.parametrize(
    "grant_type",
    [
        "password",
        "authorization_code",
        "refresh_token",
        "CLIENT_CREDENTIALS",
        "Client_Credentials",
        "client_credentials ",
        " client_credentials",
        "client-credentials",
        "urn:ietf:params:oauth:grant-type:jwt-bearer",
    ],
)
def test_other_grant_types_are_unsupported(
    server: Server, app: AppCredentials, grant_type: str
) -> None:
    response = post_form(server, form(app, grant_type=grant_type))
    assert_error(response, 400, "unsupported_grant_type")
    assert response.json() == UNSUPPORTED_GRANT_BODY


# scope


@pytest.mark.parametrize(
    "scope",
    [
        pytest.param(None, id="missing"),
        pytest.param("", id="empty"),
        "apis",
        "API",
        "Api",
        "openid",
        "customer",
        "customer.",
        "customer.not-a-uuid",
        "customer.*",
        pytest.param(" api", id="leading-space"),
        pytest.param("api ", id="trailing-space"),
        pytest.param("api api", id="api-twice"),
        pytest.param("api,customer", id="comma-list"),
    ],
)
def test_invalid_scopes(server: Server, app: AppCredentials, scope: str | None) -> None:
    data = form(app)
    data.pop("scope")
    if scope is not None:
        data["scope"] = scope
    assert_error(post_form(server, data), 400, "invalid_scope")


@pytest.mark.parametrize(
    "make_scope",
    [
        pytest.param(lambda c: f"customer.{c.replace('-', '')}", id="uuid-without-hyphens"),
        pytest.param(lambda c: "customer.{" + c + "}", id="uuid-in-braces"),
        pytest.param(lambda c: f"customer.urn:uuid:{c}", id="urn-uuid"),
        pytest.param(lambda c: f"customer.{c[:8]}{c[9:13]}-{c[8]}{c[14:]}", id="moved-hyphen"),
        pytest.param(lambda c: f"customer. {c}", id="space-before-uuid"),
        pytest.param(lambda c: f"customer.{c} ", id="space-after-uuid"),
        pytest.param(lambda c: f"Customer.{c}", id="capital-prefix"),
        pytest.param(lambda c: f"customer:{c}", id="colon-separator"),
        pytest.param(lambda c: f"api customer.{c}", id="api-and-customer"),
        pytest.param(lambda c: f"customer.{c} api", id="customer-and-api"),
        pytest.param(lambda c: f"customer.{c} customer.{c}", id="customer-twice"),
    ],
)
def test_malformed_or_several_customer_scopes(
    server: Server, app: AppCredentials, customer_id: str, make_scope: Callable[[str], str]
) -> None:
    response = post_form(server, form(app, make_scope(customer_id)))
    assert_error(response, 400, "invalid_scope")


def test_nonexistent_customer_is_invalid_scope(server: Server, app: AppCredentials) -> None:
    response = post_form(server, form(app, f"customer.{uuid.uuid4()}"))
    assert_error(response, 400, "invalid_scope")


def test_customer_of_another_app_is_refused_like_an_unknown_one(
    server: Server, app: AppCredentials, others: OtherApps
) -> None:
    foreign = assert_error(
        post_form(server, form(app, f"customer.{others.other_customer}")), 400, "invalid_scope"
    )
    unknown = assert_error(
        post_form(server, form(app, f"customer.{uuid.uuid4()}")), 400, "invalid_scope"
    )
    assert foreign == unknown
    # The owner may use it.
    scope = f"customer.{others.other_customer}"
    assert_token(post_form(server, form(others.other, scope)), scope)


def test_customer_scope_for_an_api_only_app_is_invalid_scope(
    server: Server, others: OtherApps
) -> None:
    scope = f"customer.{others.api_only_customer}"
    assert_error(post_form(server, form(others.api_only, scope)), 400, "invalid_scope")
    assert_token(post_form(server, form(others.api_only, "api")), "api")


def test_api_scope_for_a_customer_only_app_is_invalid_scope(
    server: Server, others: OtherApps
) -> None:
    assert_error(post_form(server, form(others.customer_only, "api")), 400, "invalid_scope")
    scope = f"customer.{others.customer_only_customer}"
    assert_token(post_form(server, form(others.customer_only, scope)), scope)


# Bad credentials: one answer for every failure


def _unknown_id() -> str:
    return str(uuid.uuid4())


BadCredentials = Callable[[AppCredentials, OtherApps], tuple[dict[str, str], dict[str, str]]]


def _post(**overrides: str | None) -> BadCredentials:
    return lambda app, _: (form(app, **overrides), {})


def _basic(header: Callable[[AppCredentials], str]) -> BadCredentials:
    return lambda app, _: (
        form(app, client_id=None, client_secret=None),
        {"authorization": header(app)},
    )


BAD_CREDENTIALS: dict[str, BadCredentials] = {
    "post-unknown-client": lambda app, _: (form(app, client_id=_unknown_id()), {}),
    "post-wrong-secret": _post(client_secret="lsk_" + "A" * 43),
    "post-secret-with-extra-char": lambda app, _: (
        form(app, client_secret=app.client_secret + "x"),
        {},
    ),
    "post-secret-of-another-app": lambda app, o: (
        form(app, client_secret=o.other.client_secret),
        {},
    ),
    "post-client-id-in-upper-case": lambda app, _: (
        form(app, client_id=app.client_id.upper()),
        {},
    ),
    "post-missing-secret": _post(client_secret=None),
    "post-empty-secret": _post(client_secret=""),
    "post-missing-client-id": _post(client_id=None),
    "post-empty-client-id": _post(client_id=""),
    "no-credentials": _post(client_id=None, client_secret=None),
    "basic-unknown-client": _basic(lambda app: basic(_unknown_id(), app.client_secret)),
    "basic-wrong-secret": _basic(lambda app: basic(app.client_id, "lsk_wrong")),
    "basic-empty-secret": _basic(lambda app: basic_raw(f"{app.client_id}:")),
    "basic-empty-client-id": _basic(lambda app: basic_raw(f":{app.client_secret}")),
    "basic-no-colon": _basic(lambda app: basic_raw(app.client_id + app.client_secret)),
    "basic-not-base64": _basic(lambda _: "Basic !!!not*base64!!!"),
    "basic-bad-padding": _basic(lambda app: basic(app.client_id, app.client_secret)[:-2]),
    "basic-not-utf8": _basic(lambda _: basic_raw(b"\xff\xfe:\xff")),
    "basic-without-credentials": _basic(lambda _: "Basic"),
    "bearer-scheme": _basic(lambda _: "Bearer eyJhbGciOiJub25lIn0.e30."),
    "digest-scheme": _basic(lambda _: 'Digest username="x", realm="y"'),
    "bare-base64": _basic(
        lambda app: basic(app.client_id, app.client_secret).removeprefix("Basic ")
    ),
}


@pytest.mark.parametrize("case", list(BAD_CREDENTIALS.values()), ids=list(BAD_CREDENTIALS))
def test_bad_credentials_are_one_invalid_client(
    server: Server,
    app: AppCredentials,
    others: OtherApps,
    invalid_client_reference: httpx.Response,
    case: BadCredentials,
) -> None:
    data, headers = case(app, others)
    assert_same_invalid_client(post_form(server, data, headers), invalid_client_reference)


def test_disabled_app_is_invalid_client(
    env: Env, server: Server, invalid_client_reference: httpx.Response
) -> None:
    creds = create_app(env, "--name", "Soon disabled")
    wait_until_known(server, creds)
    env.cli("apps", "disable", creds.client_id)
    wait_for(lambda: request_token(server, creds).status_code == 401)
    assert_same_invalid_client(post_form(server, form(creds)), invalid_client_reference)
    headers = {"authorization": basic(creds.client_id, creds.client_secret)}
    data = form(creds, client_id=None, client_secret=None)
    assert_same_invalid_client(post_form(server, data, headers), invalid_client_reference)


# Malformed requests


@pytest.mark.parametrize("name", ["scope", "grant_type", "client_id", "client_secret"])
@pytest.mark.parametrize("same_value", [True, False], ids=["same-value", "other-value"])
def test_repeated_parameters_are_invalid_request(
    server: Server, app: AppCredentials, name: str, same_value: bool
) -> None:
    pairs: Pairs = list(form(app).items())
    value = dict(pairs)[name] if same_value else "other"
    pairs.append((name, value))
    assert_error(post_form(server, pairs), 400, "invalid_request")


@pytest.mark.parametrize("name", ["scope", "grant_type", "client_id", "client_secret"])
@pytest.mark.parametrize("char", ["\x00", "\t", "\n", "\r", "\x1b", "\x7f", "\x85", "\x9b"])
def test_control_characters_in_any_parameter_are_invalid_request(
    server: Server, app: AppCredentials, name: str, char: str
) -> None:
    """RFC 6749 Appendix A allows no control character in any of these; a NUL once stopped
    the audit trail on PostgreSQL, a newline forged log lines."""
    data = form(app)
    data[name] = data[name][:4] + char + data[name][4:]
    body = assert_error(post_form(server, data), 400, "invalid_request")
    assert char not in body["error_description"]


@pytest.mark.parametrize("char", ["%00", "%0A", "%1B"])
def test_control_characters_in_basic_credentials_are_invalid_request(
    server: Server, app: AppCredentials, char: str
) -> None:
    data = form(app)
    client_id, secret = data.pop("client_id"), data.pop("client_secret")
    for user, password in ((client_id + char, secret), (client_id, secret + char)):
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        response = post_form(server, data, {"Authorization": f"Basic {token}"})
        assert_error(response, 400, "invalid_request")


@pytest.mark.parametrize(
    "pairs",
    [
        pytest.param([("audience", "a"), ("audience", "b")], id="repeated"),
        pytest.param([("<script>alert(1)</script>", "x")] * 2, id="repeated-markup-name"),
        pytest.param([("x", "line\nbreak\x00"), ("x", "\x1b[2J")], id="control-characters"),
        pytest.param([("resource", "")] * 3, id="repeated-empty"),
    ],
)
def test_unknown_parameters_are_ignored_even_repeated(
    server: Server, app: AppCredentials, pairs: Pairs
) -> None:
    """RFC 6749 §3.1: unknown parameters MUST be ignored, repeated or not."""
    assert_token(post_form(server, [*form(app).items(), *pairs]), "api")


def test_unknown_parameters_are_ignored_whatever_their_bytes(
    server: Server, app: AppCredentials
) -> None:
    body = urlencode(form(app)) + "&%FF%FE=1&x=%FF&%00=%00&%ZZ=%ZZ"
    assert_token(post_raw(server, body), "api")


def test_errors_never_echo_request_text(server: Server, app: AppCredentials) -> None:
    marker = "<script>leanauth-echo</script>"
    requests: list[Pairs] = [
        [*form(app).items(), ("scope", marker)],
        [*form(app, marker).items()],
        [*form(app).items(), (marker, "1"), (marker, "2"), ("grant_type", marker)],
        [("grant_type", marker)],
        [*{**form(app), "client_id": marker}.items()],
    ]
    for pairs in requests:
        response = post_form(server, pairs)
        assert response.status_code >= 400, response.text
        assert "leanauth-echo" not in response.text, response.text


@pytest.mark.parametrize(
    "make_query",
    [
        pytest.param(lambda app: f"client_secret={quote_plus(app.client_secret)}", id="real"),
        pytest.param(lambda _: "client_secret=lsk_x", id="other"),
        pytest.param(lambda _: "a=1&client_secret=lsk_x", id="after-another"),
        pytest.param(lambda _: "client%5Fsecret=lsk_x", id="percent-encoded-name"),
    ],
)
def test_client_secret_in_query_string_is_invalid_request(
    server: Server, app: AppCredentials, make_query: Callable[[AppCredentials], str]
) -> None:
    response = post_raw(server, urlencode(form(app)), params=make_query(app))
    assert_error(response, 400, "invalid_request")


def test_client_secret_only_in_query_string_is_invalid_request(
    server: Server, app: AppCredentials
) -> None:
    body = urlencode(form(app, client_secret=None))
    params = urlencode({"client_secret": app.client_secret})
    assert_error(post_raw(server, body, params=params), 400, "invalid_request")


@pytest.mark.parametrize(
    ("content_type", "as_json"),
    [
        ("application/json", True),
        ("application/json", False),
        ("text/plain", False),
        (None, False),
        ("", False),
        ("application/x-www-form-urlencoded-extra", False),
        ("application/xml", False),
    ],
)
def test_other_content_types_are_invalid_request(
    server: Server, app: AppCredentials, content_type: str | None, as_json: bool
) -> None:
    body = json.dumps(form(app)) if as_json else urlencode(form(app))
    response = post_raw(server, body, content_type=content_type)
    assert_error(response, 400, "invalid_request")


def test_multipart_form_is_invalid_request(server: Server, app: AppCredentials) -> None:
    files = {name: (None, value) for name, value in form(app).items()}
    response = httpx.post(server.token_url, files=files, timeout=10)
    assert response.request.headers["content-type"].startswith("multipart/form-data")
    assert_error(response, 400, "invalid_request")


def test_body_over_16_kib_with_content_length_is_413(server: Server, app: AppCredentials) -> None:
    body = urlencode(form(app)) + "&pad="
    body += "a" * (MAX_BODY + 1 - len(body))
    assert len(body) == MAX_BODY + 1
    response = post_raw(server, body)
    assert "content-length" in response.request.headers
    assert_error(response, 413, "invalid_request")
    assert response.json() == TOO_LARGE_BODY


@pytest.mark.parametrize("total", [MAX_BODY + 1, 4 * MAX_BODY])
def test_body_over_16_kib_chunked_is_413(server: Server, app: AppCredentials, total: int) -> None:
    head = (urlencode(form(app)) + "&pad=").encode()

    def chunks() -> Iterator[bytes]:
        yield head
        remaining = total - len(head)
        while remaining > 0:
            size = min(1000, remaining)
            yield b"a" * size
            remaining -= size

    response = httpx.post(
        server.token_url, content=chunks(), headers={"content-type": FORM}, timeout=10
    )
    assert response.request.headers["transfer-encoding"] == "chunked"
    assert "content-length" not in response.request.headers
    assert_error(response, 413, "invalid_request")
    assert response.json() == TOO_LARGE_BODY


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PATCH", "OPTIONS"])
def test_other_methods_are_405(server: Server, app: AppCredentials, method: str) -> None:
    content = urlencode(form(app)) if method in ("PUT", "PATCH") else None
    headers = {"content-type": FORM} if content else {}
    response = httpx.request(method, server.token_url, content=content, headers=headers)
    assert_error(response, 405, "invalid_request")
    assert response.headers["allow"] == "POST"
    assert response.json() == METHOD_BODY


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"scope=%FF", id="percent-ff-value"),
        pytest.param(b"scope=%C3%28", id="percent-bad-sequence"),
        pytest.param(b"scope=%ED%A0%80", id="percent-surrogate"),
        pytest.param(b"scope=\xff", id="raw-ff"),
        pytest.param(b"scope=api\xc3", id="raw-truncated"),
    ],
)
def test_invalid_utf8_is_invalid_request(server: Server, app: AppCredentials, body: bytes) -> None:
    data = form(app)
    data.pop("scope", None)
    full = urlencode(data).encode() + b"&" + body
    assert_error(post_raw(server, full), 400, "invalid_request")


def test_empty_body_is_invalid_request(server: Server) -> None:
    assert_error(post_raw(server, b""), 400, "invalid_request")
