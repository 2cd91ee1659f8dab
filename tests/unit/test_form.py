"""Reading an OAuth form POST (leanauth.endpoints.form): form parsing, the media type,
credentials in the query, reading the body, and the checks run in order by read_form."""

from __future__ import annotations

from typing import Any

import pytest

from leanauth.endpoints.form import (
    MAX_BODY_BYTES,
    MAX_FIELDS,
    FormRequest,
    parse_form,
    read_body,
    read_form,
    reject_other_methods,
    reject_secret_in_query,
    require_form_body,
)
from leanauth.errors import InvalidRequest, MethodNotAllowed, PayloadTooLarge

from ._helpers import run_without_suspending

KNOWN = frozenset({"grant_type", "scope", "client_id", "client_secret"})


def refusal(body: bytes) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as caught:
        parse_form(body, KNOWN)
    assert type(caught.value) is InvalidRequest
    assert caught.value.error == "invalid_request"
    assert caught.value.status_code == 400
    return caught.value


# parse_form: what is accepted


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        pytest.param(
            b"grant_type=client_credentials&scope=api",
            {"grant_type": "client_credentials", "scope": "api"},
            id="plain",
        ),
        pytest.param(b"", {}, id="empty-body"),
        pytest.param(b"scope=", {}, id="empty-value-is-omitted"),
        pytest.param(b"scope", {}, id="no-equals-sign-is-omitted"),
        pytest.param(b"scope=&client_id=abc", {"client_id": "abc"}, id="empty-beside-other"),
        pytest.param(b"scope=a+b", {"scope": "a b"}, id="plus-is-space"),
        pytest.param(b"scope=a%20b", {"scope": "a b"}, id="percent-20-is-space"),
        pytest.param(b"scope=a%2Bb", {"scope": "a+b"}, id="escaped-plus-is-plus"),
        pytest.param(b"scope=a%2bb", {"scope": "a+b"}, id="lower-case-escape"),
        pytest.param(b"client_secret=a=b", {"client_secret": "a=b"}, id="equals-in-value"),
        pytest.param(b"scope=api;grant_type=x", {"scope": "api;grant_type=x"}, id="no-semicolons"),
        pytest.param(b"&&scope=api&", {"scope": "api"}, id="empty-pairs"),
        pytest.param(b"scope=&scope=api", {"scope": "api"}, id="empty-then-value-not-a-repeat"),
        pytest.param(b"scope=api&scope=", {"scope": "api"}, id="value-then-empty-not-a-repeat"),
        pytest.param(b"scope=&scope=", {}, id="two-empties-are-omitted"),
        pytest.param(b"foo=1&scope=api", {"scope": "api"}, id="unknown-ignored"),
        pytest.param(b"foo=1&foo=2&scope=api", {"scope": "api"}, id="unknown-repeated-ignored"),
        pytest.param(b"foo=%00&scope=api", {"scope": "api"}, id="unknown-with-escaped-control"),
        pytest.param(b"foo=\x00&scope=api", {"scope": "api"}, id="unknown-with-raw-control"),
        pytest.param(b"foo=%ff&scope=api", {"scope": "api"}, id="unknown-with-bad-utf8-value"),
        pytest.param(b"%ff=1&scope=api", {"scope": "api"}, id="non-utf8-name-ignored"),
        pytest.param(b"%ff%fe=1&%ff%fe=2", {}, id="non-utf8-name-repeated-ignored"),
        pytest.param(b"grant%5Ftype=x", {"grant_type": "x"}, id="escaped-known-name"),
        pytest.param(b"Scope=api", {}, id="names-are-case-sensitive"),
        pytest.param(
            b"scope=customer.%C3%A9", {"scope": "customer.\u00e9"}, id="escaped-utf8-value"
        ),
        pytest.param("scope=\u00e9".encode(), {"scope": "\u00e9"}, id="raw-utf8-value"),
        pytest.param(
            "&".join([*(f"x{i}=1" for i in range(MAX_FIELDS - 1)), "scope=api"]).encode(),
            {"scope": "api"},
            id="as-many-fields-as-allowed",
        ),
    ],
)
def test_parse_form_accepts(body: bytes, expected: dict[str, str]) -> None:
    assert parse_form(body, KNOWN) == expected


# parse_form: what is refused, and the exact reason given


