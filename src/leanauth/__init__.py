"""leanauth: an OAuth 2.0 client-credentials authorization server (the Lean Authentication API),
with the pieces that go around it: a token verifier for resource servers and an ``httpx``
client that fetches and caches tokens for apps.

The public names are imported on first use, so that a process needing none of them (the
supervisor of ``leanauth serve``'s workers, say) does not pay for httpx and PyJWT.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from leanauth.client import ClientCredentials, TokenRequestError
    from leanauth.verify import (
        Introspection,
        InvalidToken,
        TokenVerifier,
        VerificationUnavailable,
        VerifiedToken,
    )

__version__ = "0.2.0"
__all__ = [
    "ClientCredentials",
    "Introspection",
    "InvalidToken",
    "TokenRequestError",
    "TokenVerifier",
    "VerificationUnavailable",
    "VerifiedToken",
    "__version__",
]

_HOMES = {
    "ClientCredentials": "leanauth.client",
    "TokenRequestError": "leanauth.client",
    "Introspection": "leanauth.verify",
    "InvalidToken": "leanauth.verify",
    "TokenVerifier": "leanauth.verify",
    "VerificationUnavailable": "leanauth.verify",
    "VerifiedToken": "leanauth.verify",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'leanauth' has no attribute {name!r}")
    return getattr(importlib.import_module(home), name)
