"""Per-app token quotas per UTC hour and day (Auth0 has these because clients forget to
cache tokens), and the usage counts behind them.

The hot path only touches memory: it adds to a local count and compares with the cluster's
total as last read. A background flush (every second) adds the local counts to the store and
reads the totals back, so a quota holds cluster-wide to within one flush interval's tokens.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

from leanauth import metrics
from leanauth.errors import TooManyRequests
from leanauth.store.base import UsageStore
from leanauth.store.models import App


@dataclass(frozen=True, slots=True)
class Window:
    name: str  # "h:YYYYMMDDHH" or "d:YYYYMMDD" (UTC)
    ends_at: int


def usage_windows(now: float) -> tuple[Window, Window]:
    """The current UTC hour and day."""
    moment = int(now)
    hour_start = moment - moment % 3600
    day_start = moment - moment % 86_400
    return (
        Window(time.strftime("h:%Y%m%d%H", time.gmtime(hour_start)), hour_start + 3600),
        Window(time.strftime("d:%Y%m%d", time.gmtime(day_start)), day_start + 86_400),
    )


class UsageCounter:
    """Tokens issued per app: the cluster's totals per window as last read from the store,
    plus this process's counts since. Local counts are per app only (one increment per
    token); a flush adds them to the windows current at that moment, so a count made in the
    last fraction of a second of an hour may land in the next one."""

    def __init__(self, store: UsageStore) -> None:
        self._store = store
        self._windows = usage_windows(time.time())
        self._pending: Counter[str] = Counter()
        self._in_flight: Counter[str] = Counter()
        self._totals: dict[tuple[str, str], int] = {}
        # Requests check and count on the event loop while the flush runs on a thread: the
        # counts move between pending, in flight and the totals under this lock, so that a
        # check sees every token once (never both in the totals just read back and in
        # flight) and no count lands in a dict already written.
        self._lock = threading.Lock()

    def _current(self, now: float) -> tuple[Window, Window]:
        if now >= self._windows[0].ends_at:
            self._windows = usage_windows(now)
        return self._windows

    def check(self, app: App, now: float) -> None:
        """Raise :class:`TooManyRequests` when the app has no token left in a window."""
        if app.quota_hourly is None and app.quota_daily is None:
            return
        with self._lock:
            local = self._in_flight[app.client_id] + self._pending[app.client_id]
            totals = self._totals
        hour, day = self._current(now)
        for window, quota, per in ((hour, app.quota_hourly, "hour"), (day, app.quota_daily, "day")):
            used = totals.get((app.client_id, window.name), 0) + local
            if quota is not None and used >= quota:
                metrics.QUOTA_REFUSALS.inc(per)
                raise TooManyRequests(
                    f"This app may have {quota} tokens per {per} (UTC); cache and reuse them.",
                    retry_after=int(window.ends_at - now) + 1,
                )

    def count(self, client_id: str) -> None:
        with self._lock:
            self._pending[client_id] += 1

    def add(self, tokens: Mapping[str, int]) -> None:
        """Count tokens issued elsewhere: by a worker that died before its flush (they
        count in the windows current now)."""
        with self._lock:
            self._pending.update(tokens)

    def flush(self) -> None:
        """Add local counts to the store and read the cluster's totals (blocking)."""
        with self._lock:
            in_flight = self._in_flight = self._pending
            self._pending = Counter()
        hour, day = self._current(time.time())
        keep = [hour.name, day.name]
        deltas = {(client, w): n for client, n in in_flight.items() for w in keep}
        try:
            self._store.add_usage(deltas, keep)
        except Exception:
            # Keep the counts for the next flush rather than lose them.
            with self._lock:
                self._pending.update(in_flight)
                self._in_flight = Counter()
            raise
        totals = self._store.usage(keep)
        with self._lock:
            self._totals, self._in_flight = totals, Counter()
