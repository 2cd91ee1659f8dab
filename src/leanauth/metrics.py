"""Prometheus metrics of one node, summed across its worker processes.

The token endpoint is the hot path (about 130 µs of CPU a request), so nothing here writes
to shared memory or takes a lock per request, as prometheus_client's multiprocess mode
would (an mmap'd file written under a lock by every ``Counter.inc`` and
``Histogram.observe``). Instead:

- each process counts in plain dicts: :class:`Counter` (label values → int) and
  :class:`Histogram` (label → bucket counts and sum, the bucket found by bisect), touched
  on the event loop's thread only (:class:`LockedCounter` for counts made in threads);
  a count costs a dict update, an observation a bisect and two list updates;
- once a second the housekeeper's thread writes this process's snapshot (those counts,
  and the gauges sampled at that moment) to ``<metrics dir>/<pid>-<start>.json``, written
  aside and renamed, so that a reader never sees half a file;
- a scrape (:func:`render`) merges every snapshot in the directory and renders the text
  format through prometheus_client's custom-collector API, in a fresh registry.

Counters and histograms are summed over every snapshot, those of exited processes
included: a worker that is replaced must not take its counts with it, or the node's
counters would go backwards. Gauges come from live processes only, each merged by its own
rule (sum, max, or the age of the oldest timestamp).

No label value is request text, a client or customer id, or a secret: every label takes
its values from a small fixed set, and :func:`render` drops any value that does not look
like one of those.
"""

from __future__ import annotations

import atexit
import functools
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import orjson

# prometheus_client is imported where a scrape is answered: every process (commands too)
# imports this module to count, and the text format is needed only to render.
if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

log = logging.getLogger("leanauth.metrics")

SNAPSHOT_INTERVAL = 1.0
# Gauges of a snapshot older than this are left out even while its pid exists (a pid the
# kernel gave to another process, a worker hung for an hour).
GAUGE_MAX_AGE = 3600.0
SNAPSHOT_SUFFIX = ".json"
# What a label value may look like: the fixed words the code passes, nothing else.
LABEL_VALUE = re.compile(r"[a-z0-9_]{1,40}")

Kind = Literal["counter", "gauge", "histogram"]
# How a gauge's values from several processes become one: added up, the largest, or (for a
# gauge sampled as a Unix time) the age of the oldest.
Merge = Literal["sum", "max", "age"]
LabelValues = tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Family:
    name: str
    kind: Kind
    doc: str
    labels: tuple[str, ...] = ()
    merge: Merge = "sum"


# Every metric this module renders, in order; nothing else in a snapshot is rendered.
FAMILIES: dict[str, Family] = {}


def _define(family: Family) -> Family:
    FAMILIES[family.name] = family
    return family


class Counter:
    """A counter of this process, by label values from a small fixed set."""

    __slots__ = ("family", "values")

    def __init__(self, name: str, doc: str, labels: tuple[str, ...] = ()) -> None:
        self.family = _define(Family(name, "counter", doc, labels))
        self.values: dict[LabelValues, int] = {}
        _COUNTERS.append(self)

    def inc(self, *labels: str) -> None:
        # Called on the event loop's thread only, so a plain read-add-write is safe.
        self.values[labels] = self.values.get(labels, 0) + 1


class LockedCounter(Counter):
    """A counter that threads add to (store errors, background writes): rare counts, so a
    lock costs nothing that matters, and none is lost to a race."""

    __slots__ = ()
    _lock = threading.Lock()

    def inc(self, *labels: str) -> None:
        with self._lock:
            self.values[labels] = self.values.get(labels, 0) + 1


class Histogram:
    """A histogram of this process by one label: per label value, the count of each bucket
    (not cumulative; the last one is +Inf) followed by the sum."""

    __slots__ = ("bounds", "family", "series")

    def __init__(self, name: str, doc: str, label: str, bounds: tuple[float, ...]) -> None:
        self.family = _define(Family(name, "histogram", doc, (label,)))
        self.bounds = bounds
        self.series: dict[str, list[float]] = {}
        _HISTOGRAMS.append(self)

    def observe(self, label: str, value: float) -> None:
        series = self.series.get(label)
        if series is None:
            series = self.series[label] = [0] * (len(self.bounds) + 1) + [0.0]
        # bisect_left: a value equal to a bound belongs to that bucket (``le``).
        series[bisect_left(self.bounds, value)] += 1
        series[-1] += value


_COUNTERS: list[Counter] = []
_HISTOGRAMS: list[Histogram] = []

# The metrics. Label values, everywhere: fixed words chosen by the code.

