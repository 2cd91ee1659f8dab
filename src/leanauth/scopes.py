"""The scope grammar of the Lean Authentication API.

Exactly one scope per request: ``api`` (a token for an app's backend),
``customer.<customer_id>`` (a token the LinkSDK uses for one end-user), where the id is a
UUID, or ``admin`` (a token for the administration API, to apps given that class). RFC
6749 §3.3 makes ``scope`` a space-delimited list; more than one is refused here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

ScopeClass = Literal["api", "customer", "admin"]
SCOPE_CLASSES: tuple[ScopeClass, ...] = ("api", "customer", "admin")
CUSTOMER_PREFIX = "customer."
HYPHENATED_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


@dataclass(frozen=True, slots=True)
class RequestedScope:
    scope_class: ScopeClass
    customer_id: str | None = None
    # The customer id's 16 bytes, as the customer directory keys it.
    customer_key: bytes | None = None

    @property
    def value(self) -> str:
        """The granted scope string (customer ids in canonical lower-case form)."""
        if self.customer_id is None:
            return self.scope_class
        return CUSTOMER_PREFIX + self.customer_id


API_SCOPE = RequestedScope("api")
ADMIN_SCOPE = RequestedScope("admin")


class ScopeError(ValueError):
    """A scope that cannot be granted; its message is the ``error_description`` of the
    ``invalid_scope`` answer (RFC 6749 §5.2)."""


def parse_scope(raw: str | None) -> RequestedScope:
    if not raw:
        raise ScopeError("The scope parameter is required: 'api' or 'customer.<customer_id>'.")
    if raw == "api":
        return API_SCOPE
    if raw == "admin":
        return ADMIN_SCOPE
    if not raw.startswith(CUSTOMER_PREFIX):
        if any(c in raw for c in " \t\r\n"):
            raise ScopeError("Request exactly one scope.")
        raise ScopeError("Unknown scope; use 'api', 'customer.<customer_id>' or 'admin'.")
    customer_id = raw[len(CUSTOMER_PREFIX) :].lower()
    # The hyphenated form only, in any letter case. A pattern and bytes.fromhex, not
    # uuid.UUID: this runs for every customer token, and the UUID object cost 4 µs of it
    # (measured).
    if len(customer_id) != 36 or HYPHENATED_UUID.fullmatch(customer_id) is None:
        if len(raw.split()) > 1:
            raise ScopeError("Request exactly one scope.")
        raise ScopeError("The customer id must be a UUID.")
    return RequestedScope("customer", customer_id, bytes.fromhex(customer_id.replace("-", "")))


def parse_scope_classes(text: str) -> frozenset[ScopeClass]:
    """Parse an allow-list such as ``api,customer`` (for the CLI and settings)."""
    names = {part.strip() for part in text.split(",") if part.strip()}
    unknown = names - set(SCOPE_CLASSES)
    if unknown or not names:
        raise ValueError(f"scope classes are {', '.join(SCOPE_CLASSES)}; got {text!r}")
    return frozenset(n for n in SCOPE_CLASSES if n in names)
