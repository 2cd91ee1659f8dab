"""Which app each customer belongs to, held whole in memory: the customer-token path never
waits on the database, whichever of a million customers it names.

Real LinkSDK traffic names a customer the worker has not seen lately on nearly every
request, so a cache of recently used customers misses almost always. Instead each worker
holds every customer id, compactly: per app, the 16-byte ids sorted in one ``bytes`` (20
bytes a customer with the sparse index; about 20 MB for a million), loaded whole at start
and every ``CUSTOMER_RELOAD_INTERVAL``, and kept current between loads by the change feed
(customers added or removed since the load are held in a small dict and set). A look-up is a
C-level bisect on the sparse index and a ``find`` in one 512-byte block: about a
microsecond.

What the directory cannot know is a customer created on another node a moment ago, before
this worker has read the change. Customer ids are UUIDv7 (RFC 9562), so an id says when it
was made: only an id made after the directory was last brought up to date (less a margin
for clocks and slow transactions) may be such a customer and is worth asking the database
about (see :meth:`CustomerDirectory.may_be_new`). Any other id the directory does not hold
is unknown, answered from memory at the cost of a known one.
"""

from __future__ import annotations

import time
from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Iterable

ID_BYTES = 16
# Ids per block of the sparse index: a look-up searches one block with bytes.find.
STRIDE = 32
BLOCK_BYTES = ID_BYTES * STRIDE
# How far an id's own time may lie before the directory's last update and still name a
# customer the directory has not heard of: clock differences between nodes, plus the time
# between making an id and committing it.
NEW_ID_MARGIN_MS = 60_000


def id_key(customer_id: str) -> bytes:
    """The 16 bytes of a canonical (lower-case, hyphenated) UUID."""
    return bytes.fromhex(customer_id.replace("-", ""))


def made_at_ms(key: bytes) -> int | None:
    """When a UUIDv7 was made (its first 48 bits, Unix milliseconds); None for another
    version, whose time cannot be told."""
    if key[6] >> 4 != 7:
        return None
    return int.from_bytes(key[:6], "big")


class AppMembers:
    """One app's customer ids: sorted 16-byte keys in one ``bytes``, with every
    ``STRIDE``-th key in a list for :func:`bisect.bisect_right`."""

    __slots__ = ("_blob", "_index")

    def __init__(self, blob: bytes) -> None:
        if len(blob) % ID_BYTES:
            raise ValueError("the customer ids are not whole 16-byte keys")
        self._blob = blob
        self._index = [blob[i : i + ID_BYTES] for i in range(0, len(blob), BLOCK_BYTES)]

    def __len__(self) -> int:
        return len(self._blob) // ID_BYTES

    def __contains__(self, key: bytes) -> bool:
        block = bisect_right(self._index, key) - 1
        if block < 0:
            return False
        start = block * BLOCK_BYTES
        end = start + BLOCK_BYTES
        found = self._blob.find(key, start, end)
        # A match must start on a key's boundary, not straddle two keys.
        while found != -1 and found % ID_BYTES:
            found = self._blob.find(key, found + 1, end)
        return found != -1

    @property
    def nbytes(self) -> int:
        return len(self._blob) + len(self._index) * (ID_BYTES + 41)


class CustomerDirectory:
    """Every customer's app, as of the last full load plus the changes read since."""

    def __init__(self) -> None:
        self._members: dict[str, AppMembers] = {}
        # Changes read since the full load: added customers with their app, removed ones.
        self._added: dict[bytes, str] = {}
        self._removed: set[bytes] = set()
        # Wall-clock milliseconds up to which every committed customer is known here.
        self.current_as_of_ms = 0

    def replace(self, members: Iterable[tuple[str, bytes]], as_of_ms: int) -> None:
        """Swap in a full load (each app's sorted keys): built aside, then swapped whole,
        so a look-up never finds the directory half loaded or empty."""
        loaded = {client_id: AppMembers(blob) for client_id, blob in members if blob}
        self._members, self._added, self._removed = loaded, {}, set()
        self.current_as_of_ms = as_of_ms

    def add(self, key: bytes, client_id: str) -> None:
        self._removed.discard(key)
        self._added[key] = client_id

    def remove(self, key: bytes) -> None:
        self._added.pop(key, None)
        self._removed.add(key)

    def mark_current(self, as_of_ms: int) -> None:
        self.current_as_of_ms = max(self.current_as_of_ms, as_of_ms)

    def owner(self, key: bytes, client_id: str) -> bool | None:
        """Whether ``client_id`` owns the customer: True, False (unknown here, or another
        app's), or None when the directory cannot tell: the id may name a customer created
        since it was last brought up to date."""
        if key in self._removed:
            return False
        added = self._added.get(key)
        if added is not None:
            return added == client_id
        members = self._members.get(client_id)
        if members is not None and key in members:
            return True
        return None if self.may_be_new(key) else False

    def may_be_new(self, key: bytes, now_ms: int | None = None) -> bool:
        """Whether ``key`` may name a customer committed after the directory's last update:
        a UUIDv7 made no earlier than that, less the margin, and not in the future beyond
        it (no node makes those)."""
        made = made_at_ms(key)
        if made is None:
            return False
        now_ms = time.time_ns() // 1_000_000 if now_ms is None else now_ms
        return self.current_as_of_ms - NEW_ID_MARGIN_MS <= made <= now_ms + NEW_ID_MARGIN_MS

    @property
    def size(self) -> int:
        return sum(len(m) for m in self._members.values()) + len(self._added)

    @property
    def nbytes(self) -> int:
        """Memory the directory holds, roughly: the keys, their index and the changes."""
        held = sum(m.nbytes + 100 for m in self._members.values())
        return held + (len(self._added) + len(self._removed)) * 130


class NewIdLookups:
    """The database look-ups of ids that may name new customers, kept from becoming a way to
    load the database: an id found missing is remembered (until it is too old to be new),
    and each app may cause ``per_second`` look-ups a second in this process."""

    def __init__(self, per_second: int = 200, remembered: int = 10_000) -> None:
        self._per_second = per_second
        self._remembered = remembered
        self._missing: OrderedDict[bytes, None] = OrderedDict()
        self._spent: dict[str, tuple[int, int]] = {}  # client id → (second, look-ups)

    def known_missing(self, key: bytes) -> bool:
        return key in self._missing

    def remember_missing(self, key: bytes) -> None:
        self._missing[key] = None
        if len(self._missing) > self._remembered:
            self._missing.popitem(last=False)

    def allow(self, client_id: str, now: float) -> bool:
        """Spend one of the app's look-ups for this second; False when none is left."""
        second = int(now)
        spent_in, count = self._spent.get(client_id, (second, 0))
        if spent_in != second:
            count = 0
            if len(self._spent) > 10_000:
                self._spent.clear()
        if count >= self._per_second:
            return False
        self._spent[client_id] = (second, count + 1)
        return True
