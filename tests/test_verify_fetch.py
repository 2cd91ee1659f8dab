"""The JWKS fetch of leanauth.verify against hostile servers on loopback: a body that is huge
or never ends, an answer dripped a byte at a time, errors and garbage. None of them is a
verdict on the token (VerificationUnavailable, never InvalidToken); none costs the verifier
more than about MAX_JWKS_BYTES of memory or ``timeout`` seconds; and a key set whose refresh
fails still serves, for a bounded time.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import resource
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from conftest import wait_for
from leanauth.verify import InvalidToken, TokenVerifier, VerificationUnavailable, VerifiedToken
from test_verify import API_AUDIENCE, ISSUER, Key, ec_key

HUGE = 150 * 1024 * 1024
CHUNK = b" " * 65_536
MODES = ["sync", "async"]

# Answers a connection after its request was read; the event is set when the test is done.
Behaviour = Callable[[socket.socket, threading.Event], None]


class HostileServer:
    """HTTP on loopback by hand: each request is read and recorded, then ``behave`` answers
    it with anything, at any pace. ``hangups`` counts the answers cut short by the client."""

    def __init__(self, behave: Behaviour) -> None:
        self.behave = behave
        self.requests: list[bytes] = []
        self.hangups = 0
        self.stopped = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.05)
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._listener.getsockname()[1]}/oauth2/jwks"

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(10)
            try:
                self.requests.append(read_request(conn))
                self.behave(conn, self.stopped)
            except OSError:
                self.hangups += 1

    def close(self) -> None:
        self.stopped.set()
        self._thread.join()
        self._listener.close()


def read_request(conn: socket.socket) -> bytes:
    """The head and the body (by Content-Length) of one request."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65_536)
        if not chunk:
            raise ConnectionResetError
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            while len(body) < int(value):
                body += conn.recv(65_536)
    return head + b"\r\n\r\n" + body


@contextmanager
def hostile(behave: Behaviour) -> Iterator[HostileServer]:
    server = HostileServer(behave)
    try:
        yield server
    finally:
        server.close()


# Behaviours


def answer(status: int, body: bytes, *headers: str) -> Behaviour:
    def behave(conn: socket.socket, stopped: threading.Event) -> None:
        head = [f"HTTP/1.1 {status} Whatever", f"Content-Length: {len(body)}", *headers]
        conn.sendall("\r\n".join(head).encode() + b"\r\n\r\n" + body)

    return behave


def jwks(*keys: Key) -> Behaviour:
    return answer(200, json.dumps({"keys": [key.jwk() for key in keys]}).encode())


def huge(declared: bool) -> Behaviour:
    """150 MB of body, with its Content-Length or until the connection closes."""

    def behave(conn: socket.socket, stopped: threading.Event) -> None:
        framing = f"Content-Length: {HUGE}" if declared else "Connection: close"
        conn.sendall(f"HTTP/1.1 200 OK\r\n{framing}\r\n\r\n".encode())
        sent = 0
        while sent < HUGE and not stopped.is_set():
            conn.sendall(CHUNK)
            sent += len(CHUNK)

    return behave


