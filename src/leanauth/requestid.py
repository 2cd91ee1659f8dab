"""Request ids: every request gets one, returned in ``X-Request-Id`` and carried by the log
lines and audit records it causes, so that a client's complaint ("request 5f3c… was
refused") leads to the records.

From a trusted proxy (``LEANAUTH_TRUSTED_PROXIES``) an incoming ``X-Request-Id``, else the
trace id of a W3C ``traceparent``, names the request instead, so one id follows it through
the proxy's logs and these. From anyone else they are ignored: a client could otherwise
plant misleading ids, or log-forging text, in the records.
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

CURRENT: ContextVar[str | None] = ContextVar("leanauth_request_id", default=None)

HEADER = b"x-request-id"
_INCOMING_ID = re.compile(rb"[A-Za-z0-9._:@/+=-]{1,128}")
# version-traceid-parentid-flags, with a trace id that is not all zeros (W3C Trace Context).
_TRACEPARENT = re.compile(rb"[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}")


class RequestIds:
    """Makes and adopts request ids. A new id is this process's random prefix and a
    counter: unique across processes and nodes, and cheaper than random bytes per request."""

    def __init__(self, trusts: Callable[[str], bool] | None = None) -> None:
        self._trusts = trusts
        self._prefix = os.urandom(6).hex()
        self._counter = itertools.count(1)

    def assign(self, scope: dict[str, Any]) -> bytes:
        """The request's id, also made current for what the request logs and audits."""
        request_id = None
        if self._trusts is not None:
            client = scope.get("client")
            if client and self._trusts(client[0]):
                request_id = adopted(scope["headers"])
        if request_id is None:
            request_id = f"{self._prefix}{next(self._counter):08x}"
        CURRENT.set(request_id)
        return request_id.encode()


def adopted(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The id a trusted proxy gave the request, if it gave a well-formed one."""
    traceparent = None
    for name, value in headers:
        if name == HEADER and _INCOMING_ID.fullmatch(value):
            return value.decode()
        if name == b"traceparent":
            traceparent = _TRACEPARENT.fullmatch(value)
    if traceparent is not None and traceparent.group(1) != b"0" * 32:
        return traceparent.group(1).decode()
    return None


def sending_id(send: Any, request_id: bytes) -> Any:
    """``send``, adding the ``X-Request-Id`` header to the response's head."""

    async def send_with_id(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", ()), (HEADER, request_id)]}
        await send(message)

    return send_with_id
