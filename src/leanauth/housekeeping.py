"""Running a server's background jobs: blocking ones on a worker thread, memory-only ones on
the event loop, each on its own interval."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

log = logging.getLogger("leanauth.services")


class Housekeeper:
    """Runs blocking background jobs in a worker thread, each on its own interval, and the
    ``final`` jobs once more when it stops (the last metrics snapshot). ``inline`` jobs only
    look at memory: they run on the event loop, so that threads stuck on a dead database
    cannot hold them up (the watchdog that reports a stuck node is one)."""

    def __init__(
        self,
        jobs: list[tuple[float, Callable[[], None]]],
        final: tuple[Callable[[], None], ...] = (),
        inline: list[tuple[float, Callable[[], None]]] | None = None,
    ) -> None:
        self._jobs = jobs
        self._final = final
        self._inline = inline or []
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._every(i, job)) for i, job in self._jobs]
        self._tasks += [asyncio.create_task(self._inline_every(i, job)) for i, job in self._inline]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for job in self._final:
            try:
                await asyncio.to_thread(job)
            except Exception:
                log.exception("background job failed")

    @staticmethod
    async def _inline_every(interval: float, job: Callable[[], None]) -> None:
        while True:
            try:
                job()
            except Exception:
                log.exception("background job failed")
            await asyncio.sleep(interval)

    @staticmethod
    async def _every(interval: float, job: Callable[[], None]) -> None:
        # Each job runs once at start (a key rotation that fell due while no node was up
        # happens now), then on its interval.
        while True:
            try:
                await asyncio.to_thread(job)
            except Exception:
                log.exception("background job failed")
            await asyncio.sleep(interval)
