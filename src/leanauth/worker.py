"""One worker process of ``leanauth serve``: uvicorn serving the application on the listening
socket its supervisor (:mod:`leanauth.supervise`) made and handed down.

Its life, as an operator sees it:

- start: the application loads the registry view and keys, then the worker tells the
  supervisor it is ready (one byte on a pipe). A worker that fails to start exits non-zero
  and the supervisor stops the node.
- SIGTERM: drain. ``/readyz`` answers 503 at once while everything is still served, for
  ``LEANAUTH_DRAIN_SECONDS``, so load balancers take the node out; then the worker stops
  accepting, closes idle keep-alive connections, answers every request it has received
  (within ``LEANAUTH_SHUTDOWN_TIMEOUT``), flushes usage counts and the audit trail, exits 0.
- SIGINT (Ctrl-C in a terminal): the same without the drain; a second one exits at once.
- its supervisor dies (even by kill -9): the kernel sends SIGTERM, and the worker stops
  without a drain, rather than serving on as an orphan that holds the port.

Usage (by the supervisor only): ``python -m leanauth.worker LISTEN_FD READY_FD``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import logging
import os
import signal
import socket
import sys
import time
from types import FrameType

import uvicorn

from leanauth.app import LeanAuthApp, serve_app
from leanauth.httpserver import EdgeLimits, protocol_with
from leanauth.settings import Settings

log = logging.getLogger("leanauth.worker")

# Exit status of a worker that could not start (uvicorn's own for a failed lifespan start).
STARTUP_FAILURE = 3
_PR_SET_PDEATHSIG = 1


def end_with_parent() -> None:
    """Have the kernel send SIGTERM when the supervisor dies (Linux; elsewhere the worker
    notices the new parent at its next signal)."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def freeze_startup_objects() -> None:
    """Exempt what start-up built (modules, the registry view: about 90,000 objects) from
    the garbage collector's full passes. Short-lived objects that outlive a few collections
    (queued audit records) trigger a full pass every few seconds, and scanning the start-up
    heap made each one a 30-100 ms pause of the event loop: the tail of the latency."""
    gc.collect()
    gc.freeze()


class WorkerServer(uvicorn.Server):
    def __init__(
        self, config: uvicorn.Config, app: LeanAuthApp, drain_seconds: float, ready_fd: int
    ) -> None:
        super().__init__(config)
        self._app = app
        self._drain_seconds = drain_seconds
        self._ready_fd = ready_fd
        self._parent = os.getppid()
        self._stop_at: float | None = None
        self._backlog_tasks: set[asyncio.Task[object]] = set()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # uvicorn's own handler would stop at once on SIGTERM and re-raise the signal after
        # the shutdown (the process would end "killed by SIGTERM", not with status 0).
        if sig == signal.SIGINT:
            self.force_exit = self.should_exit
            self.should_exit = True
        elif os.getppid() != self._parent:
            self.should_exit = True  # an orphan: nobody balances traffic to it any more
        elif self._stop_at is None:
            self._app.draining = True
            self._stop_at = time.monotonic() + self._drain_seconds
            log.info("draining: /readyz answers 503; stopping in %gs", self._drain_seconds)

    async def on_tick(self, counter: int) -> bool:
        if self._stop_at is not None and time.monotonic() >= self._stop_at:
            self.should_exit = True
        return await super().on_tick(counter)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for listener in sockets or []:
            self._serve_backlog(listener)
        # Closed at once, with nothing in between: a connection the kernel queues after the
        # last accept and before the close is reset.
        for server in self.servers:
            server.close()
        for listener in sockets or []:
            listener.close()
        await super().shutdown(sockets=sockets)

    def _serve_backlog(self, listener: socket.socket) -> None:
        """Take every connection the kernel has queued, just before the listener closes:
        closing it resets them, and their clients may have sent a request already. The
        queue is shrunk first: a client connecting now is not queued (its connection
        attempt is retried by its kernel, and then refused), so none is left behind."""
        loop = asyncio.get_running_loop()
        listener.setblocking(False)
        with contextlib.suppress(OSError):
            listener.listen(0)
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:  # BlockingIOError: the queue is empty
                return
            task = loop.create_task(loop.connect_accepted_socket(self._protocol, connection))
            self._backlog_tasks.add(task)
            task.add_done_callback(self._backlog_tasks.discard)

    def _protocol(self) -> asyncio.Protocol:
        protocol: asyncio.Protocol = self.config.http_protocol_class(  # type: ignore[call-arg]
            config=self.config, server_state=self.server_state, app_state=self.lifespan.state
        )
        return protocol

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            freeze_startup_objects()
            os.write(self._ready_fd, b"1")
            os.close(self._ready_fd)


def main(argv: list[str]) -> None:
    listen_fd, ready_fd = (int(value) for value in argv)
    end_with_parent()
    settings = Settings.from_env()
    app = serve_app(settings)
    limits = EdgeLimits(header_timeout=settings.header_timeout, body_timeout=settings.body_timeout)
    config = uvicorn.Config(
        app,
        http=protocol_with(limits, lambda: app.draining),
        loop="uvloop",
        lifespan="on",
        # Access logs are off: query strings can carry credentials, and the audit trail
        # records requests without them.
        access_log=False,
        log_config=None,
        log_level=settings.log_level,
        server_header=False,
        # The source address of a request is decided by LEANAUTH_TRUSTED_PROXIES alone.
        proxy_headers=False,
        limit_concurrency=settings.max_connections,
        timeout_keep_alive=settings.keepalive_timeout,
        timeout_graceful_shutdown=settings.shutdown_timeout,
    )
    server = WorkerServer(config, app, settings.drain_seconds, ready_fd)
    # The socket object takes over the inherited descriptor: when uvicorn closes it at
    # shutdown, no copy of the listener stays open in this process.
    server.run(sockets=[socket.socket(fileno=listen_fd)])
    if not server.started:
        sys.exit(STARTUP_FAILURE)


if __name__ == "__main__":
    main(sys.argv[1:])