@pytest.mark.parametrize(
    ("body", "description"),
    [
        pytest.param(b"scope=api&scope=api", "The parameter scope is repeated.", id="same"),
        pytest.param(b"scope=api&scope=openid", "The parameter scope is repeated.", id="differ"),
        pytest.param(
            b"client_id=a&grant_type=x&client_id=a",
            "The parameter client_id is repeated.",
            id="apart",
        ),
        pytest.param(
            b"grant_type=x&grant%5Ftype=x",
            "The parameter grant_type is repeated.",
            id="escaped-name-repeats",
        ),
        pytest.param(
            b"scope=a+b&scope=a%20b", "The parameter scope is repeated.", id="both-escaped"
        ),
        # RFC 6749 §3.2 also says a parameter without a value counts as omitted; an empty
        # occurrence next to a filled one is still refused as a repetition (pinned here).
    ],
)
def test_parse_form_refuses_repeated_parameters(body: bytes, description: str) -> None:
    assert refusal(body).description == description


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"scope=api%00", id="escaped-nul"),
        pytest.param(b"scope=api%0A", id="escaped-lf"),
        pytest.param(b"scope=api%0d", id="escaped-cr"),
        pytest.param(b"scope=api%09", id="escaped-tab"),
        pytest.param(b"scope=api%1B", id="escaped-esc"),
        pytest.param(b"scope=api%7F", id="escaped-del"),
        pytest.param(b"scope=api%C2%85", id="escaped-c1-nel"),
        pytest.param(b"scope=api%C2%9B", id="escaped-c1-csi"),
        pytest.param(b"scope=a\x00b", id="raw-nul"),
        pytest.param(b"scope=a\nb", id="raw-lf"),
        pytest.param(b"scope=a\tb", id="raw-tab"),
        pytest.param(b"scope=a\x7f", id="raw-del"),
        pytest.param("scope=a\u0085b".encode(), id="raw-c1"),
        pytest.param(b"client_id=ok&scope=a\x01b", id="raw-in-second-pair"),
        pytest.param(b"foo=%25&scope=a\x01b", id="raw-beside-an-escape-elsewhere"),
        pytest.param(b"scope=a+%0A", id="escape-with-plus"),
    ],
)
def test_parse_form_refuses_control_characters(body: bytes) -> None:
    assert refusal(body).description == "The parameter scope contains a control character."


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"scope=%ff", id="lone-ff"),
        pytest.param(b"scope=%C3", id="truncated-sequence"),
        pytest.param(b"scope=%C0%AF", id="overlong"),
        pytest.param(b"scope=%ED%A0%80", id="surrogate"),
        pytest.param(b"scope=api&client_id=%80abc", id="continuation-byte"),
    ],
)
def test_parse_form_refuses_escaped_invalid_utf8(body: bytes) -> None:
    name = body.rsplit(b"&", 1)[-1].split(b"=", 1)[0].decode()
    assert refusal(body).description == f"The parameter {name} is not valid UTF-8."


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"scope=\xff", id="raw-ff"),
        pytest.param(b"foo=\xc3&scope=api", id="raw-in-unknown-parameter"),
    ],
)
def test_parse_form_refuses_a_body_that_is_not_utf8(body: bytes) -> None:
    assert refusal(body).description == "The body is not a valid UTF-8 form."


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"&" * MAX_FIELDS, id="ampersands-only"),
        pytest.param("&".join(f"x{i}=1" for i in range(MAX_FIELDS + 1)).encode(), id="fields"),
    ],
)
def test_parse_form_refuses_too_many_fields(body: bytes) -> None:
    assert refusal(body).description == f"Too many parameters (at most {MAX_FIELDS})."


def test_unknown_names_never_cause_an_error() -> None:
    """Whatever an unknown parameter holds (bad UTF-8, controls, repeats), it is ignored: an
    error only ever names one of the known parameters, never request text."""
    assert parse_form(b"evil%0Aname=%ff&evil%0Aname=\x01&evil%0Aname=", KNOWN) == {}


# require_form_body


@pytest.mark.parametrize(
    "content_type",
    [
        b"application/x-www-form-urlencoded",
        b"Application/X-WWW-Form-URLEncoded",
        b"APPLICATION/X-WWW-FORM-URLENCODED",
        b"application/x-www-form-urlencoded; charset=UTF-8",
        b"application/x-www-form-urlencoded;charset=utf-8",
        b"  application/x-www-form-urlencoded  ;  charset=utf-8",
    ],
)
def test_form_media_types_accepted(content_type: bytes) -> None:
    require_form_body(content_type)


@pytest.mark.parametrize(
    "content_type",
    [
        None,
        b"",
        b"application/json",
        b"text/plain",
        b"multipart/form-data; boundary=x",
        b"application/x-www-form-urlencodedx",
        b"application/x-www-form-urlencoded, text/plain",
        b"application/x-www-form",
        b"x-www-form-urlencoded",
    ],
)
def test_other_media_types_refused(content_type: bytes | None) -> None:
    with pytest.raises(InvalidRequest) as caught:
        require_form_body(content_type)
    assert caught.value.description == "The body must be application/x-www-form-urlencoded."
    assert caught.value.status_code == 400


