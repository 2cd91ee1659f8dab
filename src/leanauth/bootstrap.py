"""Start-up: the key-encryption key, the store, the schema and the first signing key."""

from __future__ import annotations

import os
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
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        # O_EXCL: when several processes start at once, exactly one creates the key.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    with os.fdopen(fd, "w") as handle:
        handle.write(os.urandom(32).hex() + "\n")


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
