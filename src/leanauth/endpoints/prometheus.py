"""``GET /metrics`` on the public port (when ``LEANAUTH_METRICS_PORT`` is 0): the node's
Prometheus metrics, every worker's merged (:mod:`leanauth.metrics`)."""

from __future__ import annotations

import asyncio

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from leanauth.metrics import SnapshotWriter

METRICS_PATH = "/metrics"


def metrics_routes(writer: SnapshotWriter) -> list[Route]:
    async def metrics_endpoint(_: Request) -> Response:
        # Files to write and read: off the event loop. This worker's own counts are written
        # first, so they are current to the scrape; the others' are at most a second old.
        body, content_type = await asyncio.to_thread(writer.write_and_render)
        return Response(body, media_type=content_type, headers={"cache-control": "no-store"})

    return [Route(METRICS_PATH, metrics_endpoint, methods=["GET"])]
