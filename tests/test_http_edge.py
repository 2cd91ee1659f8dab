"""The HTTP edge, spoken to with raw sockets: what reaches the server byte by byte and what
comes back, including from clients that do not behave."""

from __future__ import annotations

import socket
import time
from urllib.parse import urlencode

from conftest import AppCredentials, Server


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
