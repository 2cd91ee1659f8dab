"""What the form-posting OAuth endpoints share (token, revocation, introspection): the ASGI
plumbing around their ``handle``, and one way to answer, audit and count a refusal."""

from __future__ import annotations

import logging
from typing import Any

from leanauth import metrics, requestid
from leanauth.audit import Attempt, AuditTrail
from leanauth.endpoints.form import Receive, Scope
from leanauth.errors import NO_STORE_HEADERS, OAuthError, ServerError
from leanauth.safetext import bounded
from leanauth.throttle import MAX_CLIENT_ID, SourceAddress

log = logging.getLogger("leanauth.oauth")

Send = Any


class OAuthEndpoint:
    """An ASGI endpoint answering a form POST with JSON; subclasses implement :meth:`handle`,
    which returns the body of a 200 or raises the :class:`OAuthError` to answer."""

    audit_kind = "oauth"

    def __init__(self, audit: AuditTrail, source_address: SourceAddress) -> None:
        self._audit = audit
        self._source_address = source_address

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        attempt = Attempt(self._source_address.of_request(scope))
        try:
            status, body, headers = 200, await self.handle(scope, receive, attempt), []
        except OAuthError as error:
            self._refused(error, attempt)
            status, body, headers = error.status_code, error.body(), error.extra_headers_list()
        except Exception:
            log.exception("%s request failed", self.audit_kind)
            failure = ServerError()
            self._refused(failure, attempt)
            status, body, headers = failure.status_code, failure.body(), []
        headers = [*NO_STORE_HEADERS, *headers, (b"content-length", str(len(body)).encode())]
        request_id = requestid.CURRENT.get()
        if request_id is not None:
            headers.append((requestid.HEADER, request_id.encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def handle(self, scope: Scope, receive: Receive, attempt: Attempt) -> bytes:
        raise NotImplementedError

    def _refused(self, error: OAuthError, attempt: Attempt) -> None:
        """Audit and count every refusal, keeping only a bounded, escaped piece of the
        request's text (none in the count: its scope only as a class). A client id that
        failed authentication is attacker-chosen text too."""
        metrics.refused(self.audit_kind, error.error, attempt.scope)
        detail: dict[str, object] = {"scope": bounded(attempt.scope)} if attempt.scope else {}
        if error.detail:
            detail["reason"] = bounded(error.detail)
        self._audit.record(
            self.audit_kind,
            error.error,
            bounded(attempt.client_id, MAX_CLIENT_ID),
            attempt.source,
            detail or None,
        )
