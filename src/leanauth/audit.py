"""The audit trail: every authentication attempt and token issued, every revocation,
introspection and admin change — what happened, to which client, from where; never a
secret or a token.

Request handlers only append to an in-memory queue; a background flush writes batches to
the store and emits them as structured log lines (``LEANAUTH_AUDIT_LOG``). The trail must
survive what attackers and outages do to it:

- attacker-chosen text reaches it bounded and escaped (the endpoints see to that, and
  :meth:`AuditTrail.record` caps any row at ``MAX_ROW_CHARS``);
- the queue is bounded in bytes, not only in events: while the store is down it keeps what
  fits and counts what it drops;
- a record the database refuses (bad data) is isolated and dropped, alone: it never holds
  back the records after it;
- refusals (which anyone can cause) become at most ``MAX_REFUSAL_LINES`` log lines a flush;
  the rest are counted in one line. Every record still goes to the database.

- a worker that dies loses none: each record is written to the worker's journal
  (:mod:`leanauth.journal`) before its response is sent, and a dead worker's journal is taken
  over by the next worker to flush.

Nothing is lost silently: dropped and refused records are counted (``dropped``,
``rejected``) and logged at error level.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass

import orjson

from leanauth import journal, requestid
from leanauth.journal import Journal
from leanauth.safetext import MAX_FIELD, bounded
from leanauth.store.base import AuditStore, RejectedRecords
from leanauth.store.models import AuditEvent

log = logging.getLogger("leanauth.audit")

# Memory the queue may hold per process by default (LEANAUTH_AUDIT_QUEUE_MB); what is counted
# is an estimate: the characters plus the objects' overhead.
MAX_QUEUED_BYTES = 64 * 1024 * 1024
# What an event costs beyond its text: the tuple, the detail dict, the string headers.
EVENT_OVERHEAD = 400
MAX_ROW_CHARS = 2048
MAX_DETAIL_ITEMS = 8
MAX_BATCH = 5_000
MAX_REFUSAL_LINES = 100
# Outcomes worth a log line under LEANAUTH_AUDIT_LOG=failures: everything but routine success.
ROUTINE_OUTCOMES = frozenset({"issued", "active", "inactive", "revoked", "not_revoked"})


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def _size(client_id: str | None, source: str | None, detail: dict[str, object] | None) -> int:
    """Characters of an event's text (numbers count 8; detail names are the caller's own
    short words and are not counted)."""
    size = len(client_id or "") + len(source or "")
    if detail is not None:
        for value in detail.values():
            size += len(value) if isinstance(value, str) else 8
    return size


def _bounded_detail(detail: dict[str, object]) -> dict[str, object]:
    items = list(detail.items())[:MAX_DETAIL_ITEMS]
    return {
        str(bounded(name)): bounded(value) if isinstance(value, str) else value
        for name, value in items
    }


@dataclass(slots=True)
class Attempt:
    """What is known of a request so far, for its audit record and the throttle. Until the
    client has authenticated, ``client_id`` and ``scope`` are the request's own text."""

    source: str = "unknown"
    client_id: str | None = None
    scope: str | None = None


