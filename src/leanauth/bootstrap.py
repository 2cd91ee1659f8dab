"""Start-up: the key-encryption key, the store, the schema and the first signing key."""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography.exceptions import InvalidTag

from leanauth.credentials import SecretHasher
from leanauth.keys import KeyCipher, new_stored_key
from leanauth.notify import RedisPublisher
from leanauth.settings import Settings, SettingsError, decode_key
from leanauth.store.base import Store
from leanauth.store.engine import EngineOptions
from leanauth.store.migrate import require_current
from leanauth.store.sql import SqlStore


@dataclass(frozen=True)
class Runtime:
    """What every entry point (server, CLI) builds from the settings."""

    settings: Settings
    store: Store
    cipher: KeyCipher
    hasher: SecretHasher
    # Who makes admin changes through this runtime, for the audit trail.
    actor: str = "cli"


def load_key_encryption_key(settings: Settings) -> bytes:
    """The KEK from LEANAUTH_KEY_ENCRYPTION_KEY, else from its file (created 0600 if absent)."""
    if settings.key_encryption_key is not None:
        return settings.key_encryption_key.value
    path = settings.kek_file()
    try:
        if not path.exists():
            _create_key_file(path)
        key = decode_key(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else "not text"
        raise SettingsError(f"{KEK_FILE_SETTING}: cannot read or create {path}: {why}") from None
    if key is None:
        raise SettingsError(f"{KEK_FILE_SETTING}: {path} does not hold a 32-byte key")
    return key


def _create_key_file(path: Path) -> None:
    """Create the key file whole, or find another process's.

    When several processes start at once, exactly one key must win and no process may read
    a file still being written: the key is written and synced under a temporary name, then
    linked into place (a link, unlike a rename, fails when the name exists).
    """
    folder = path.parent
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    # mkstemp creates the file with mode 0600.
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(os.urandom(32).hex() + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        with contextlib.suppress(FileExistsError):  # another process won: its key is read
            os.link(temporary, path)
    finally:
        os.unlink(temporary)
    _fsync_directory(folder)


def _fsync_directory(folder: Path) -> None:
    """Make a new name in ``folder`` survive a crash (the KEK opens every signing key)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


KEK_SETTING = "LEANAUTH_KEY_ENCRYPTION_KEY"
KEK_FILE_SETTING = "LEANAUTH_KEY_ENCRYPTION_KEY_FILE"


def check_key_encryption_key(settings: Settings, store: Store, cipher: KeyCipher) -> None:
    """Refuse to run with a key-encryption key that does not open the stored signing keys:
    with it, every secret check and every signature would fail."""
    for key in store.list_keys():
        try:
            cipher.decrypt(key.kid, key.encrypted_private_key)
        except InvalidTag:
            setting = KEK_SETTING if settings.key_encryption_key else KEK_FILE_SETTING
            raise SettingsError(
                f"{setting}: this key does not decrypt the signing keys in the database "
                "(every node of one installation needs the same key-encryption key)"
            ) from None


SchemaMode = Literal["upgrade", "auto", "none"]


def open_runtime(settings: Settings, *, schema: SchemaMode = "auto", actor: str = "cli") -> Runtime:
    """Open the store and make it ready.

    ``schema``: ``upgrade`` applies pending migrations; ``auto`` applies them to an empty
    database and otherwise insists the schema is current (a server never runs on an old
    schema); ``none`` touches nothing (for a process whose parent prepared the store).
    Then, unless ``none``, makes the first signing key if there is none.
    """
    kek = load_key_encryption_key(settings)
    options = EngineOptions(
        settings.db_pool_size, settings.db_connect_timeout, settings.db_statement_timeout
    )
    publisher = RedisPublisher(settings.redis_url) if settings.redis_url else None
    store = SqlStore(settings.database_url, options, publish=publisher)
    cipher = KeyCipher(kek)
    try:
        if schema != "none":
            store.upgrade_schema(only_if_empty=schema == "auto")
        if schema != "none":
            require_current(store.engine)
            store.ensure_signing_key(new_stored_key(settings.signing_alg, cipher, int(time.time())))
            check_key_encryption_key(settings, store, cipher)
    except BaseException:
        store.close()
        raise
    return Runtime(settings, store, cipher, SecretHasher(kek), actor)
