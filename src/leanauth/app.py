"""The ASGI application: the token endpoint on its thin path, everything else on Starlette."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from time import perf_counter
from typing import Any
from urllib.parse import urlsplit

from starlette.applications import Starlette

from leanauth import metrics, requestid
from leanauth.bootstrap import Runtime, open_runtime
from leanauth.clock import CHECK_INTERVAL, ClockCheck
from leanauth.endpoints.customers import customers_routes
from leanauth.endpoints.discovery import discovery_routes
from leanauth.endpoints.health import WATCHDOG_INTERVAL, Watchdog, health_routes
from leanauth.endpoints.oauth import oauth_routes
from leanauth.endpoints.prometheus import metrics_routes
from leanauth.endpoints.token import TOKEN_PATH, TokenEndpoint
from leanauth.housekeeping import Housekeeper
from leanauth.logs import configure_logging
from leanauth.owntokens import TOKEN_TIME_LEEWAY
from leanauth.requestid import RequestIds
from leanauth.services import (
    AUDIT_PRUNE_INTERVAL,
    FLUSH_INTERVAL,
    KEY_ROTATION_CHECK_INTERVAL,
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
        proxies = services.source_address
        self._request_ids = RequestIds(proxies.trusts if settings.trusted_proxies else None)
        jobs: list[tuple[float, Callable[[], None]]] = [
            (FLUSH_INTERVAL, services.flush),
            (AUDIT_PRUNE_INTERVAL, services.prune_audit_trail),
        ]
        if settings.key_rotation_days:
            jobs.append((KEY_ROTATION_CHECK_INTERVAL, services.rotate_key_if_due))
        watchdog = Watchdog(self.cache, settings.introspection_max_staleness)
        clock = ClockCheck(runtime.store, settings.max_clock_skew, TOKEN_TIME_LEEWAY)
        jobs.append((CHECK_INTERVAL, clock.check))
        # Requests count in memory; the housekeeper's thread writes this process's snapshot
        # once a second (and at exit) for a scrape to merge (leanauth.metrics says why).
        directory = metrics.metrics_directory(settings.metrics_dir)
        self.metrics = metrics.SnapshotWriter(directory, services.metrics_sample)
        jobs.append((metrics.SNAPSHOT_INTERVAL, self.metrics.write))
        self._housekeeper = Housekeeper(
            jobs, final=(self.metrics.write,), inline=[(WATCHDOG_INTERVAL, watchdog.check)]
        )
        # Set by the worker when a drain begins: readiness then fails at once.
        self.draining = False
        routes = discovery_routes(settings, self.cache) + oauth_routes(services)
        routes += health_routes(
            self.cache, settings.introspection_max_staleness, lambda: self.draining, clock
        )
        if settings.customers_api:
            routes += customers_routes(services)
        if not settings.metrics_port:
            routes += metrics_routes(self.metrics)
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
            # What the last second's requests left in memory reaches the store (what it
            # cannot take waits in the journal for the next worker).
            await asyncio.to_thread(services.flush, final=True)
            services.audit.close_journal()
            services.runtime.store.close()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            started = perf_counter()
            request_id = self._request_ids.assign(scope)
            path: str = scope["path"]
            # An issuer with a path (https://host/tenant) advertises its endpoints under that
            # path; they are served there as well as at the root.
            if self._issuer_path and path.startswith(self._issuer_path + "/"):
                path = path[len(self._issuer_path) :]
                scope = {**scope, "path": path}
            if path == TOKEN_PATH:
                await self.token_endpoint(scope, receive, send)
                metrics.REQUEST_SECONDS.observe("token", perf_counter() - started)
                return
            try:
                await self.starlette(scope, receive, requestid.sending_id(send, request_id))
            finally:
                elapsed = perf_counter() - started
                metrics.REQUEST_SECONDS.observe(metrics.endpoint_of(path), elapsed)
            return
        await self.starlette(scope, receive, send)


def create_app(settings: Settings | None = None) -> LeanAuthApp:
    settings = settings or Settings.from_env()
    return LeanAuthApp(open_runtime(settings, actor="server"))


def serve_app(settings: Settings | None = None) -> LeanAuthApp:
    """The application of a ``leanauth serve`` worker: the store was prepared before."""
    settings = settings or Settings.from_env()
    configure_logging(settings.log_level, settings.log_format)
    return LeanAuthApp(open_runtime(settings, schema="none", actor="server"))
