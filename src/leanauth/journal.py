"""Each worker's audit journal: an append-only local copy of the audit records it has queued
for the database, so that a worker that dies at any moment (kill -9, the OOM killer, a
crash) loses none of the records of the tokens it handed out.

Why: records wait in memory for the background flush (once a second, longer while the
database is away); a worker that dies takes them with it. So every record is also written
to a file, with one ``write`` (about 1.5 µs), before the response it describes is sent. The
data is then in the kernel's page cache: it survives the process. A power loss can still
take what was written after the last flush synced its segment (about a second's records).

Files: the folder holds segments named ``<database tag>-<pid>-<n>.journal``, one line of
JSON per record. The writing process holds an ``flock`` on each of its segments for as long
as it lives; each flush starts a new segment, and a segment goes once all its records are in
the database. A segment whose lock can be taken belongs to a process that died: the next
worker of the same database to flush takes it over (its records join that worker's queue)
and deletes it once they are written. The tag keeps installations that share a folder apart.

Delivery is at least once: a worker that dies between a flush's commit and the deletion of
the segment it wrote (a few milliseconds a second) leaves records that are written twice.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson
from sqlalchemy import make_url

from leanauth.store.engine import fsync_directory
from leanauth.store.models import AuditEvent

log = logging.getLogger("leanauth.journal")

SUFFIX = ".journal"
# A segment is made under a name no other process adopts, locked, then renamed: a segment
# found under its final name is always locked by its writer while that one lives.
PENDING_PREFIX = ".pending-"
# A folder of orphans from a long outage is taken over a part at a time (bounded memory).
MAX_ADOPTED_BYTES = 16 * 1024 * 1024


def database_tag(database_url: str) -> str:
    """A short name for the database a journal belongs to (its URL without the password;
    an SQLite file by its absolute path)."""
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite" and url.database:
        identity = "sqlite:" + str(Path(url.database).resolve())
    else:
        identity = url.render_as_string(hide_password=True)
    return hashlib.sha256(identity.encode()).hexdigest()[:12]


def ensure_folder(folder: Path) -> None:
    """Make the folder (0700: records name clients and addresses) and check that this
    process can write in it; :class:`JournalUnavailable` says why not."""
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        probe = folder / f"{PENDING_PREFIX}probe-{os.getpid()}"
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600))
        os.unlink(probe)
    except OSError as exc:
        raise JournalUnavailable(f"{folder}: {exc.strerror or exc}") from None


def encode(event: AuditEvent) -> bytes:
    """One journal line (orjson escapes newlines inside strings: a line is a record)."""
    fields = (event.at_ms, event.kind, event.outcome, event.client_id, event.source, event.detail)
    return orjson.dumps(fields) + b"\n"


def decode(line: bytes) -> AuditEvent | None:
    """The record of a journal line; None for a line that is not one (a torn last write of
    a killed process: its response was never sent)."""
    try:
        at_ms, kind, outcome, client_id, source, detail = orjson.loads(line)
    except (orjson.JSONDecodeError, TypeError, ValueError):
        return None
    if not (isinstance(at_ms, int) and isinstance(kind, str) and isinstance(outcome, str)):
        return None
    if not isinstance(detail, dict | None):
        return None
    return AuditEvent(
        at_ms,
        kind,
        outcome,
        client_id if isinstance(client_id, str) else None,
        source if isinstance(source, str) else None,
        detail,
    )


@dataclass
class Segment:
    path: Path
    fd: int
    last_seq: int = -1  # sequence number of the last record in it; -1: none yet
    synced: bool = False
    size: int = 0  # bytes of whole records


@dataclass
class Orphan:
    """A dead process's segment, locked by this one: its records, to be queued again."""

    path: Path
    fd: int
    events: list[AuditEvent]
    unreadable: int
    size: int