TOKENS_ISSUED = Counter(
    "leanauth_tokens_issued_total", "Access tokens issued, by scope class.", ("scope_class",)
)
TOKEN_REFUSALS = Counter(
    "leanauth_token_refusals_total",
    "Token requests refused, by OAuth error code and the scope class asked for.",
    ("reason", "scope_class"),
)
REVOCATIONS = Counter(
    "leanauth_revocations_total",
    "Revocation requests (RFC 7009), by outcome (revoked, not_revoked or the error code).",
    ("outcome",),
)
INTROSPECTIONS = Counter(
    "leanauth_introspections_total",
    "Introspection requests (RFC 7662), by outcome (active, inactive or the error code).",
    ("outcome",),
)
REQUEST_SECONDS = Histogram(
    "leanauth_request_duration_seconds",
    "Time from the application receiving a request to its response sent, by endpoint.",
    "endpoint",
    (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
CUSTOMER_LOOKUPS = Counter(
    "leanauth_customer_lookups_total",
    "Customer-token ownership checks: answered from memory, by a store look-up, or refused "
    "a store look-up (the app's new-id look-ups spent, or its scope refusals throttled).",
    ("result",),
)
THROTTLE_BLOCKS = Counter(
    "leanauth_throttle_blocks_total",
    "Requests answered 429 by the brute-force throttle: failed authentications (auth) or "
    "refused scopes (scope).",
    ("kind",),
)
QUOTA_REFUSALS = Counter(
    "leanauth_quota_refusals_total",
    "Token requests refused 429 for an app's quota, by window.",
    ("window",),
)
STORE_ERRORS = LockedCounter(
    "leanauth_store_errors_total",
    "Database errors (the store could not answer), by operation.",
    ("operation",),
)
BACKGROUND_WRITE_FAILURES = LockedCounter(
    "leanauth_background_write_failures_total",
    "Background flushes that failed (kept for the next flush), by what was written.",
    ("step",),
)
AUDIT_DROPPED = _define(
    Family(
        "leanauth_audit_records_dropped_total",
        "counter",
        "Audit records dropped: the audit queue was full.",
    )
)
AUDIT_REJECTED = _define(
    Family(
        "leanauth_audit_records_rejected_total",
        "counter",
        "Audit records the database refused (dropped, alone).",
    )
)
AUDIT_UNJOURNALED = _define(
    Family(
        "leanauth_audit_records_unjournaled_total",
        "counter",
        "Audit records that could not be written to the journal (a full disk, say): queued, "
        "but lost if their worker dies before the flush.",
    )
)
AUDIT_QUEUED = _define(
    Family(
        "leanauth_audit_queue_records",
        "gauge",
        "Audit records waiting to be written to the database (all workers).",
    )
)
REGISTRY_STALENESS = _define(
    Family(
        "leanauth_registry_staleness_seconds",
        "gauge",
        "Seconds since the registry view was last brought up to date (the most stale worker).",
        merge="age",
    )
)
REGISTRY_APPS = _define(
    Family("leanauth_registry_apps", "gauge", "Apps in the registry view.", merge="max")
)
REGISTRY_CUSTOMERS = _define(
    Family("leanauth_registry_customers", "gauge", "Customers in the registry view.", merge="max")
)
SIGNING_KEY_AGE = _define(
    Family(
        "leanauth_signing_key_age_seconds",
        "gauge",
        "Seconds since the active signing key became active (the oldest any worker uses).",
        merge="age",
    )
)
PROCESSES = _define(
    Family(
        "leanauth_metrics_processes",
        "gauge",
        "Live worker processes whose snapshots this scrape merged.",
    )
)

# Request paths → the endpoint label (see endpoint_of).
_ENDPOINTS = {
    "/oauth2/token": "token",
    "/oauth2/revoke": "revoke",
    "/oauth2/introspect": "introspect",
    "/oauth2/jwks": "jwks",
    "/.well-known/jwks.json": "jwks",
    "/healthz": "health",
    "/readyz": "health",
    "/livez": "health",
    "/metrics": "metrics",
}
METADATA_PREFIX = "/.well-known/oauth-authorization-server"
CUSTOMERS_PREFIX = "/customers/v1"


def endpoint_of(path: str) -> str:
    """The endpoint label of a request path; any path of no endpoint is ``other``."""
    label = _ENDPOINTS.get(path)
    if label is not None:
        return label
    if path.startswith(CUSTOMERS_PREFIX):
        return "customers"
    if path.startswith(METADATA_PREFIX):
        return "metadata"
    return "other"


def scope_class(scope: str | None) -> str:
    """The class of a requested scope's text, never the text: api, customer, admin or
    other."""
    if scope in ("api", "admin"):
        return scope
    if scope is not None and scope.startswith("customer."):
        return "customer"
    return "other"


_OUTCOMES = {"revocation": REVOCATIONS, "introspection": INTROSPECTIONS}


def refused(kind: str, reason: str, scope: str | None) -> None:
    """Count a refusal of an OAuth endpoint (its audit kind), by its OAuth error code."""
    if kind == "token":
        TOKEN_REFUSALS.inc(reason, scope_class(scope))
    elif kind in _OUTCOMES:
        _OUTCOMES[kind].inc(reason)


# Snapshots


def take_snapshot(sampled: Mapping[str, float], now: float | None = None) -> dict[str, Any]:
    """This process's counts, with ``sampled`` (family name → value) for the gauges and the
    counters read from other objects (the audit trail's), as one JSON-ready dict."""
    counters: dict[str, list[Any]] = {}
    for counter in _COUNTERS:
        # dict.copy() is atomic under the GIL: the event loop may be counting meanwhile.
        counters[counter.family.name] = [[list(k), v] for k, v in counter.values.copy().items()]
    histograms = {
        h.family.name: [[[label], list(series)] for label, series in h.series.copy().items()]
        for h in _HISTOGRAMS
    }
    gauges: dict[str, float] = {}
    for name, value in sampled.items():
        if FAMILIES[name].kind == "counter":
            counters[name] = [[[], value]]
        else:
            gauges[name] = value
    written_at = time.time() if now is None else now
    return {
        "pid": os.getpid(),
        "written_at": written_at,
        "counters": counters,
        "histograms": histograms,
        "gauges": gauges,
    }


@functools.cache
def _snapshot_name(pid: int) -> str:
    # The start time keeps a pid that the kernel reuses later from overwriting the counts of
    # an exited worker.
    return f"{pid}-{time.time_ns()}{SNAPSHOT_SUFFIX}"


def save_snapshot(directory: Path, name: str, snapshot: Mapping[str, Any]) -> None:
    """Write ``snapshot`` as ``directory/name``: aside, then renamed over the old one."""
    temporary = directory / f".{name}.tmp"
    temporary.write_bytes(orjson.dumps(snapshot))
    os.replace(temporary, directory / name)


class SnapshotWriter:
    """Writes this process's snapshot (the housekeeper calls :meth:`write` every
    ``SNAPSHOT_INTERVAL``; the public /metrics route before each scrape)."""

    def __init__(self, directory: Path, sample: Callable[[], Mapping[str, float]]) -> None:
        self.directory = directory
        self._sample = sample
        self._lock = threading.Lock()
        self._failing = False

    def write(self) -> None:
        snapshot = take_snapshot(self._sample())
        with self._lock:
            try:
                save_snapshot(self.directory, _snapshot_name(os.getpid()), snapshot)
            except OSError as exc:
                # Once per run of failures, not every second (a full disk, a deleted dir).
                if not self._failing:
                    log.warning("cannot write the metrics snapshot: %s", exc)
                self._failing = True
                return
            self._failing = False

    def write_and_render(self) -> tuple[bytes, str]:
        """This process's counts as of now, merged with the other processes' snapshots."""
        self.write()
        return render(self.directory)


@functools.cache
def _private_directory() -> Path:
    path = Path(tempfile.mkdtemp(prefix="leanauth-metrics-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def metrics_directory(configured: Path | None) -> Path:
    """``LEANAUTH_METRICS_DIR`` (made if missing), else a temporary directory of this process
    alone (removed at its exit): a single process, such as a test or an in-process app."""
    if configured is None:
        return _private_directory()
    configured.mkdir(mode=0o700, parents=True, exist_ok=True)
    return configured


# Merging and rendering


@dataclass
class Merged:
    counters: dict[str, dict[LabelValues, float]] = field(default_factory=dict)
    histograms: dict[str, dict[LabelValues, list[float]]] = field(default_factory=dict)
    # Each gauge's values, one per live process.
    gauges: dict[str, list[float]] = field(default_factory=dict)
    processes: int = 0


def read_snapshots(directory: Path) -> list[dict[str, Any]]:
    """Every snapshot in ``directory``; unreadable files and other files are skipped."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    found = []
    for name in names:
        if name.startswith(".") or not name.endswith(SNAPSHOT_SUFFIX):
            continue
        try:
            data = orjson.loads((directory / name).read_bytes())
        except (OSError, orjson.JSONDecodeError):
            continue  # gone since the listing, or not a snapshot
        if isinstance(data, dict):
            found.append(data)
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, as another user's
    return True


def _labels(family: Family, raw: Any) -> LabelValues | None:
    if not isinstance(raw, list) or len(raw) != len(family.labels):
        return None
    if not all(isinstance(v, str) and LABEL_VALUE.fullmatch(v) for v in raw):
        return None
    return tuple(raw)


def _number(raw: Any) -> float:
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        raise TypeError("not a number")
    return raw


def _counters(snapshot: dict[str, Any]) -> list[tuple[str, LabelValues, float]]:
    found = []
    for name, samples in snapshot["counters"].items():
        family = FAMILIES.get(name)
        if family is None or family.kind != "counter":
            continue
        for raw_labels, value in samples:
            labels = _labels(family, raw_labels)
            if labels is not None:
                found.append((name, labels, _number(value)))
    return found


def _histograms(snapshot: dict[str, Any]) -> list[tuple[str, LabelValues, list[float]]]:
    found = []
    for histogram in _HISTOGRAMS:
        for raw_labels, series in snapshot["histograms"].get(histogram.family.name, ()):
            labels = _labels(histogram.family, raw_labels)
            if labels is not None and len(series) == len(histogram.bounds) + 2:
                found.append((histogram.family.name, labels, [_number(v) for v in series]))
    return found


def _live_gauges(snapshot: dict[str, Any], now: float) -> list[tuple[str, float]] | None:
    """The gauges of a snapshot of a live process, written lately; else None."""
    pid = int(snapshot["pid"])
    if pid <= 0 or not alive(pid) or now - _number(snapshot["written_at"]) > GAUGE_MAX_AGE:
        return None
    found = []
    for name, value in snapshot["gauges"].items():
        family = FAMILIES.get(name)
        if family is not None and family.kind == "gauge":
            found.append((name, _number(value)))
    return found


def _merge_one(merged: Merged, snapshot: dict[str, Any], now: float) -> None:
    """Add one snapshot to ``merged``; raises on a malformed one, having added nothing."""
    counters, histograms = _counters(snapshot), _histograms(snapshot)
    gauges = _live_gauges(snapshot, now)
    for name, labels, value in counters:
        totals = merged.counters.setdefault(name, {})
        totals[labels] = totals.get(labels, 0) + value
    for name, labels, series in histograms:
        by_label = merged.histograms.setdefault(name, {})
        total = by_label.setdefault(labels, [0] * len(series))
        for index, value in enumerate(series):
            total[index] += value
    if gauges is not None:
        merged.processes += 1
        for name, value in gauges:
            merged.gauges.setdefault(name, []).append(value)


def merge(snapshots: Iterable[dict[str, Any]], now: float) -> Merged:
    merged = Merged()
    for snapshot in snapshots:
        try:
            _merge_one(merged, snapshot, now)
        except (KeyError, TypeError, ValueError, AttributeError):
            continue  # not a snapshot of this version: it counts for nothing
    return merged


def _gauge_value(family: Family, values: list[float], now: float) -> float:
    if family.merge == "sum":
        return sum(values)
    if family.merge == "max":
        return max(values)
    return max(0.0, now - min(values))


class MergedCollector:
    """A prometheus_client collector of merged snapshots."""

    def __init__(self, merged: Merged, now: float) -> None:
        self._merged = merged
        self._now = now

    def collect(self) -> Iterator[Metric]:
        for family in FAMILIES.values():
            yield self._metric(family)

    def _metric(self, family: Family) -> Metric:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily  # noqa: PLC0415

        merged, labels = self._merged, list(family.labels)
        if family.kind == "counter":
            counter = CounterMetricFamily(family.name, family.doc, labels=labels)
            for values, total in sorted(merged.counters.get(family.name, {}).items()):
                counter.add_metric(list(values), total)
            return counter
        if family.kind == "histogram":
            return self._histogram(family)
        gauge = GaugeMetricFamily(family.name, family.doc, labels=labels)
        if family is PROCESSES:
            gauge.add_metric([], merged.processes)
        elif family.name in merged.gauges:
            gauge.add_metric([], _gauge_value(family, merged.gauges[family.name], self._now))
        return gauge

    def _histogram(self, family: Family) -> Metric:
        from prometheus_client.core import HistogramMetricFamily  # noqa: PLC0415

        bounds = next(h.bounds for h in _HISTOGRAMS if h.family is family)
        les = [repr(b) for b in bounds] + ["+Inf"]
        metric = HistogramMetricFamily(family.name, family.doc, labels=list(family.labels))
        for values, series in sorted(self._merged.histograms.get(family.name, {}).items()):
            cumulative, buckets = 0.0, []
            for le, count in zip(les, series[:-1], strict=True):
                cumulative += count
                buckets.append((le, cumulative))
            metric.add_metric(list(values), buckets, series[-1])
        return metric


def render(directory: Path | str) -> tuple[bytes, str]:
    """The node's metrics in the Prometheus text format, merged from every snapshot in
    ``directory``: (body, content type). Safe to call from any process of the node."""
    from prometheus_client import (  # noqa: PLC0415
        CONTENT_TYPE_LATEST,
        CollectorRegistry,
        generate_latest,
    )

    now = time.time()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(MergedCollector(merge(read_snapshots(Path(directory)), now), now))
    return generate_latest(registry), CONTENT_TYPE_LATEST