# reject_secret_in_query and reject_other_methods


@pytest.mark.parametrize(
    "query",
    [
        b"client_secret=x",
        b"client_secret=",
        b"client_secret",
        b"a=1&client_secret=x",
        b"client%5Fsecret=x",
        b"client_id=a&client_secret=b",
    ],
)
def test_secret_in_query_refused(query: bytes) -> None:
    with pytest.raises(InvalidRequest) as caught:
        reject_secret_in_query({"query_string": query})
    assert caught.value.description == "Client credentials must not be sent in the URL."


@pytest.mark.parametrize(
    "query",
    [
        b"",
        b"client_id=abc",
        b"foo=client_secret",
        b"client_secret_x=1",
        b"xclient_secret=1",
        b"client+secret=1",
    ],
)
def test_query_without_secret_passes(query: bytes) -> None:
    reject_secret_in_query({"query_string": query})


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH", "post"])
def test_methods_other_than_post_refused(method: str) -> None:
    with pytest.raises(MethodNotAllowed) as caught:
        reject_other_methods({"method": method})
    assert caught.value.status_code == 405
    assert caught.value.extra_headers_list() == [(b"allow", b"POST")]


def test_post_passes() -> None:
    reject_other_methods({"method": "POST"})


# read_body, driven by a fake ``receive``


class FakeReceive:
    """An ASGI ``receive`` that hands out the given messages, counting the calls."""

    def __init__(self, *messages: dict[str, Any]) -> None:
        self._messages = list(messages)
        self.calls = 0

    async def __call__(self) -> dict[str, Any]:
        self.calls += 1
        return self._messages.pop(0)


def chunk(body: bytes, more: bool = False) -> dict[str, Any]:
    return {"type": "http.request", "body": body, "more_body": more}


DISCONNECT = {"type": "http.disconnect"}


@pytest.mark.parametrize(
    ("content_length", "messages", "expected"),
    [
        pytest.param(b"3", [chunk(b"a=b")], b"a=b", id="one-chunk"),
        pytest.param(None, [chunk(b"a="), chunk(b"b", more=False)], b"a=", id="stops-at-last"),
        pytest.param(
            None,
            [chunk(b"a=", more=True), chunk(b"1&", more=True), chunk(b"b=2")],
            b"a=1&b=2",
            id="several-chunks",
        ),
        pytest.param(b"0", [{"type": "http.request"}], b"", id="no-body-key"),
        pytest.param(
            str(MAX_BODY_BYTES).encode(),
            [chunk(b"x" * MAX_BODY_BYTES)],
            b"x" * MAX_BODY_BYTES,
            id="exactly-the-cap",
        ),
        pytest.param(
            None,
            [chunk(b"x" * (MAX_BODY_BYTES - 1), more=True), chunk(b"y")],
            b"x" * (MAX_BODY_BYTES - 1) + b"y",
            id="chunked-exactly-the-cap",
        ),
        pytest.param(b" 3 ", [chunk(b"a=b")], b"a=b", id="length-with-spaces"),
    ],
)
def test_read_body(
    content_length: bytes | None, messages: list[dict[str, Any]], expected: bytes
) -> None:
    assert run_without_suspending(read_body(FakeReceive(*messages), content_length)) == expected


@pytest.mark.parametrize(
    "content_length", [str(MAX_BODY_BYTES + 1).encode(), b"99999999999999999999"]
)
def test_declared_length_over_the_cap_refused_before_reading(content_length: bytes) -> None:
    receive = FakeReceive(chunk(b"a=b"))
    with pytest.raises(PayloadTooLarge) as caught:
        run_without_suspending(read_body(receive, content_length))
    assert caught.value.status_code == 413
    assert caught.value.error == "invalid_request"
    assert caught.value.description == "The request body is too large."
    assert receive.calls == 0


@pytest.mark.parametrize(
    ("content_length", "messages", "calls"),
    [
        pytest.param(None, [chunk(b"x" * (MAX_BODY_BYTES + 1))], 1, id="one-big-chunk"),
        pytest.param(
            None,
            [chunk(b"x" * 10_000, more=True), chunk(b"x" * 10_000, more=True), chunk(b"")],
            2,
            id="chunked-over-the-cap",
        ),
        pytest.param(
            b"10", [chunk(b"x" * (MAX_BODY_BYTES + 1))], 1, id="more-than-the-declared-length"
        ),
    ],
)
def test_body_over_the_cap_refused_as_it_arrives(
    content_length: bytes | None, messages: list[dict[str, Any]], calls: int
) -> None:
    receive = FakeReceive(*messages)
    with pytest.raises(PayloadTooLarge):
        run_without_suspending(read_body(receive, content_length))
    assert receive.calls == calls


