"""The scope grammar (leanauth.scopes): one scope, ``api`` or ``customer.<uuid>``."""

from __future__ import annotations

import uuid

import pytest

from leanauth.scopes import ADMIN_SCOPE, API_SCOPE, ScopeError, parse_scope, parse_scope_classes

CUSTOMER = "0b6f3c2e-8a4d-4f1e-9c7b-5d2a1e3f4b6c"

REQUIRED = "The scope parameter is required: 'api' or 'customer.<customer_id>'."
ONE_SCOPE = "Request exactly one scope."
UNKNOWN = "Unknown scope; use 'api', 'customer.<customer_id>' or 'admin'."
NOT_A_UUID = "The customer id must be a UUID."


def test_admin() -> None:
    assert parse_scope("admin") is ADMIN_SCOPE
    assert (ADMIN_SCOPE.scope_class, ADMIN_SCOPE.value, ADMIN_SCOPE.customer_id) == (
        "admin",
        "admin",
        None,
    )


def test_api() -> None:
    scope = parse_scope("api")
    assert scope is API_SCOPE
    assert (scope.scope_class, scope.customer_id, scope.customer_key) == ("api", None, None)
    assert scope.value == "api"


@pytest.mark.parametrize(
    "written",
    [CUSTOMER, CUSTOMER.upper(), CUSTOMER[:18] + CUSTOMER[18:].upper(), CUSTOMER.title()],
)
def test_customer_ids_in_any_letter_case_become_canonical(written: str) -> None:
    scope = parse_scope("customer." + written)
    assert scope.scope_class == "customer"
    assert scope.customer_id == CUSTOMER
    assert scope.value == "customer." + CUSTOMER
    assert scope.customer_key == uuid.UUID(CUSTOMER).bytes
    assert len(scope.customer_key) == 16


@pytest.mark.parametrize(
    ("raw", "description"),
    [
        pytest.param(None, REQUIRED, id="missing"),
        pytest.param("", REQUIRED, id="empty"),
        pytest.param("api customer." + CUSTOMER, ONE_SCOPE, id="two-by-space"),
        pytest.param("api\tapi", ONE_SCOPE, id="two-by-tab"),
        pytest.param("api api", ONE_SCOPE, id="api-twice"),
        pytest.param("api ", ONE_SCOPE, id="trailing-space"),
        pytest.param(" api", ONE_SCOPE, id="leading-space"),
        pytest.param("api\n", ONE_SCOPE, id="trailing-newline"),
        pytest.param("openid api", ONE_SCOPE, id="openid-and-api"),
        # A customer scope first is judged as a customer id (a different message).
        pytest.param("customer." + CUSTOMER + " api", ONE_SCOPE, id="customer-then-api"),
        pytest.param("API", UNKNOWN, id="upper-case-api"),
        pytest.param("openid", UNKNOWN, id="openid"),
        pytest.param("apis", UNKNOWN, id="apis"),
        pytest.param("customer", UNKNOWN, id="customer-without-id"),
        pytest.param("Customer." + CUSTOMER, UNKNOWN, id="upper-case-prefix"),
        pytest.param("customers." + CUSTOMER, UNKNOWN, id="customers-prefix"),
        pytest.param("customer:" + CUSTOMER, UNKNOWN, id="colon-separator"),
        pytest.param("customer.", NOT_A_UUID, id="empty-id"),
        pytest.param("customer.not-a-uuid", NOT_A_UUID, id="not-a-uuid"),
        pytest.param("customer." + CUSTOMER.replace("-", ""), NOT_A_UUID, id="32-hex"),
        pytest.param("customer.{" + CUSTOMER + "}", NOT_A_UUID, id="braces"),
        pytest.param("customer.urn:uuid:" + CUSTOMER, NOT_A_UUID, id="urn"),
        pytest.param("customer." + CUSTOMER + "0", NOT_A_UUID, id="one-digit-too-many"),
        pytest.param("customer." + CUSTOMER[:-1], NOT_A_UUID, id="one-digit-short"),
        pytest.param("customer." + CUSTOMER[:-1] + "g", NOT_A_UUID, id="non-hex-letter"),
        pytest.param("customer." + CUSTOMER + "\n", NOT_A_UUID, id="newline-after-id"),
        pytest.param("customer." + CUSTOMER.replace("-", "_"), NOT_A_UUID, id="underscores"),
        pytest.param(
            "customer." + CUSTOMER[:8] + CUSTOMER[9:13] + "-" + CUSTOMER[13:],
            NOT_A_UUID,
            id="hyphen-misplaced",
        ),
        pytest.param(
            "customer." + CUSTOMER.replace("0", "\uff10"), NOT_A_UUID, id="fullwidth-digit"
        ),
        pytest.param(
            "customer." + CUSTOMER.replace("4", "\u0664"), NOT_A_UUID, id="arabic-indic-digit"
        ),
    ],
)
def test_refused_scopes(raw: str | None, description: str) -> None:
    with pytest.raises(ScopeError) as caught:
        parse_scope(raw)
    # The message becomes the error_description of the invalid_scope answer.
    assert str(caught.value) == description


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("api", {"api"}),
        ("customer", {"customer"}),
        ("api,customer", {"api", "customer"}),
        ("customer,api", {"api", "customer"}),
        (" customer , api ", {"api", "customer"}),
        ("api,,customer,", {"api", "customer"}),
        ("api,api", {"api"}),
    ],
)
def test_scope_classes(text: str, expected: set[str]) -> None:
    assert parse_scope_classes(text) == frozenset(expected)


@pytest.mark.parametrize(
    "text", ["", " ", ",", " , ", "openid", "api,openid", "API", "api customer"]
)
def test_bad_scope_classes(text: str) -> None:
    with pytest.raises(ValueError, match="scope classes") as caught:
        parse_scope_classes(text)
    assert str(caught.value) == f"scope classes are api, customer, admin; got {text!r}"