class AuditTrail:
    def __init__(
        self,
        store: AuditStore,
        log_mode: str,
        max_queued_bytes: int = MAX_QUEUED_BYTES,
        journal: Journal | None = None,
    ) -> None:
        self._store = store
        self._log_mode = log_mode
        self._max_queued_bytes = max_queued_bytes
        # (event, its estimated size, its sequence number in this process)
        self._queue: deque[tuple[AuditEvent, int, int]] = deque()
        self._queued_bytes = 0
        self._journal = journal
        # Appends (event loop) and the flush (a thread) agree under this lock on which
        # records the journal holds and which are still queued.
        self._lock = threading.Lock()
        self._next_seq = 0
        self._sealed_before = 0  # the first sequence number after the journal's last seal
        self.dropped = 0  # records that did not fit in the queue
        self.rejected = 0  # records the database refused
        self._unreported = Counter[str]()
        self._refusal_lines = 0  # refusal log lines in this flush
        self._reported_failures = 0  # journal failures logged so far

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def unjournaled(self) -> int:
        """Records that could not be written to the journal (a full disk, say)."""
        return self._journal.failures if self._journal is not None else 0

    def record(
        self,
        kind: str,
        outcome: str,
        client_id: str | None = None,
        source: str | None = None,
        detail: dict[str, object] | None = None,
    ) -> None:
        """Queue one event, and write it to the journal, before the response it describes
        is sent (cheap: the hot path calls this). Detail names are the caller's own words;
        values may be request text (bounded by the caller, and here again when a row would
        pass ``MAX_ROW_CHARS``)."""
        request_id = requestid.CURRENT.get()
        if request_id is not None:
            detail = {**detail, "request_id": request_id} if detail else {"request_id": request_id}
        size = _size(client_id, source, detail)
        if size > MAX_ROW_CHARS or (detail is not None and len(detail) > MAX_DETAIL_ITEMS):
            client_id, source = bounded(client_id), bounded(source)
            detail = _bounded_detail(detail) if detail else detail
            size = _size(client_id, source, detail)
        size += EVENT_OVERHEAD
        if self._queued_bytes + size > self._max_queued_bytes:
            self.dropped += 1
            self._unreported["dropped"] += 1
            return
        event = AuditEvent(now_ms(), kind, outcome, client_id, source, detail)
        line = journal.encode(event) if self._journal is not None else b""
        with self._lock:
            seq = self._next_seq
            self._next_seq += 1
            if self._journal is not None:
                self._journal.append(seq, line)
            self._queued_bytes += size
            self._queue.append((event, size, seq))

    def take_over_orphans(self) -> Counter[str]:
        """Queue the records of journal segments whose process died (blocking); the tokens
        they record as issued, per app, for the usage counts they never reached."""
        issued = Counter[str]()
        if self._journal is None:
            return issued
        for orphan in self._journal.orphans():
            with self._lock:
                for event in orphan.events:
                    size = _size(event.client_id, event.source, event.detail) + EVENT_OVERHEAD
                    self._queue.append((event, size, self._next_seq))
                    self._queued_bytes += size
                    self._next_seq += 1
                self._journal.adopt(orphan, self._next_seq - 1)
            for event in orphan.events:
                if event.kind == "token" and event.outcome == "issued" and event.client_id:
                    issued[event.client_id] += 1
            log.warning(
                "took over %d audit records left by a stopped process (%s)%s",
                len(orphan.events),
                orphan.path.name,
                f"; {orphan.unreadable} unreadable lines skipped" if orphan.unreadable else "",
            )
        return issued

    def seal_journal(self) -> None:
        """Start a new journal segment before a flush, which then writes the records up to
        here (not those of the new segment: a worker dying after the flush would leave them
        to be written again) and can release the segments they were in."""
        if self._journal is not None:
            with self._lock:
                self._journal.seal()
                self._sealed_before = self._next_seq
            self._journal.sync()

    def release_journal(self) -> None:
        """Delete the journal segments whose records are all in the database."""
        if self._journal is not None:
            with self._lock:
                self._journal.release(self._oldest_unwritten())

    def close_journal(self) -> None:
        """At exit, after the last flush: what the database did not take stays on disk for
        the next worker to take over."""
        if self._journal is None:
            return
        self._journal.sync()
        with self._lock:
            waiting = self._journal.close(self._oldest_unwritten())
        if waiting:
            log.warning(
                "%d audit records wait in %d journal segments for the next start",
                len(self._queue),
                waiting,
            )

    def _oldest_unwritten(self) -> int:
        return self._queue[0][2] if self._queue else self._next_seq

    def flush(self, everything: bool = False) -> int:
        """Write queued events to the store and the log (blocking); the number written:
        with a journal, those queued before its last seal, unless ``everything`` (at exit).

        A store that cannot be reached raises :class:`~leanauth.store.base.StoreError`
        after putting back what it did not take, for the next flush."""
        written = 0
        self._refusal_lines = 0
        until = None if everything or self._journal is None else self._sealed_before
        try:
            while batch := self._take(until):
                written += self._write(batch)
        finally:
            self._report_losses()
        return written

    def _take(self, until: int | None) -> list[tuple[AuditEvent, int, int]]:
        """Up to ``MAX_BATCH`` queued events, of sequence numbers below ``until`` (if set)."""
        batch: list[tuple[AuditEvent, int, int]] = []
        queue = self._queue
        while queue and len(batch) < MAX_BATCH and (until is None or queue[0][2] < until):
            batch.append(queue.popleft())
        self._queued_bytes -= sum(size for _, size, _ in batch)
        return batch

    def _write(self, batch: list[tuple[AuditEvent, int, int]]) -> int:
        """Write ``batch``; a refused part is split until the refused records stand alone,
        and those are dropped. On any other failure what is unwritten goes back on the
        queue, in order."""
        written = 0
        pending = [batch]
        while pending:
            part = pending.pop()
            try:
                self._store.add_audit_events([event for event, _, _ in part])
            except RejectedRecords as exc:
                if len(part) > 1:
                    middle = len(part) // 2
                    pending += [part[middle:], part[:middle]]
                    continue
                self._reject(part[0][0], exc)
                continue
            except Exception:
                unwritten = [item for chunk in reversed(pending) for item in chunk]
                for item in reversed(part + unwritten):
                    self._queue.appendleft(item)
                    self._queued_bytes += item[1]
                raise
            self._log([event for event, _, _ in part])
            written += len(part)
        return written

    def _reject(self, event: AuditEvent, error: RejectedRecords) -> None:
        self.rejected += 1
        self._unreported["rejected"] += 1
        log.error(
            "the database refused an audit record (%s %s of %s): %s; it is dropped",
            event.kind,
            event.outcome,
            bounded(event.client_id) or "-",
            bounded(str(error), MAX_FIELD),
        )

    def _report_losses(self) -> None:
        if self._unreported["dropped"]:
            log.error(
                "audit queue full (%d MiB): %d records were dropped",
                self._max_queued_bytes // (1024 * 1024),
                self._unreported["dropped"],
            )
        if self._journal is not None and self._journal.failures > self._reported_failures:
            log.error(
                "%d audit records could not be written to the journal (its folder is full or "
                "not writable): until the flush writes them they are in memory only",
                self._journal.failures - self._reported_failures,
            )
            self._reported_failures = self._journal.failures
        if self._unreported["suppressed"]:
            log.warning(
                "%d more refusals were recorded but not logged (see `leanauth audit list`)",
                self._unreported["suppressed"],
            )
        self._unreported.clear()

    def _log(self, events: Sequence[AuditEvent]) -> None:
        if self._log_mode == "none":
            return
        for event in events:
            routine = event.outcome in ROUTINE_OUTCOMES
            if self._log_mode == "failures" and routine:
                continue
            if event.kind != "admin" and not routine:
                self._refusal_lines += 1
                if self._refusal_lines > MAX_REFUSAL_LINES:
                    self._unreported["suppressed"] += 1
                    continue
            record = audit_record(event)
            log.info("%s", orjson.dumps(record).decode(), extra={"audit": record})


def audit_record(event: AuditEvent) -> dict[str, object]:
    seconds, millis = divmod(event.at_ms, 1000)
    return {
        "audit": event.kind,
        "outcome": event.outcome,
        "client_id": event.client_id,
        "source": event.source,
        # The event's own time (the line is written up to a second later, by the flush).
        "at": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z",
        "at_ms": event.at_ms,
        **(event.detail or {}),
    }
