"""Health for load balancers and orchestrators: liveness and readiness.

- ``GET /livez``: 200 while the process can answer at all (restart it when this fails).
- ``GET /readyz``: 200 when this node can issue and check tokens correctly: its registry view
  and signing keys are loaded and fresher than ``LEANAUTH_INTROSPECTION_MAX_STALENESS``;
  503 with the reason otherwise, and 503 from the moment a drain begins (SIGTERM), so that
  balancers stop sending traffic before the node stops accepting it. On PostgreSQL the body
  also gives this node's clock offset from the database's (``clock_offset``, seconds ahead)
  and, past ``LEANAUTH_MAX_CLOCK_SKEW``, a ``warnings`` list; past the 30 s the token checks
  allow between nodes, 503 (see :mod:`leanauth.clock`).
- ``GET /healthz``: the same as ``/readyz`` (its earlier name), with the signing key's id.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from leanauth.cache import RegistryCache
from leanauth.clock import ClockCheck

log = logging.getLogger("leanauth.health")

NO_STORE = {"cache-control": "no-store"}
# Seconds between two looks at the view's age.
WATCHDOG_INTERVAL = 1.0


def readiness(
    cache: RegistryCache, max_staleness: float, draining: bool, clock: ClockCheck | None = None
) -> str | None:
    """Why this node is not ready, or None when it is."""
    if draining:
        return "draining"
    age = time.monotonic() - cache.synced_at
    if age > max_staleness:
        return f"registry view {age:.0f}s old (bound {max_staleness:g}s)"
    return clock.not_ready() if clock is not None else None


class Watchdog:
    """Says in the log when this node's registry view grows older than its bound (it is
    then not ready, and introspection answers 503) and when it is fresh again: a stuck
    refresh is otherwise silent."""

    def __init__(self, cache: RegistryCache, max_staleness: float) -> None:
        self._cache = cache
        self._max_staleness = max_staleness
        self._stale_since: float | None = None

    def check(self) -> None:
        now = time.monotonic()
        age = now - self._cache.synced_at
        if age > self._max_staleness and self._stale_since is None:
            self._stale_since = now - age
            log.warning(
                "registry view %.0fs old (bound %gs): not ready until it refreshes",
                age,
                self._max_staleness,
            )
        elif age <= self._max_staleness and self._stale_since is not None:
            log.warning("registry view fresh again after %.0fs: ready", now - self._stale_since)
            self._stale_since = None


def health_routes(
    cache: RegistryCache,
    max_staleness: float,
    is_draining: Callable[[], bool],
    clock: ClockCheck | None = None,
) -> list[Route]:
    def answer(body: dict[str, object], ready: bool) -> Response:
        status = 200 if ready else 503
        return Response(orjson.dumps(body), status, headers=NO_STORE, media_type="application/json")

    async def livez(_: Request) -> Response:
        return answer({"status": "ok"}, True)

    async def readyz(_: Request) -> Response:
        reason = readiness(cache, max_staleness, is_draining(), clock)
        clock_fields = clock.report() if clock is not None else {}
        if reason is not None:
            return answer({"status": "unavailable", "reason": reason, **clock_fields}, False)
        signer = cache.keyring.signer.kid
        return answer({"status": "ok", "signing_key": signer, **clock_fields}, True)

    return [
        Route("/livez", livez, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/healthz", readyz, methods=["GET"]),
    ]
