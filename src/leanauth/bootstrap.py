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
from leanauth.safetext import masked_url
from leanauth.settings import Settings, SettingsError, decode_key
from leanauth.store.base import Store
from leanauth.store.engine import EngineOptions, fsync_directory, sqlite_file
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


def load_key_encryption_key(settings: Settings, *, create: bool = False) -> bytes:
    """The KEK from LEANAUTH_KEY_ENCRYPTION_KEY, else from its file.

    ``create`` (``init`` and ``db upgrade`` only): make the file, mode 0600, when it is
    absent. Anywhere else a missing file is a mistake (a wrong path, a lost key): a new key
    would open none of the signing keys, so it is refused rather than made.
    """
    if settings.key_encryption_key is not None:
        return settings.key_encryption_key.value
    path = settings.kek_file()
    try:
        if not path.exists():
            if not create:
                raise SettingsError(
                    f"{KEK_FILE_SETTING}: no key-encryption key file at {path}: set "
                    f"{KEK_SETTING} or {KEK_FILE_SETTING} to this installation's key "
                    "(`leanauth init` makes one for a new installation)"
                )
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
    # The key file's name must survive a crash: the KEK opens every signing key.
    fsync_directory(folder)


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


SchemaMode = Literal["upgrade", "require", "none"]


class NotInitialised(RuntimeError):
    """No leanauth database where the settings point. Only ``init`` and ``db upgrade`` make
    one: a mistyped LEANAUTH_DATABASE_URL must not become a new, empty registry."""

    def __init__(self, settings: Settings) -> None:
        where = masked_url(settings.database_url)
        super().__init__(f"no leanauth database at {where}: run `leanauth init` first")


def open_store(settings: Settings, *, create: bool = False) -> SqlStore:
    """The store, its schema untouched. Unless ``create``, an SQLite file must exist: merely
    connecting would create it."""
    path = sqlite_file(settings.database_url)
    if not create and path is not None and not path.is_file():
        raise NotInitialised(settings)
    options = EngineOptions(
        settings.db_pool_size, settings.db_connect_timeout, settings.db_statement_timeout
    )
    publisher = RedisPublisher(settings.redis_url) if settings.redis_url else None
    return SqlStore(settings.database_url, options, publish=publisher)


def require_schema(settings: Settings, store: Store) -> None:
    """Raise unless the database has this code's schema: :class:`NotInitialised` when it has
    none, ``SchemaAhead`` or ``SchemaOutdated`` when it is at another revision."""
    current = store.schema_revision()
    if current is None:
        raise NotInitialised(settings)
    require_current(current)


def open_runtime(
    settings: Settings, *, schema: SchemaMode = "require", actor: str = "cli"
) -> Runtime:
    """Open the store and make it ready.

    ``schema``: ``upgrade`` (``init``, ``db upgrade``) may create the database and the
    key-encryption key file, and applies pending migrations; ``require`` insists on a
    database at this code's head and an existing key (a server never runs on another
    schema); ``none`` checks nothing (for a process whose parent prepared the store).
    Then, unless ``none``, makes the first signing key if there is none.
    """
    create = schema == "upgrade"
    # init makes the key first: a key file it cannot make stops it before it makes a database.
    kek = load_key_encryption_key(settings, create=True) if create else None
    store = open_store(settings, create=create)
    try:
        if create:
            store.upgrade_schema()
        elif schema == "require":
            # The database before the key: a mistyped SQLite path misplaces both, and the
            # database is what the operator needs to hear about.
            require_schema(settings, store)
        if kek is None:
            kek = load_key_encryption_key(settings)
        cipher = KeyCipher(kek)
        if schema != "none":
            store.ensure_signing_key(new_stored_key(settings.signing_alg, cipher, int(time.time())))
            check_key_encryption_key(settings, store, cipher)
    except BaseException:
        store.close()
        raise
    return Runtime(settings, store, cipher, SecretHasher(kek), actor)
