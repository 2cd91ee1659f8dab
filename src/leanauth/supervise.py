"""What ``leanauth serve`` becomes once the store is ready: the supervisor of the workers.

It binds the listening socket, starts the worker processes (:mod:`leanauth.worker`) on it,
and watches them; it imports no part of the application, so it costs little memory
(``leanauth serve`` replaces itself with this module by ``exec``).

- Start-up: every worker must report ready (registry view and keys loaded). If one exits
  first, the others are stopped and the supervisor exits with status 3, so that systemd's
  ``Restart=on-failure`` (or an orchestrator) retries.
- A worker that dies later is logged and replaced; more than ``MAX_CRASHES`` deaths within
  ``CRASH_WINDOW`` seconds stop the node (status 1) rather than loop.
- SIGTERM: the supervisor closes its own copy of the listening socket (so once the workers
  close theirs, new connections are refused, not queued) and passes the signal on; each
  worker drains, then stops (see :mod:`leanauth.worker`). Workers still running after the
  drain, the shutdown timeout and a margin are killed. Exit status 0 when every worker
  stopped cleanly. SIGINT is passed on the same way (workers stop without a drain).
- Workers end with their supervisor, even when it is killed with SIGKILL.

Usage (by ``leanauth serve`` only, with settings it has checked):
``python -m leanauth.supervise JSON`` with ``host``, ``port``, ``workers``, ``log_level``,
``log_format``, ``drain_seconds``, ``shutdown_timeout``; the workers read the same
``LEANAUTH_*`` environment.
"""

from __future__ import annotations

import json
import logging
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from types import FrameType

from leanauth.logs import configure_logging

log = logging.getLogger("leanauth.serve")

STARTUP_FAILURE = 3
START_TIMEOUT = 120.0
MAX_CRASHES = 5
CRASH_WINDOW = 60.0
KILL_MARGIN = 5.0
BACKLOG = 2048


@dataclass(frozen=True)
class Plan:
    host: str
    port: int
    workers: int
    log_level: str
    log_format: str
    drain_seconds: float
    shutdown_timeout: float
    metrics_port: int = 0


@dataclass
class Worker:
    process: subprocess.Popen[bytes]
    ready_pipe: int  # read end; closed once the worker is ready or gone
    ready: bool = False


