"""A TCP proxy a test puts between a server and its database to make the network misbehave.

- pass through: bytes flow both ways (the start).
- :meth:`FaultProxy.black_hole`: every connection stays open and nothing more is forwarded,
  either way; new connections are accepted and get nothing either. This is a host that
  vanished, as the programs at both ends see it (though not as their kernels do: this
  proxy's kernel still acknowledges what it receives, so TCP keepalive cannot tell).
- :meth:`FaultProxy.heal`: forwarding resumes; bytes held meanwhile are delivered, as TCP's
  retransmissions deliver them once a partition ends.
- :meth:`FaultProxy.reset`: every open connection is cut at once, both ends getting a reset
  (a rebooted host answering with RST).
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import threading


class FaultProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self._target = (target_host, target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._flowing = threading.Event()
        self._flowing.set()
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        # Connections accepted so far (each one a client's connection to the target).
        self.accepted = 0
        threading.Thread(target=self._accept, name="faultproxy-accept", daemon=True).start()

    def black_hole(self) -> None:
        self._flowing.clear()

    def heal(self) -> None:
        self._flowing.set()

    def reset(self) -> None:
        """Cut every open connection with a reset; later connections are served."""
        with self._lock:
            doomed, self._sockets = self._sockets, set()
        for sock in doomed:
            _abort(sock)

    def close(self) -> None:
        self._closed.set()
        self._flowing.set()
        self._listener.close()
        self.reset()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self.accepted += 1
            try:
                upstream = socket.create_connection(self._target, timeout=5)
            except OSError:
                _abort(client)
                continue
            upstream.settimeout(None)
            with self._lock:
                self._sockets.update((client, upstream))
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(
                    target=self._pump, args=(source, sink), name="faultproxy-pump", daemon=True
                ).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while not self._closed.is_set():
                # While black-holed nothing is read: what is sent waits in the kernel.
                if not self._flowing.wait(0.1):
                    continue
                readable, _, _ = select.select([source], [], [], 0.1)
                if not readable:
                    continue
                data = source.recv(65536)
                if not data:
                    break
                # Read just as the black hole began: held until it heals.
                while not self._flowing.wait(0.1):
                    if self._closed.is_set():
                        return
                sink.sendall(data)
        except (OSError, ValueError):
            pass  # the other pump (or reset) closed the sockets
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            with self._lock:
                self._sockets.difference_update((source, sink))


def _abort(sock: socket.socket) -> None:
    """Close with a reset rather than an orderly FIN."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
