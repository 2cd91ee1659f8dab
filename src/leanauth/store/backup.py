"""``leanauth db backup``: a copy of an SQLite database, consistent while servers write to it."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import tempfile
from pathlib import Path

from leanauth.store.engine import fsync_directory


def backup_sqlite(source: Path, target: Path) -> None:
    """Copy the SQLite database ``source`` to ``target``, a new file of mode 0600.

    SQLite's online backup copies one consistent snapshot while the servers go on writing
    (in WAL mode readers and writers do not wait for each other). The copy is made under a
    temporary name beside ``target`` and linked into place only when whole: a failure
    leaves no half backup under the name, and an existing file is never replaced (a link,
    unlike a rename, fails when the name exists). Raises FileExistsError for an existing
    ``target``.
    """
    if target.exists():
        raise FileExistsError(target)
    # mkstemp makes the file with mode 0600: it holds customers' ids and the audit trail.
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    temporary = Path(name)
    try:
        _copy(source, temporary)
        os.link(temporary, target)
    finally:
        temporary.unlink()
        with contextlib.suppress(FileNotFoundError):  # left by a failed copy, if any
            temporary.with_name(temporary.name + "-journal").unlink()
    fsync_directory(target.parent)


def _copy(source: Path, temporary: Path) -> None:
    # mode=rw: never create the source (connecting to a missing file would).
    uri = f"{source.resolve().as_uri()}?mode=rw"
    with (
        contextlib.closing(sqlite3.connect(uri, uri=True, timeout=10)) as reader,
        contextlib.closing(sqlite3.connect(temporary)) as writer,
    ):
        reader.backup(writer)
        # The copy of a WAL database is in WAL mode too: made one self-contained file.
        writer.execute("PRAGMA journal_mode=DELETE")
    with temporary.open("rb") as handle:
        os.fsync(handle.fileno())