@pytest.mark.parametrize(
    "content_length", [b"abc", b"", b"1.5", b"0x10", b"\xff", b"-5", b"1_0", b"+3"]
)
def test_bad_content_length_refused(content_length: bytes) -> None:
    receive = FakeReceive(chunk(b"a=b"))
    with pytest.raises(InvalidRequest) as caught:
        run_without_suspending(read_body(receive, content_length))
    assert type(caught.value) is InvalidRequest
    assert caught.value.description == "Bad Content-Length."
    assert receive.calls == 0


@pytest.mark.parametrize(
    "messages",
    [
        pytest.param([DISCONNECT], id="at-once"),
        pytest.param([chunk(b"a=", more=True), DISCONNECT], id="midway"),
    ],
)
def test_client_disconnect_refused(messages: list[dict[str, Any]]) -> None:
    with pytest.raises(InvalidRequest) as caught:
        run_without_suspending(read_body(FakeReceive(*messages), None))
    assert caught.value.description == "The client went away."


# read_form: the checks in order


FORM = b"application/x-www-form-urlencoded"
TOKEN_PARAMETERS = frozenset({"grant_type", "scope", "client_id", "client_secret"})


def request(
    method: str = "POST",
    query: bytes = b"",
    headers: tuple[tuple[bytes, bytes], ...] = ((b"content-type", FORM),),
) -> dict[str, Any]:
    return {"type": "http", "method": method, "query_string": query, "headers": list(headers)}


def test_read_form() -> None:
    headers = ((b"content-type", FORM), (b"authorization", b"Basic eDp5"), (b"x-other", b"1"))
    form = run_without_suspending(
        read_form(
            request(headers=headers),
            FakeReceive(chunk(b"grant_type=client_credentials&scope=api&extra=1")),
            TOKEN_PARAMETERS,
        )
    )
    assert form == FormRequest(dict(headers), {"grant_type": "client_credentials", "scope": "api"})
    assert form.authorization == b"Basic eDp5"
    assert FormRequest({}, {}).authorization is None


@pytest.mark.parametrize(
    ("scope", "error", "description"),
    [
        pytest.param(
            request(method="GET", query=b"client_secret=x", headers=()),
            MethodNotAllowed,
            "The token endpoint accepts only POST.",
            id="method-first",
        ),
        pytest.param(
            request(query=b"client_secret=x", headers=()),
            InvalidRequest,
            "Client credentials must not be sent in the URL.",
            id="query-before-headers",
        ),
        pytest.param(
            request(headers=((b"authorization", b"Basic eDp5"), (b"authorization", b"Basic eDp6"))),
            InvalidRequest,
            "Send one Authorization header.",
            id="two-authorization-headers",
        ),
        pytest.param(
            request(headers=((b"authorization", b"Basic eDp5"), (b"authorization", b"Basic eDp5"))),
            InvalidRequest,
            "Send one Authorization header.",
            id="the-same-authorization-twice",
        ),
        pytest.param(
            request(headers=((b"content-type", b"application/json"),)),
            InvalidRequest,
            "The body must be application/x-www-form-urlencoded.",
            id="media-type-before-body",
        ),
        pytest.param(
            request(headers=((b"content-type", FORM), (b"content-length", b"99999"))),
            PayloadTooLarge,
            "The request body is too large.",
            id="declared-length",
        ),
    ],
)
def test_read_form_refusals_read_no_body(
    scope: dict[str, Any], error: type[Exception], description: str
) -> None:
    receive = FakeReceive(chunk(b"scope=api&scope=api"))
    with pytest.raises(error) as caught:
        run_without_suspending(read_form(scope, receive, TOKEN_PARAMETERS))
    assert type(caught.value) is error
    assert str(caught.value) == description
    assert receive.calls == 0


def test_read_form_allows_other_repeated_headers() -> None:
    headers = ((b"content-type", FORM), (b"x-forwarded-for", b"a"), (b"x-forwarded-for", b"b"))
    form = run_without_suspending(
        read_form(request(headers=headers), FakeReceive(chunk(b"scope=api")), TOKEN_PARAMETERS)
    )
    assert form.params == {"scope": "api"}
    assert form.authorization is None


def test_read_form_parses_only_the_known_parameters() -> None:
    with pytest.raises(InvalidRequest, match="repeated"):
        run_without_suspending(
            read_form(request(), FakeReceive(chunk(b"scope=api&scope=api")), TOKEN_PARAMETERS)
        )
    form = run_without_suspending(
        read_form(request(), FakeReceive(chunk(b"scope=api&scope=api")), frozenset({"token"}))
    )
    assert form.params == {}
