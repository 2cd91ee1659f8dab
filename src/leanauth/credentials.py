"""Client secrets: generated, never chosen; shown once; stored only as a keyed hash.

A secret carries 256 random bits, so no slow KDF is needed to resist guessing (ASVS 5.0
§6.5.2): HMAC-SHA256 under a server-held key keeps a check in microseconds, where bcrypt
would cap token throughput, and a stolen database alone does not let anyone test guesses.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
from collections.abc import Callable, Mapping

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

SECRET_PREFIX = "lsk_"  # noqa: S105 (a public prefix, not a secret)
SECRET_BYTES = 32


def new_client_secret() -> str:
    """A fresh secret: the recognisable ``lsk_`` prefix (for secret scanners) + 256 bits."""
    return SECRET_PREFIX + secrets.token_urlsafe(SECRET_BYTES)


def new_secret_id() -> str:
    return "sec_" + secrets.token_hex(8)


class SecretHasher:
    """Keyed hash of client secrets; the key is derived from the key-encryption key."""

    def __init__(self, key_encryption_key: bytes) -> None:
        key = HKDF(
            algorithm=hashes.SHA256(), length=32, salt=None, info=b"leanauth client-secret hash v1"
        ).derive(key_encryption_key)
        # Copying a keyed HMAC object skips re-deriving the inner and outer pads per call.
        self._template = hmac.new(key, digestmod=hashlib.sha256)
        self._decoy = self.hash("decoy secret for unknown clients")

    def hash(self, secret: str) -> bytes:
        mac = self._template.copy()
        mac.update(secret.encode("utf-8", "surrogatepass"))
        return mac.digest()

    def match(self, secret: str, stored_hashes: tuple[bytes, ...]) -> int | None:
        """Constant-time check of ``secret`` against every stored hash: the index of the
        matching one, or None.

        Every hash is compared, and with no stored hash (unknown client) the work is done
        against a decoy, so an unknown client id and a wrong secret cost the same time.
        """
        candidate = self.hash(secret)
        found = None
        for index, stored in enumerate(stored_hashes or (self._decoy,)):
            if hmac.compare_digest(candidate, stored):
                found = index
        return found if stored_hashes else None


class SecretUse:
    """When each secret last authenticated, kept in memory by the token path and written to
    the store in batches (``apps list`` shows it; an operator retires unused secrets by it)."""

    def __init__(self) -> None:
        self._last: dict[str, int] = {}
        # Requests record on the event loop while the flush runs on a thread: without it, a
        # use recorded into the dict being written could be lost.
        self._lock = threading.Lock()

    def record(self, secret_id: str, now: float) -> None:
        with self._lock:
            self._last[secret_id] = int(now)

    def flush(self, write: Callable[[Mapping[str, int]], None]) -> None:
        """Hand what was recorded to ``write``; if it fails, keep it for the next flush
        (a later use recorded meanwhile wins)."""
        with self._lock:
            used, self._last = self._last, {}
        try:
            write(used)
        except Exception:
            with self._lock:
                for secret_id, at in used.items():
                    self._last.setdefault(secret_id, at)
            raise
