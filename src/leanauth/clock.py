"""This node's clock against the database's: a node whose clock is off says so.

Tokens carry times (``iat``, ``nbf``, ``exp``, RFC 7519 §4.1) that every node compares with
its own clock; this server's checks allow ``TOKEN_TIME_LEEWAY`` (30 s) between nodes. The
database's clock is the one every node of an installation can see, so each node measures
its offset from it, in the background (every ``CHECK_INTERVAL`` seconds and once at start):

- past ``LEANAUTH_MAX_CLOCK_SKEW`` (5 s) the node logs a warning (and another once it is back
  within the bound), and ``/readyz`` still answers 200 but carries the warning;
- past the leeway, other nodes would refuse its tokens (and it theirs): ``/readyz`` answers
  503 naming the clock.

The offset is measured as Cristian's algorithm does: the database reads its clock about
midway through the round trip, so it is compared with the middle of this node's times
around the query; of a few samples, the one with the shortest round trip counts, and none
does when even that one took too long to mean anything.

On SQLite there is nothing to compare: the database is a file this process reads, and any
time it holds is this node's own (:meth:`~leanauth.store.base.DatabaseClock.database_time` is None).
"""

from __future__ import annotations

import logging
import time
from typing import Literal

from leanauth.store.base import DatabaseClock, StoreError

log = logging.getLogger("leanauth.clock")

# Seconds between two measures (the first is made at start).
CHECK_INTERVAL = 60.0
# Samples per measure: the first may include opening a connection.
SAMPLES = 3
# A sample's error is at most half its round trip: one longer than this (or than the bound
# itself, when smaller) tells nothing about a few seconds' skew.
MAX_ROUND_TRIP = 1.0

ClockState = Literal["unknown", "in_bound", "skewed", "past_leeway"]


def measure_offset(store: DatabaseClock, max_round_trip: float = MAX_ROUND_TRIP) -> float | None:
    """Seconds this node's clock is ahead of the database's (negative: behind); None on
    SQLite, or when no sample's round trip was within ``max_round_trip``."""
    best: tuple[float, float] | None = None  # (round trip, offset)
    for _ in range(SAMPLES):
        sent = time.time()
        started = time.perf_counter()
        database = store.database_time()
        round_trip = time.perf_counter() - started
        if database is None:
            return None
        offset = sent + round_trip / 2 - database
        if best is None or round_trip < best[0]:
            best = (round_trip, offset)
    assert best is not None  # SAMPLES > 0
    if best[0] > max_round_trip:
        log.debug("clock check skipped: the database took %.2fs to answer", best[0])
        return None
    return best[1]


def describe(offset: float) -> str:
    """``7.3s ahead of the database's`` (or ``behind``)."""
    return f"{abs(offset):.1f}s {'ahead of' if offset > 0 else 'behind'} the database's"


class ClockCheck:
    """Measures this node's clock offset from the database's (a background job: blocking),
    says in the log when it passes the bound and when it is back, and tells readiness."""

    def __init__(self, store: DatabaseClock, max_skew: float, leeway: float) -> None:
        self._store = store
        self._max_skew = max_skew
        self._leeway = leeway
        # Seconds this node is ahead of the database (negative: behind), as last measured.
        self.offset: float | None = None
        self._state: ClockState = "unknown"

    def check(self) -> None:
        try:
            offset = measure_offset(self._store, min(MAX_ROUND_TRIP, self._max_skew))
        except StoreError as exc:
            # The database being down is told elsewhere (readiness, the store's errors).
            log.debug("clock check skipped: %s", exc)
            return
        if offset is None:
            return
        self.offset = offset
        state = self._state_of(offset)
        if state != self._state:
            self._tell(state, offset)
        self._state = state

    def _state_of(self, offset: float) -> ClockState:
        if abs(offset) > self._leeway:
            return "past_leeway"
        return "skewed" if abs(offset) > self._max_skew else "in_bound"

    def _tell(self, state: ClockState, offset: float) -> None:
        bound = f"LEANAUTH_MAX_CLOCK_SKEW {self._max_skew:g}s"
        if state == "past_leeway":
            log.warning(
                "this node's clock is %s (past the %gs tokens allow between nodes: other "
                "nodes would refuse its tokens): not ready until its time is synchronised",
                describe(offset),
                self._leeway,
            )
        elif state == "skewed":
            log.warning(
                "this node's clock is %s (bound %s): check its time synchronisation (NTP)",
                describe(offset),
                bound,
            )
        elif self._state != "unknown":
            log.warning(
                "this node's clock is back within %s of the database's (%s)",
                bound,
                describe(offset),
            )

    def not_ready(self) -> str | None:
        """Why this node is not ready because of its clock, or None."""
        if self.offset is None or abs(self.offset) <= self._leeway:
            return None
        return f"clock {describe(self.offset)} (tokens allow {self._leeway:g}s between nodes)"

    def report(self) -> dict[str, object]:
        """What ``/readyz`` adds to its body: the offset once measured, and a warning while
        it is past the bound."""
        if self.offset is None:
            return {}
        body: dict[str, object] = {"clock_offset": round(self.offset, 3)}
        if self._max_skew < abs(self.offset) <= self._leeway:
            body["warnings"] = [
                f"this node's clock is {describe(self.offset)} "
                f"(bound LEANAUTH_MAX_CLOCK_SKEW {self._max_skew:g}s)"
            ]
        return body