def serve_metrics(host: str, port: int, metrics_dir: str) -> None:
    """``GET /metrics`` on its own port (LEANAUTH_METRICS_PORT), merged from the workers'
    snapshots: scrapes never compete with token requests, and the port can be kept off the
    public network."""
    # Imported here: a supervisor without a metrics port stays without them.
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer  # noqa: PLC0415

    from leanauth.metrics import render  # noqa: PLC0415

    class MetricsHandler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.split("?", 1)[0] != "/metrics":
                self.send_error(404)
                return
            body, content_type = render(metrics_dir)
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass  # scrapes are not worth a log line each

    server = ThreadingHTTPServer((host, port), MetricsHandler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()


def bind(host: str, port: int) -> socket.socket:
    """The listening socket. An IPv6 wildcard listens on IPv4 too (dual stack)."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind(address)
    sock.listen(BACKLOG)
    sock.set_inheritable(True)
    return sock


@dataclass
class Supervisor:
    plan: Plan
    listener: socket.socket | None
    env: dict[str, str]
    workers: list[Worker] = field(default_factory=list)
    crashes: list[float] = field(default_factory=list)
    stop_signal: int | None = None

    def spawn(self) -> Worker:
        assert self.listener is not None
        read_end, write_end = os.pipe()
        fd = self.listener.fileno()
        command = [sys.executable, "-m", "leanauth.worker", str(fd), str(write_end)]
        process = subprocess.Popen(command, env=self.env, pass_fds=(fd, write_end))  # noqa: S603
        os.close(write_end)
        worker = Worker(process, read_end)
        self.workers.append(worker)
        return worker

    def on_signal(self, sig: int, _: FrameType | None) -> None:
        first = self.stop_signal is None
        self.stop_signal = sig
        if first and self.listener is not None:
            # From now on only the workers hold the listener: when they close it at the end
            # of their drain, new connections are refused instead of waiting in a backlog.
            self.listener.close()
            self.listener = None
        for worker in self.workers:
            if worker.process.poll() is None:
                worker.process.send_signal(sig)

    def run(self) -> int:
        for _ in range(self.plan.workers):
            self.spawn()
        if not self.wait_until_ready():
            return self.stop_all(signal.SIGINT, STARTUP_FAILURE)
        log.info("serving on %s with %d worker(s)", self.address(), len(self.workers))
        while self.stop_signal is None:
            time.sleep(0.2)
            if not self.replace_dead_workers():
                return self.stop_all(signal.SIGTERM, 1)
        return self.wait_for_exit()

    def address(self) -> str:
        host = f"[{self.plan.host}]" if ":" in self.plan.host else self.plan.host
        return f"http://{host}:{self.plan.port}"

    def wait_until_ready(self) -> bool:
        deadline = time.monotonic() + START_TIMEOUT
        pending = [worker for worker in self.workers if not worker.ready]
        with selectors.DefaultSelector() as selector:
            for worker in pending:
                selector.register(worker.ready_pipe, selectors.EVENT_READ, worker)
            while pending:
                if self.stop_signal is not None:
                    return False
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    log.error("workers not ready after %gs", START_TIMEOUT)
                    return False
                for key, _ in selector.select(min(remaining, 0.2)):
                    worker = key.data
                    selector.unregister(worker.ready_pipe)
                    worker.ready = os.read(worker.ready_pipe, 1) == b"1"
                    os.close(worker.ready_pipe)
                    if not worker.ready:
                        return self.startup_failed(worker)
                    pending.remove(worker)
                for worker in pending:
                    if worker.process.poll() is not None:
                        return self.startup_failed(worker)
        return True

    def startup_failed(self, worker: Worker) -> bool:
        status = worker.process.wait()
        log.error("a worker failed to start (exit status %s): stopping", status)
        return False

    def replace_dead_workers(self) -> bool:
        """Replace workers that died; False when they die too often to go on."""
        for worker in list(self.workers):
            status = worker.process.poll()
            if status is None:
                continue
            self.workers.remove(worker)
            now = time.monotonic()
            self.crashes = [t for t in self.crashes if now - t < CRASH_WINDOW] + [now]
            log.error("worker %d died (exit status %s)", worker.process.pid, status)
            if len(self.crashes) > MAX_CRASHES:
                log.error("%d worker deaths within %gs: stopping", MAX_CRASHES, CRASH_WINDOW)
                return False
            self.spawn()
            if not self.wait_until_ready():
                return False
            log.info("worker %d replaced", worker.process.pid)
        return True

    def stop_all(self, sig: int, status: int) -> int:
        self.on_signal(sig, None)
        self.wait_for_exit()
        return status

    def wait_for_exit(self) -> int:
        """Wait for every worker to stop; kill those that outlast the drain and timeout."""
        limit = self.plan.drain_seconds + self.plan.shutdown_timeout + KILL_MARGIN
        deadline = time.monotonic() + limit
        clean = True
        for worker in self.workers:
            try:
                status = worker.process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("worker %d still running after %gs: killed", worker.process.pid, limit)
                worker.process.kill()
                status = worker.process.wait()
            clean = clean and status == 0
        return 0 if clean else 1


def main(argv: list[str]) -> None:
    plan = Plan(**json.loads(argv[0]))
    configure_logging(plan.log_level, plan.log_format)
    try:
        listener = bind(plan.host, plan.port)
    except OSError as exc:
        log.error("cannot listen on %s port %d: %s", plan.host, plan.port, exc.strerror)
        sys.exit(STARTUP_FAILURE)
    metrics_dir = tempfile.mkdtemp(prefix="leanauth-metrics-")
    if plan.metrics_port:
        try:
            serve_metrics(plan.host, plan.metrics_port, metrics_dir)
        except OSError as exc:
            log.error("cannot serve metrics on port %d: %s", plan.metrics_port, exc.strerror)
            sys.exit(STARTUP_FAILURE)
    env = {**os.environ, "LEANAUTH_METRICS_DIR": metrics_dir}
    supervisor = Supervisor(plan, listener, env)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, supervisor.on_signal)
    try:
        status = supervisor.run()
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
    sys.exit(status)


if __name__ == "__main__":
    main(sys.argv[1:])
