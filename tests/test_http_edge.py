"""The HTTP edge, spoken to with raw sockets: what reaches the server byte by byte and what
comes back, including from clients that do not behave."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator
from urllib.parse import urlencode

import httpx
import pytest

from conftest import (
    AppCredentials,
    Env,
    Server,
    known_app,
    request_token,
    serving,
    wait_for,
)


def connect(server: Server, timeout: float = 10) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def read_response(sock: socket.socket, buffer: bytearray, head_only: bool = False) -> bytes:
    """One whole response from ``sock`` (``buffer`` keeps what arrived after it)."""
    while b"\r\n\r\n" not in buffer:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed after {bytes(buffer)!r}")
        buffer += chunk
    head, _, _ = bytes(buffer).partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    if head_only:
        length = 0
    end = len(head) + 4 + length
    while len(buffer) < end:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed after {bytes(buffer)!r}")
        buffer += chunk
    response = bytes(buffer[:end])
    del buffer[:end]
    return response


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def token_request(creds: AppCredentials, extra_headers: bytes = b"") -> bytes:
    body = urlencode(
        {
            "grant_type": "client_credentials",
            "client_id": creds.client_id,
            "client_secret": creds.client_secret,
            "scope": "api",
        }
    ).encode()
    return (
        b"POST /oauth2/token HTTP/1.1\r\nHost: localhost\r\n"
        b"Content-Type: application/x-www-form-urlencoded\r\n"
        + extra_headers
        + b"Content-Length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )


def test_keep_alive_connection_serves_requests_in_turn(server: Server, app: AppCredentials) -> None:
    with connect(server) as sock:
        buffer = bytearray()
        for _ in range(3):
            sock.sendall(token_request(app))
            response = read_response(sock, buffer)
            assert status_of(response) == 200
            assert response.endswith(b"}")
            assert b"access_token" in response
        assert buffer == b""


def test_pipelined_requests_are_answered_in_order(server: Server, app: AppCredentials) -> None:
    with connect(server) as sock:
        sock.sendall(token_request(app) + b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        buffer = bytearray()
        first, second = read_response(sock, buffer), read_response(sock, buffer)
    assert status_of(first) == 200
    assert b"access_token" in first
    assert status_of(second) == 200
    assert b"access_token" not in second


def test_head_request_gets_a_head_and_no_body(server: Server) -> None:
    with connect(server) as sock:
        sock.sendall(b"HEAD /oauth2/jwks HTTP/1.1\r\nHost: x\r\n\r\n")
        buffer = bytearray()
        response = read_response(sock, buffer, head_only=True)
        assert status_of(response) == 200
        # The connection stays usable, and no body bytes were left on it.
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status_of(read_response(sock, buffer)) == 200
        assert buffer == b""


def test_expect_100_continue_gets_the_interim_response_first(
    server: Server, app: AppCredentials
) -> None:
    request = token_request(app, b"Expect: 100-continue\r\n")
    head, _, body = request.partition(b"\r\n\r\n")
    with connect(server) as sock:
        sock.sendall(head + b"\r\n\r\n")
        buffer = bytearray()
        time.sleep(0.2)
        interim = read_response(sock, buffer, head_only=True)
        assert status_of(interim) == 100
        sock.sendall(body)
        final = read_response(sock, buffer)
    assert status_of(final) == 200
    assert b"access_token" in final


def test_response_leaves_in_one_piece(server: Server, app: AppCredentials) -> None:
    """The head and body of a small response are written together: the first read after
    the request finds the whole response (a head written alone would arrive first, and
    alone, on a loopback socket read as soon as anything is there)."""
    with connect(server) as sock:
        whole = 0
        for _ in range(20):
            sock.sendall(token_request(app))
            first = sock.recv(65536)
            buffer = bytearray(first)
            response = read_response(sock, buffer)
            whole += len(first) == len(response)
    assert whole >= 18


# Hostile clients, against a server with short deadlines (the defaults are 10 s).
DEADLINE = 1.0


@pytest.fixture(scope="module")
def strict(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    env = Env(
        tmp_path_factory.mktemp("edge"),
        {
            "LEANAUTH_HEADER_TIMEOUT": str(DEADLINE),
            "LEANAUTH_BODY_TIMEOUT": str(DEADLINE),
            "LEANAUTH_MAX_CONNECTIONS": "20",
        },
    )
    with serving(env) as running:
        yield running


@pytest.fixture(scope="module")
def strict_app(strict: Server) -> AppCredentials:
    return known_app(strict.env, strict, "--scopes", "api")


def read_until_closed(sock: socket.socket, limit: float = 10) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and how long it took."""
    started = time.monotonic()
    sock.settimeout(limit)
    received = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            received += chunk
    return received, time.monotonic() - started


def test_oversized_head_is_refused_431(strict: Server) -> None:
    with connect(strict) as sock:
        sock.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 64 * 1024 + b"\r\n\r\n")
        received, _ = read_until_closed(sock)
    assert status_of(received) == 431