class Journal:
    """The segments of one process. Not thread-safe: the audit trail calls it under its own
    lock (appends come from the event loop, the flush runs in a thread)."""

    def __init__(self, folder: Path, tag: str) -> None:
        self._folder = folder
        self._tag = tag
        self._serial = 0
        ensure_folder(folder)
        try:
            self._current = self._new_segment()
        except OSError as exc:
            raise JournalUnavailable(f"{folder}: {exc.strerror or exc}") from None
        self._sealed: list[Segment] = []
        self.failures = 0  # records that could not be written to the journal

    @property
    def segments(self) -> int:
        return 1 + len(self._sealed)

    def _new_segment(self) -> Segment:
        self._serial += 1
        name = f"{self._tag}-{os.getpid()}-{self._serial}{SUFFIX}"
        pending = self._folder / (PENDING_PREFIX + name)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC
        fd = os.open(pending, flags, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            final = self._folder / name
            os.rename(pending, final)
        except OSError:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(pending)
            raise
        return Segment(final, fd)

    def append(self, seq: int, line: bytes) -> None:
        """Write one record; a failure (a full disk) is counted, and the record stays in the
        queue: only its protection against a crash is lost."""
        segment = self._current
        try:
            written = os.write(segment.fd, line)
            if written != len(line):
                # The disk filled up mid-record: cut the torn line off, or the next record
                # written once there is space again would be glued to it.
                os.ftruncate(segment.fd, segment.size)
                raise OSError(errno.ENOSPC, "a partial write")
        except OSError:
            self.failures += 1
            return
        segment.size += written
        segment.last_seq = seq

    def seal(self) -> None:
        """Start a new segment, if the current one holds records: the flush about to run
        can then release the sealed ones it covers."""
        if self._current.last_seq < 0:
            return
        try:
            fresh = self._new_segment()
        except OSError as exc:
            log.error("cannot start a new audit journal segment (appending on): %s", exc)
            return
        self._sealed.append(self._current)
        self._current = fresh

    def sync(self) -> None:
        """Put the sealed segments on disk (called by the flush, outside the lock: only the
        flush touches sealed segments), so that a power loss takes at most the records of
        the current one."""
        unsynced = [segment for segment in self._sealed if not segment.synced]
        if not unsynced:
            return
        try:
            for segment in unsynced:
                os.fdatasync(segment.fd)
                segment.synced = True
            fsync_directory(self._folder)
        except OSError as exc:
            log.error("cannot sync the audit journal: %s", exc)

    def release(self, oldest_unwritten: int) -> None:
        """Delete the sealed segments whose records are all in the database (sequence
        numbers below ``oldest_unwritten``)."""
        kept = []
        for segment in self._sealed:
            if segment.last_seq < oldest_unwritten:
                _delete(segment.path, segment.fd)
            else:
                kept.append(segment)
        self._sealed = kept

    def adopt(self, orphan: Orphan, last_seq: int) -> None:
        """Keep an orphan's file (and its lock) until its records, now queued here with
        sequence numbers up to ``last_seq``, are written."""
        self._sealed.append(Segment(orphan.path, orphan.fd, last_seq, synced=True))

    def close(self, oldest_unwritten: int) -> int:
        """At exit: delete the segments whose records are all in the database and let go
        of the others (they wait for the next worker); how many wait."""
        waiting = 0
        for segment in [*self._sealed, self._current]:
            if segment.last_seq < oldest_unwritten:
                _delete(segment.path, segment.fd)
            else:
                with contextlib.suppress(OSError):
                    os.fdatasync(segment.fd)
                os.close(segment.fd)
                waiting += 1
        self._sealed = []
        return waiting

    def orphans(self) -> Iterator[Orphan]:
        """Segments of this database whose writer is gone, each locked for this process;
        at most about ``MAX_ADOPTED_BYTES`` of them per call."""
        budget = MAX_ADOPTED_BYTES
        try:
            names = sorted(os.listdir(self._folder))
        except OSError:
            return
        for name in names:
            if budget <= 0:
                return
            pending = name.startswith(PENDING_PREFIX + self._tag + "-")
            if not (pending or (name.startswith(self._tag + "-") and name.endswith(SUFFIX))):
                continue
            orphan = _lock_orphan(self._folder / name)
            if orphan is None:
                continue
            if pending or not orphan.events:
                _delete(orphan.path, orphan.fd)
                continue
            budget -= orphan.size
            yield orphan


def _lock_orphan(path: Path) -> Orphan | None:
    """``path`` read and locked, when its writer is gone; None when it lives (or the file
    went meanwhile: taken over and deleted by another process)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        gone = os.fstat(fd).st_nlink == 0
        with open(fd, "rb", closefd=False) as file:
            data = b"" if gone else file.read()
    except OSError:
        gone = True
    if gone:
        os.close(fd)
        return None
    events, unreadable = [], 0
    for line in data.splitlines():
        event = decode(line)
        if event is None:
            unreadable += 1
        else:
            events.append(event)
    return Orphan(path, fd, events, unreadable, len(data))


def _delete(path: Path, fd: int) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    os.close(fd)


class JournalUnavailable(Exception):
    """The journal folder cannot be made or written."""
