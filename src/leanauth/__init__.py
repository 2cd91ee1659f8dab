"""leanauth: an OAuth 2.0 client-credentials authorization server (the Lean Authentication API),
with the pieces that go around it: a token verifier for resource servers and an ``httpx``
client that fetches and caches tokens for apps."""

from leanauth.client import ClientCredentials, TokenRequestError
from leanauth.verify import (
    Introspection,
    InvalidToken,
    TokenVerifier,
    VerificationUnavailable,
    VerifiedToken,
)

__version__ = "0.1.0"
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
