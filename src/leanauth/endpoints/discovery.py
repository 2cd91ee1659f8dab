"""Discovery: the JWKS (RFC 7517) and authorization-server metadata (RFC 8414)."""

from __future__ import annotations

from urllib.parse import urlsplit

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from leanauth.cache import RegistryCache
from leanauth.endpoints.oauth import INTROSPECT_PATH, REVOKE_PATH
from leanauth.endpoints.token import TOKEN_PATH
from leanauth.settings import Settings

JWKS_PATH = "/oauth2/jwks"
AUTH_METHODS = ["client_secret_basic", "client_secret_post"]


def metadata_document(settings: Settings) -> dict[str, object]:
    issuer = settings.issuer
    return {
        "issuer": issuer,
        "token_endpoint": issuer + TOKEN_PATH,
        "jwks_uri": issuer + JWKS_PATH,
        "grant_types_supported": ["client_credentials"],
        # RFC 8414 §2 makes this member REQUIRED; there is no authorization endpoint here.
        "response_types_supported": [],
        "token_endpoint_auth_methods_supported": AUTH_METHODS,
        "revocation_endpoint": issuer + REVOKE_PATH,
        "revocation_endpoint_auth_methods_supported": AUTH_METHODS,
        "introspection_endpoint": issuer + INTROSPECT_PATH,
        "introspection_endpoint_auth_methods_supported": AUTH_METHODS,
        "scopes_supported": ["api"],
    }


def metadata_paths(settings: Settings) -> list[str]:
    """RFC 8414 §3: the well-known suffix goes between the host and the issuer's path."""
    issuer_path = urlsplit(settings.issuer).path.rstrip("/")
    base = "/.well-known/oauth-authorization-server"
    return [base] if not issuer_path else [base + issuer_path, base]


def discovery_routes(settings: Settings, cache: RegistryCache) -> list[Route]:
    cacheable = {"cache-control": f"public, max-age={settings.jwks_max_age}"}
    metadata_body = orjson.dumps(metadata_document(settings))

    async def jwks(_: Request) -> Response:
        return Response(
            cache.keyring.jwks_body, media_type="application/jwk-set+json", headers=cacheable
        )

    async def metadata(_: Request) -> Response:
        return Response(metadata_body, media_type="application/json", headers=cacheable)

    routes = [
        Route(JWKS_PATH, jwks, methods=["GET"]),
        Route("/.well-known/jwks.json", jwks, methods=["GET"]),
    ]
    routes += [Route(path, metadata, methods=["GET"]) for path in metadata_paths(settings)]
    return routes
