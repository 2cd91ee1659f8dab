"""The ASGI application: the token endpoint on its thin path, everything else on Starlette."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

from starlette.applications import Starlette

from leanauth.bootstrap import Runtime, open_runtime
from leanauth.cache import RegistryCache
from leanauth.endpoints.discovery import TOKEN_PATH, discovery_routes
from leanauth.endpoints.token import TokenEndpoint
from leanauth.logs import configure_logging
from leanauth.notify import listener_for
from leanauth.settings import Settings
from leanauth.tokens import TokenIssuer


class LeanAuthApp:
    """Sends the token path straight to its handler and every other request to Starlette."""

    def __init__(self, runtime: Runtime) -> None:
        settings = runtime.settings
        self.runtime = runtime
        self._issuer_path = urlsplit(settings.issuer).path.rstrip("/")
        self.cache = RegistryCache(
            runtime.store, runtime.cipher, settings.refresh_interval, listener_for(settings)
        )
        self.token_endpoint = TokenEndpoint(self.cache, runtime.hasher, TokenIssuer(settings))
        self.starlette = Starlette(
            routes=discovery_routes(settings, self.cache), lifespan=self._lifespan
        )

    @asynccontextmanager
    async def _lifespan(self, _: Starlette) -> AsyncIterator[None]:
        await self.cache.start()
        try:
            yield
        finally:
            await self.cache.stop()
            self.runtime.store.close()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            path: str = scope["path"]
            # An issuer with a path (https://host/tenant) advertises its endpoints under that
            # path; they are served there as well as at the root.
            if self._issuer_path and path.startswith(self._issuer_path + "/"):
                path = path[len(self._issuer_path) :]
                scope = {**scope, "path": path}
            if path == TOKEN_PATH:
                await self.token_endpoint(scope, receive, send)
                return
        await self.starlette(scope, receive, send)


def create_app(settings: Settings | None = None) -> LeanAuthApp:
    settings = settings or Settings.from_env()
    return LeanAuthApp(open_runtime(settings))


def serve_app() -> LeanAuthApp:
    """Factory for ``leanauth serve`` workers: the parent process has prepared the store."""
    settings = Settings.from_env()
    configure_logging(settings.log_level, settings.log_format)
    return LeanAuthApp(open_runtime(settings, schema="none"))