def test_many_headers_past_the_limit_are_refused_431(strict: Server) -> None:
    headers = b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 100) for i in range(200))
    with connect(strict) as sock:
        sock.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n")
        received, _ = read_until_closed(sock)
    assert status_of(received) == 431


def test_endless_head_is_cut_off_before_it_ends(strict: Server) -> None:
    """A head that never ends is answered once it passes the limit: the server does not
    buffer it (three such clients once raised a server's memory by 180 MB)."""
    with connect(strict) as sock:
        sock.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\nX-Endless: ")
        sent = 0
        with contextlib.suppress(OSError):
            while sent < 10 * 1024 * 1024:
                sock.sendall(b"a" * 8192)
                sent += 8192
        received, _ = read_until_closed(sock)
    assert sent < 10 * 1024 * 1024
    assert status_of(received) == 431


def test_head_within_the_limit_is_served(strict: Server) -> None:
    with connect(strict) as sock:
        sock.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\nX-Ok: " + b"a" * 12 * 1024 + b"\r\n\r\n")
        assert status_of(read_response(sock, bytearray())) == 200


def test_slow_head_is_cut_off_408(strict: Server) -> None:
    """Slowloris: a byte every 0.2 s keeps no connection open past the header deadline."""
    with connect(strict) as sock:
        started = time.monotonic()
        request = b"GET /livez HTTP/1.1\r\nHost: x\r\n" + b"X-Slow: " + b"a" * 200
        with contextlib.suppress(OSError):
            for byte in request:
                sock.sendall(bytes([byte]))
                time.sleep(0.2)
                if time.monotonic() - started > 10:
                    break
        received, _ = read_until_closed(sock)
        elapsed = time.monotonic() - started
    assert status_of(received) == 408
    assert elapsed < DEADLINE + 3


def test_silent_connection_is_closed(strict: Server) -> None:
    with connect(strict) as sock:
        received, waited = read_until_closed(sock)
    assert status_of(received) == 408
    assert DEADLINE - 0.2 < waited < DEADLINE + 3


def test_slow_body_is_cut_off_408(strict: Server, strict_app: AppCredentials) -> None:
    request = token_request(strict_app)
    head, _, body = request.partition(b"\r\n\r\n")
    with connect(strict) as sock:
        sock.sendall(head + b"\r\n\r\n" + body[:5])
        received, waited = read_until_closed(sock)
    assert status_of(received) == 408
    assert waited < DEADLINE + 3


def test_idle_keep_alive_then_slow_second_request(strict: Server) -> None:
    """The header deadline restarts with each request on a kept-alive connection."""
    with connect(strict) as sock:
        buffer = bytearray()
        for _ in range(3):
            sock.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n")
            assert status_of(read_response(sock, buffer)) == 200
            time.sleep(DEADLINE / 2)
        sock.sendall(b"GET /livez HTTP/1.1\r\n")
        received, waited = read_until_closed(sock)
    assert status_of(received) == 408
    assert waited < DEADLINE + 3


def test_content_length_with_transfer_encoding_is_refused(
    strict: Server, strict_app: AppCredentials
) -> None:
    """RFC 9112 §6.1: a request with both is a smuggling attempt, answered 400 and closed."""
    request = token_request(strict_app, b"Transfer-Encoding: chunked\r\n")
    with connect(strict) as sock:
        sock.sendall(request)
        received, _ = read_until_closed(sock)
    assert status_of(received) == 400
    assert b"access_token" not in received


def test_connections_past_the_cap_get_503_and_others_are_served(
    strict: Server, strict_app: AppCredentials
) -> None:
    idle = [connect(strict) for _ in range(20)]
    try:
        with connect(strict) as sock:
            sock.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n")
            assert status_of(read_response(sock, bytearray())) == 503
    finally:
        for sock in idle:
            sock.close()

    def served() -> bool:
        return request_token(strict, strict_app).status_code == 200

    wait_for(served, timeout=5)


def test_slow_clients_do_not_hold_up_the_others(strict: Server, strict_app: AppCredentials) -> None:
    slow = [connect(strict) for _ in range(10)]
    try:
        for sock in slow:
            sock.sendall(
                b"POST /oauth2/token HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n"
                b"Content-Type: application/x-www-form-urlencoded\r\n\r\n"
            )
        form = {
            "grant_type": "client_credentials",
            "client_id": strict_app.client_id,
            "client_secret": strict_app.client_secret,
            "scope": "api",
        }
        with httpx.Client(timeout=10) as client:
            for _ in range(20):
                assert client.post(strict.token_url, data=form).status_code == 200
        # The slow ones were still waiting, and are cut off in their turn.
        for sock in slow:
            assert status_of(read_until_closed(sock)[0]) == 408
    finally:
        for sock in slow:
            sock.close()