def dripping(where: str) -> Behaviour:
    """Twenty bytes of the headers or of the body one every 0.5 s (10 s in all: a per-read
    timeout never fires), then the rest of a well-formed empty key set."""
    body = b'{"keys": []}'.ljust(20)

    def drip(conn: socket.socket, stopped: threading.Event, data: bytes) -> bool:
        for byte in data:
            if stopped.wait(0.5):
                return False
            conn.sendall(bytes([byte]))
        return True

    def behave(conn: socket.socket, stopped: threading.Event) -> None:
        if where == "headers":
            conn.sendall(b"HTTP/1.1 200 OK\r\n")
            if drip(conn, stopped, b"X-Slow: " + b"a" * 12):
                conn.sendall(f"\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        else:
            conn.sendall(f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n\r\n".encode())
            drip(conn, stopped, body)

    return behave


def hang_up(conn: socket.socket, stopped: threading.Event) -> None:
    conn.close()


# Helpers


@pytest.fixture(scope="module")
def own_key() -> Key:
    return ec_key()


def verifier_for(url: str, **options: Any) -> TokenVerifier:
    return TokenVerifier(issuer=ISSUER, audience=API_AUDIENCE, jwks_url=url, **options)


def run(verifier: TokenVerifier, token: str, mode: str) -> VerifiedToken:
    if mode == "sync":
        return verifier.verify(token)
    return asyncio.run(verifier.averify(token))


def unavailable(verifier: TokenVerifier, token: str, mode: str) -> VerificationUnavailable:
    with pytest.raises(VerificationUnavailable) as caught:
        run(verifier, token, mode)
    assert not isinstance(caught.value, InvalidToken)
    assert caught.value.retry_after >= 1
    return caught.value


def peak_rss() -> int:
    """The peak resident memory of this process so far, in bytes (Linux counts KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# Size


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "until-close"])
def test_a_150mb_jwks_is_unavailable_and_never_read_whole(
    own_key: Key, mode: str, declared: bool
) -> None:
    with hostile(huge(declared)) as server:
        before = peak_rss()
        error = unavailable(verifier_for(server.url), own_key.token(), mode)
        grown = peak_rss() - before
    assert "larger than" in error.reason
    assert grown < 16 * 1024 * 1024, f"peak memory grew by {grown // 1024 // 1024} MB"


# Time


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("where", ["headers", "body"])
def test_a_dripping_jwks_gives_up_at_the_deadline(own_key: Key, mode: str, where: str) -> None:
    with hostile(dripping(where)) as server:
        verifier = verifier_for(server.url, timeout=2)
        start = time.monotonic()
        unavailable(verifier, own_key.token(), mode)
        elapsed = time.monotonic() - start
        assert elapsed < 2 + 1, f"gave up after {elapsed:.1f} s"
        # The abandoned fetch does not linger on: the verifier hangs up (the drip would go
        # on for 10 s).
        wait_for(lambda: server.hangups == 1, timeout=3)


# Errors and garbage


def deep_json() -> bytes:
    return b'{"keys": ' + b"[" * 30_000 + b"]" * 30_000 + b"}"


ERRORS: dict[str, Callable[[Key], Behaviour]] = {
    "500": lambda key: answer(500, b"oops"),
    "503": lambda key: answer(503, b"", "Retry-After: 60"),
    "404": lambda key: answer(404, b"not found"),
    "redirect": lambda key: answer(302, b"", "Location: http://127.0.0.1:9/jwks"),
    "html": lambda key: answer(200, b"<html>maintenance</html>"),
    "not-a-key-set": lambda key: answer(200, b'{"kes": []}'),
    "keys-not-a-list": lambda key: answer(200, b'{"keys": {"a": 1}}'),
    "deep": lambda key: answer(200, deep_json()),
    "gzip": lambda key: answer(
        200, gzip.compress(json.dumps({"keys": [key.jwk()]}).encode()), "Content-Encoding: gzip"
    ),
    "truncated": lambda key: answer(200, b'{"keys": [', "Content-Length: 500"),
    "hang-up": lambda key: hang_up,
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", list(ERRORS))
def test_a_failing_jwks_is_unavailable_not_invalid(own_key: Key, mode: str, case: str) -> None:
    with hostile(ERRORS[case](own_key)) as server:
        error = unavailable(verifier_for(server.url), own_key.token(), mode)
    assert error.reason.startswith("JWKS unavailable")


def test_unreachable_jwks_is_unavailable_in_both_modes(own_key: Key) -> None:
    with hostile(hang_up) as server:
        url = server.url
    for mode in MODES:
        assert "unreachable" in unavailable(verifier_for(url), own_key.token(), mode).reason


# The refetch interval and stale-if-error


@pytest.mark.parametrize("mode", MODES)
def test_after_a_failed_fetch_an_unknown_kid_is_unavailable_until_a_fetch_succeeds(
    own_key: Key, mode: str
) -> None:
    with hostile(answer(500, b"")) as server:
        verifier = verifier_for(server.url, jwks_refetch_interval=0.5)
        unavailable(verifier, own_key.token(), mode)
        # Within the refetch interval nothing is fetched, and the failure still stands.
        unavailable(verifier, own_key.token(), mode)
        assert len(server.requests) == 1
        server.behave = jwks(own_key)
        time.sleep(0.6)
        assert run(verifier, own_key.token(), mode).jti
        other = ec_key("other")
        with pytest.raises(InvalidToken):
            run(verifier, other.token(), mode)  # the fetch worked: this kid is not ours


@pytest.mark.parametrize("mode", MODES)
def test_a_stale_key_set_serves_while_its_refresh_fails(own_key: Key, mode: str) -> None:
    with hostile(jwks(own_key)) as server:
        verifier = verifier_for(
            server.url, jwks_max_age=0.2, jwks_refetch_interval=0, jwks_stale_if_error=60
        )
        assert run(verifier, own_key.token(), mode)
        server.behave = answer(500, b"")
        time.sleep(0.3)
        assert run(verifier, own_key.token(), mode)
        assert len(server.requests) == 2  # the refresh was tried, and failed
        # A kid the stale set lacks may be a new key: no verdict.
        unavailable(verifier, ec_key("new").token(), mode)


@pytest.mark.parametrize("mode", MODES)
def test_stale_if_error_is_bounded(own_key: Key, mode: str) -> None:
    with hostile(jwks(own_key)) as server:
        verifier = verifier_for(
            server.url, jwks_max_age=0.2, jwks_refetch_interval=0, jwks_stale_if_error=0.3
        )
        assert run(verifier, own_key.token(), mode)
        server.behave = answer(500, b"")
        time.sleep(0.6)
        unavailable(verifier, own_key.token(), mode)


@pytest.mark.parametrize("mode", MODES)
def test_a_stale_key_dropped_by_a_successful_refresh_is_refused(own_key: Key, mode: str) -> None:
    # stale-if-error is for outages only: a key the server no longer publishes is gone.
    with hostile(jwks(own_key)) as server:
        verifier = verifier_for(
            server.url, jwks_max_age=0.2, jwks_refetch_interval=0, jwks_stale_if_error=60
        )
        assert run(verifier, own_key.token(), mode)
        server.behave = jwks(ec_key("successor"))
        time.sleep(0.3)
        with pytest.raises(InvalidToken):
            run(verifier, own_key.token(), mode)


def test_after_a_cancelled_fetch_tokens_are_unavailable_not_invalid(own_key: Key) -> None:
    # A request cancelled mid-fetch (its client went away) still counts as an attempt, so
    # the next one is an interval away; meanwhile good tokens are not called invalid.
    with hostile(dripping("body")) as server:
        verifier = verifier_for(server.url)

        async def cancelled_then_again() -> VerifiedToken:
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(verifier.averify(own_key.token()), 0.2)
            return await verifier.averify(own_key.token())

        with pytest.raises(VerificationUnavailable):
            asyncio.run(cancelled_then_again())
        assert len(server.requests) == 1
