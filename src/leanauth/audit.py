"""The audit trail: every authentication attempt and token issued, every revocation,
introspection and admin change — what happened, to which client, from where; never a
secret or a token.

Request handlers only append to an in-memory queue; a background flush writes batches to
the store and emits them as structured log lines (``LEANAUTH_AUDIT_LOG``). If the store is
down the queue keeps what it can (bounded) and retries.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Literal

import orjson

from leanauth.store.base import Store
from leanauth.store.models import AuditEvent

log = logging.getLogger("leanauth.audit")

MAX_QUEUED = 200_000
MAX_BATCH = 5_000
# Outcomes worth a log line under LEANAUTH_AUDIT_LOG=failures: everything but routine success.
ROUTINE_OUTCOMES = frozenset({"issued", "active", "inactive", "revoked", "not_revoked"})

AuditLogMode = Literal["all", "failures", "none"]


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class AuditTrail:
    def __init__(self, store: Store, log_mode: str) -> None:
        self._store = store
        self._log_mode = log_mode
        self._queue: deque[AuditEvent] = deque(maxlen=MAX_QUEUED)
        self.dropped = 0

    def record(
        self,
        kind: str,
        outcome: str,
        client_id: str | None = None,
        source: str | None = None,
        detail: dict[str, object] | None = None,
    ) -> None:
        """Queue one event (cheap: the hot path calls this)."""
        if len(self._queue) == MAX_QUEUED:
            self.dropped += 1
        self._queue.append(AuditEvent(now_ms(), kind, outcome, client_id, source, detail))

    def flush(self) -> int:
        """Write queued events to the store and the log (blocking); the number written."""
        written = 0
        while self._queue:
            batch = [self._queue.popleft() for _ in range(min(MAX_BATCH, len(self._queue)))]
            try:
                self._store.add_audit_events(batch)
            except Exception:
                self._queue.extendleft(reversed(batch))
                raise
            self._log(batch)
            written += len(batch)
        if self.dropped:
            log.error("audit queue overflowed: %d events were dropped", self.dropped)
            self.dropped = 0
        return written

    def _log(self, events: list[AuditEvent]) -> None:
        if self._log_mode == "none":
            return
        for event in events:
            if self._log_mode == "failures" and event.outcome in ROUTINE_OUTCOMES:
                continue
            log.info("%s", orjson.dumps(audit_record(event)).decode())


def audit_record(event: AuditEvent) -> dict[str, object]:
    return {
        "audit": event.kind,
        "outcome": event.outcome,
        "client_id": event.client_id,
        "source": event.source,
        "at_ms": event.at_ms,
        **(event.detail or {}),
    }
