"""The HTTP/1.1 edge: uvicorn's httptools protocol, hardened for clients that misbehave,
and with one write per small response.

What uvicorn does not bound, and this protocol does (no proxy is assumed in front):

- the request head: at most ``MAX_HEAD_BYTES`` (request line and headers); past it the
  client gets 431 and the connection is closed, before more is buffered;
- the time to send the head (``LEANAUTH_HEADER_TIMEOUT``, from connecting or from the
  request's first byte) and then the body (``LEANAUTH_BODY_TIMEOUT``): a client that
  trickles bytes (slowloris) gets 408 and is disconnected.

uvicorn bounds the rest: idle keep-alive connections (``timeout_keep_alive``), concurrent
connections per worker (``limit_concurrency``, answered 503), and the parser (llhttp)
refuses ``Content-Length`` together with ``Transfer-Encoding`` (400).

One write per response: uvicorn writes a response's head as soon as the application sends
``http.response.start``, and its body in a second write. For the token endpoint's answers (a
few hundred bytes) that is two system calls and two TCP segments where one would do
(measured: the head's write alone took 17-19% of a worker's time under load), so the head
is held back and leaves with the body's first bytes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

MAX_HEAD_BYTES = 16 * 1024
SHUTDOWN_GRACE = 1.0


@dataclass(frozen=True)
class EdgeLimits:
    header_timeout: float = 10.0
    body_timeout: float = 10.0
    max_head_bytes: int = MAX_HEAD_BYTES


def _never() -> bool:
    return False


def _plain_response(status: bytes, text: bytes) -> bytes:
    return (
        b"HTTP/1.1 " + status + b"\r\ncontent-type: text/plain; charset=utf-8\r\n"
        b"content-length: " + str(len(text)).encode() + b"\r\nconnection: close\r\n\r\n" + text
    )


HEAD_TOO_LARGE = _plain_response(
    b"431 Request Header Fields Too Large", b"Request header fields too large."
)
TOO_SLOW = _plain_response(b"408 Request Timeout", b"Request not received in time.")


class _Refused(Exception):
    """Raised from a parser callback to stop parsing a request already answered. httptools
    turns it into an HttpParserError, which uvicorn answers with send_400_response (a no-op
    here once the edge has answered)."""


class _HeadWithBody:
    """The transport as one request/response cycle sees it: the first write after the
    response has started (its head) is held and joined to the next one (its body). Every
    other call goes straight to the transport."""

    __slots__ = ("_cycle", "_head", "_head_seen", "_transport")

    def __init__(self, transport: asyncio.Transport, cycle: RequestResponseCycle) -> None:
        self._transport = transport
        self._cycle = cycle
        self._head: bytes | None = None
        self._head_seen = False

    def write(self, data: bytes) -> None:
        if not self._head_seen and self._cycle.response_started:
            # The head. A "100 Continue" interim response is written before the response
            # starts, so it is never held.
            self._head_seen = True
            self._head = data
            return
        if self._head is not None:
            data, self._head = self._head + data, None
        self._transport.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class LeanHttpProtocol(HttpToolsProtocol):
    limits = EdgeLimits()
    # True once the node drains: every response then closes its connection, so that
    # keep-alive clients reconnect (to another node) instead of finding their connection
    # closed under a request when the node stops.
    draining: Callable[[], bool] = staticmethod(_never)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_bytes = 0  # received while reading the current head
        self._answered = False  # the edge answered in place of the application
        # One timer per connection, checked against the phase's deadline when it fires:
        # arming a timer per request cost several percent of the token endpoint's time.
        self._timer: asyncio.TimerHandle | None = None
        self._phase: Literal["head", "body"] | None = None
        self._phase_deadline = 0.0
        self._begin("head", self.limits.header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._phase = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        super().connection_lost(exc)

    # The phases are followed here and in on_headers_complete only, not in the parser's
    # per-header callbacks: each Python override there cost about a microsecond a request.
    def data_received(self, data: bytes) -> None:
        if self._answered:
            return  # the connection is closing; nothing more is read
        if self._phase != "head" and not self._in_body():
            # The first bytes of the next request on a kept-alive connection.
            self._head_bytes = 0
            self._begin("head", self.limits.header_timeout)
        if self._phase == "head":
            self._head_bytes += len(data)
        super().data_received(data)
        # A head still incomplete after this many bytes is refused before more is buffered.
        if self._phase == "head" and self._head_bytes > self.limits.max_head_bytes:
            self._answer(HEAD_TOO_LARGE)

    def _in_body(self) -> bool:
        cycle = self.cycle
        return self._phase == "body" and cycle is not None and cycle.more_body

    def on_headers_complete(self) -> None:
        if self._head_bytes > self.limits.max_head_bytes and self._parsed_head_size() > (
            self.limits.max_head_bytes
        ):
            # A whole oversized head in one read: refused all the same.
            self._answer(HEAD_TOO_LARGE)
            raise _Refused
        self._begin("body", self.limits.body_timeout)
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is None:
            return
        # A HEAD response has a head and no body write to carry it.
        if cycle.scope.get("method") != "HEAD":
            cycle.transport = _HeadWithBody(self.transport, cycle)  # type: ignore[assignment]
        if self.draining():
            cycle.keep_alive = False

    def _parsed_head_size(self) -> int:
        return len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)

    def shutdown(self) -> None:
        """The node stops: uvicorn closes idle connections at once. One that has not yet
        carried a request was accepted moments ago, and its request may be on the way: it
        gets a second to arrive (and is then answered, and the connection closed)."""
        if self.cycle is None and not self._answered:
            self._begin("head", min(self.limits.header_timeout, SHUTDOWN_GRACE))
            return
        super().shutdown()

    def send_400_response(self, msg: str) -> None:
        # uvicorn's answer to a parser error, which a callback's _Refused also is: the edge
        # has answered then.
        if not self._answered:
            super().send_400_response(msg)

    # The edge's limits

    def _begin(self, phase: Literal["head", "body"], timeout: float) -> None:
        self._phase = phase
        self._phase_deadline = deadline = self.loop.time() + timeout
        timer = self._timer
        if timer is None or timer.when() > deadline:
            if timer is not None:
                timer.cancel()
            self._timer = self.loop.call_at(deadline, self._check_deadline)

    def _check_deadline(self) -> None:
        self._timer = None
        if self._phase is None or (self._phase == "body" and not self._in_body()):
            return  # idle (uvicorn's keep-alive timeout applies) or answering
        if self.loop.time() < self._phase_deadline:
            self._timer = self.loop.call_at(self._phase_deadline, self._check_deadline)
            return
        cycle = self.cycle
        if self._phase == "body" and cycle is not None:
            # Its application is waiting for the body: it sees the client go away.
            cycle.disconnected = True
            cycle.message_event.set()
            if cycle.response_started:
                self._answered = True
                self.transport.close()
                return
        self._answer(TOO_SLOW)

    def _answer(self, response: bytes) -> None:
        """Answer in place of the application, and close the connection."""
        self._answered = True
        self._phase = None
        if not self.transport.is_closing():
            self.transport.write(response)
            self.transport.close()


def protocol_with(limits: EdgeLimits, draining: Callable[[], bool]) -> type[LeanHttpProtocol]:
    """The protocol class uvicorn instantiates per connection, with these limits."""
    attributes = {"limits": limits, "draining": staticmethod(draining)}
    return type("LeanHttpProtocol", (LeanHttpProtocol,), attributes)
