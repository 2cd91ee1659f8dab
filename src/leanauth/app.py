"""The ASGI application: the token endpoint on its thin path, everything else on Starlette."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

from starlette.applications import Starlette

from leanauth.bootstrap import Runtime, open_runtime
from leanauth.endpoints.customers import customers_routes
from leanauth.endpoints.discovery import TOKEN_PATH, discovery_routes
from leanauth.endpoints.oauth import oauth_routes
from leanauth.endpoints.token import TokenEndpoint
from leanauth.logs import configure_logging
from leanauth.services import (
    AUDIT_PRUNE_INTERVAL,
    FLUSH_INTERVAL,
    KEY_ROTATION_CHECK_INTERVAL,
    Housekeeper,
    Services,
)
from leanauth.settings import Settings


class LeanAuthApp:
    """Sends the token path straight to its handler and every other request to Starlette."""

    def __init__(self, runtime: Runtime) -> None:
        settings = runtime.settings
        self.services = services = Services.build(runtime)
        self.cache = services.cache
        self._issuer_path = urlsplit(settings.issuer).path.rstrip("/")
        self.token_endpoint = TokenEndpoint(services)
        jobs: list[tuple[float, Callable[[], None]]] = [
            (FLUSH_INTERVAL, services.flush),
            (AUDIT_PRUNE_INTERVAL, services.prune_audit_trail),
        ]
        if settings.key_rotation_days:
            jobs.append((KEY_ROTATION_CHECK_INTERVAL, services.rotate_key_if_due))
        self._housekeeper = Housekeeper(jobs)
        routes = discovery_routes(settings, self.cache) + oauth_routes(services)
        if settings.customers_api:
            routes += customers_routes(services)
        self.starlette = Starlette(routes=routes, lifespan=self._lifespan)

    @asynccontextmanager
    async def _lifespan(self, _: Starlette) -> AsyncIterator[None]:
        services = self.services
        await self.cache.start()
        services.throttle.start()
        self._housekeeper.start()
        try:
            yield
        finally:
            await self._housekeeper.stop()
            await self.cache.stop()
            services.throttle.stop()
            # What the last second's requests left in memory reaches the store.
            await asyncio.to_thread(services.flush)
            services.runtime.store.close()

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
    return LeanAuthApp(open_runtime(settings, actor="server"))


def serve_app() -> LeanAuthApp:
    """Factory for ``leanauth serve`` workers: the parent process has prepared the store."""
    settings = Settings.from_env()
    configure_logging(settings.log_level, settings.log_format)
    return LeanAuthApp(open_runtime(settings, schema="none", actor="server"))
