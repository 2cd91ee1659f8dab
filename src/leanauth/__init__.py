"""leanauth: an OAuth 2.0 client-credentials authorization server (the Lean Authentication API)."""

__version__ = "0.1.0"
__all__ = ["__version__"]
