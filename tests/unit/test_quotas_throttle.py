"""Per-app token quotas (leanauth.quotas) and the brute-force defence's parts
(leanauth.throttle): the request's source address and the failure throttle."""

from __future__ import annotations

import sys
import threading
import time
import types
from collections import Counter
from collections.abc import Mapping

import pytest

from leanauth.errors import TooManyRequests
from leanauth.quotas import UsageCounter, Window, usage_windows
from leanauth.settings import Settings
from leanauth.store.models import App
from leanauth.throttle import FailureThrottle, SourceAddress, normalised, throttle_source

# usage_windows

# 2023-11-14T22:13:20Z
MOMENT = 1_700_000_000
HOUR_END = 1_700_002_800  # 23:00:00Z
DAY_END = 1_700_006_400  # 2023-11-15T00:00:00Z


@pytest.mark.parametrize(
    ("now", "hour", "day"),
    [
        (MOMENT, Window("h:2023111422", HOUR_END), Window("d:20231114", DAY_END)),
        (MOMENT + 0.9, Window("h:2023111422", HOUR_END), Window("d:20231114", DAY_END)),
        (HOUR_END - 1, Window("h:2023111422", HOUR_END), Window("d:20231114", DAY_END)),
        (HOUR_END, Window("h:2023111423", DAY_END), Window("d:20231114", DAY_END)),
        (DAY_END, Window("h:2023111500", DAY_END + 3600), Window("d:20231115", DAY_END + 86_400)),
        (0, Window("h:1970010100", 3600), Window("d:19700101", 86_400)),
    ],
)
def test_usage_windows_are_utc_hours_and_days(now: float, hour: Window, day: Window) -> None:
    assert usage_windows(now) == (hour, day)


# UsageCounter, with a store that keeps counts in memory


class FakeUsageStore:
    """The two store methods UsageCounter calls: ``add_usage`` and ``usage``."""

    def __init__(self) -> None:
        self.rows: Counter[tuple[str, str]] = Counter()
        self.add_calls: list[tuple[dict[tuple[str, str], int], list[str]]] = []
        self.fail_next_add = False

    def add_usage(self, deltas: Mapping[tuple[str, str], int], keep: list[str]) -> None:
        self.add_calls.append((dict(deltas), list(keep)))
        if self.fail_next_add:
            self.fail_next_add = False
            raise ConnectionError("database away")
        self.rows.update(deltas)

    def usage(self, windows: list[str]) -> dict[tuple[str, str], int]:
        return {key: n for key, n in self.rows.items() if key[1] in windows}


HOUR, DAY = usage_windows(MOMENT)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> types.SimpleNamespace:
    """quotas' own ``time`` module, its ``time()`` fixed at MOMENT (movable by the test)."""
    fake = types.SimpleNamespace(now=float(MOMENT), strftime=time.strftime, gmtime=time.gmtime)
    fake.time = lambda: fake.now
    monkeypatch.setattr("leanauth.quotas.time", fake)
    return fake


@pytest.fixture
def store() -> FakeUsageStore:
    return FakeUsageStore()


@pytest.fixture
def counter(clock: types.SimpleNamespace, store: FakeUsageStore) -> UsageCounter:
    return UsageCounter(store)  # type: ignore[arg-type]


def app_with(hourly: int | None = None, daily: int | None = None, client_id: str = "app") -> App:
    return App(client_id, "Quota app", frozenset({"api"}), None, True, 0, False, hourly, daily)


def refusal(counter: UsageCounter, app: App, now: float = MOMENT) -> TooManyRequests:
    with pytest.raises(TooManyRequests) as caught:
        counter.check(app, now)
    assert caught.value.status_code == 429
    assert caught.value.error == "too_many_requests"
    return caught.value


def test_an_app_without_quotas_is_never_refused(
    counter: UsageCounter, store: FakeUsageStore
) -> None:
    store.rows[("app", HOUR.name)] = store.rows[("app", DAY.name)] = 10**9
    counter.flush()
    for _ in range(1000):
        counter.count("app")
    counter.check(app_with(), MOMENT)


@pytest.mark.parametrize(("hourly", "daily"), [(3, None), (None, 3), (3, 3), (3, 1000)])
def test_local_counts_use_up_a_quota(counter: UsageCounter, hourly: int, daily: int) -> None:
    app = app_with(hourly, daily)
    for _ in range(3):
        counter.check(app, MOMENT)
        counter.count("app")
    error = refusal(counter, app)
    per = "hour" if hourly == 3 else "day"
    assert error.description == (
        f"This app may have 3 tokens per {per} (UTC); cache and reuse them."
    )
    # Retry when the window ends (and a second more, rounding up).
    ends_at = HOUR.ends_at if per == "hour" else DAY.ends_at
    assert error.retry_after == ends_at - MOMENT + 1
    assert error.extra_headers_list() == [(b"retry-after", str(ends_at - MOMENT + 1).encode())]


def test_counts_are_per_app(counter: UsageCounter) -> None:
    for _ in range(3):
        counter.count("other")
    counter.check(app_with(hourly=3), MOMENT)
    refusal(counter, app_with(hourly=3, client_id="other"))


def test_flush_writes_local_counts_to_both_windows_and_reads_the_totals(
    counter: UsageCounter, store: FakeUsageStore
) -> None:
    counter.count("app")
    counter.count("app")
    counter.count("other")
    counter.flush()
    assert store.add_calls == [
        (
            {
                ("app", HOUR.name): 2,
                ("app", DAY.name): 2,
                ("other", HOUR.name): 1,
                ("other", DAY.name): 1,
            },
            [HOUR.name, DAY.name],
        )
    ]
    # The counts are the store's now: counted once, not again as local counts.
    counter.check(app_with(hourly=3), MOMENT)
    counter.count("app")
    refusal(counter, app_with(hourly=3))
    counter.flush()
    assert store.add_calls[-1][0] == {("app", HOUR.name): 1, ("app", DAY.name): 1}
    assert store.rows[("app", HOUR.name)] == 3


def test_nothing_counted_flushes_nothing(counter: UsageCounter, store: FakeUsageStore) -> None:
    counter.flush()
    counter.flush()
    assert store.add_calls == [({}, [HOUR.name, DAY.name])] * 2


def test_other_nodes_tokens_count_after_a_flush(
    counter: UsageCounter, store: FakeUsageStore
) -> None:
    store.rows[("app", HOUR.name)] = 5
    counter.check(app_with(hourly=5), MOMENT)  # not read yet
    counter.flush()
    error = refusal(counter, app_with(hourly=5))
    assert "5 tokens per hour" in error.description
    counter.check(app_with(hourly=6), MOMENT)


def test_a_failed_flush_keeps_the_counts_for_the_next(
    counter: UsageCounter, store: FakeUsageStore
) -> None:
    counter.count("app")
    counter.count("app")
    store.fail_next_add = True
    with pytest.raises(ConnectionError):
        counter.flush()
    # Still counted locally meanwhile.
    refusal(counter, app_with(hourly=2))
    counter.count("app")
    counter.flush()
    assert store.rows == Counter({("app", HOUR.name): 3, ("app", DAY.name): 3})
    counter.flush()
    assert store.rows == Counter({("app", HOUR.name): 3, ("app", DAY.name): 3})


def test_add_counts_tokens_issued_elsewhere(counter: UsageCounter, store: FakeUsageStore) -> None:
    counter.add({"app": 4, "other": 1})
    refusal(counter, app_with(hourly=4))
    counter.flush()
    assert store.rows[("app", HOUR.name)] == 4
    assert store.rows[("other", DAY.name)] == 1


def test_a_new_hour_starts_a_new_count(
    counter: UsageCounter, store: FakeUsageStore, clock: types.SimpleNamespace
) -> None:
    app = app_with(hourly=2, daily=3)
    counter.count("app")
    counter.count("app")
    counter.flush()
    refusal(counter, app)
    # The next hour (same day): the hourly count starts again, the daily one goes on.
    clock.now = HOUR_END
    counter.check(app, HOUR_END)
    counter.count("app")
    counter.flush()
    assert store.add_calls[-1][1] == ["h:2023111423", DAY.name]
    error = refusal(counter, app, HOUR_END)
    assert "3 tokens per day" in error.description
    assert error.retry_after == DAY_END - HOUR_END + 1
    # The next day: both start again.
    clock.now = DAY_END
    counter.flush()
    counter.check(app, DAY_END)


# normalised and throttle_source


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("::ffff:10.0.0.1", "10.0.0.1"),
        ("10.0.0.1", "10.0.0.1"),
        ("2001:db8::1", "2001:db8::1"),
        ("::ffff:a00:1", "::ffff:a00:1"),  # no dotted quad: left as it is
        ("unknown", "unknown"),
    ],
)
def test_normalised(address: str, expected: str) -> None:
    assert normalised(address) == expected


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("198.51.100.7", "198.51.100.7"),
        ("unknown", "unknown"),
        ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
        ("2001:db8:1:2::9", "2001:db8:1:2::/64"),
        ("2001:db8:1:3::9", "2001:db8:1:3::/64"),
        ("::1", "::/64"),
        ("not:an:address", "not:an:address"),
        ("x:" * 40, ("x:" * 40)[:64]),
    ],
)
def test_throttle_source(address: str, expected: str) -> None:
    assert throttle_source(address) == expected


# SourceAddress

PROXIES = ("10.0.0.0/8", "192.0.2.1", "fd00::/8")


@pytest.mark.parametrize(
    ("trusted", "peer", "forwarded", "expected"),
    [
        pytest.param((), "203.0.113.5", b"198.51.100.7", "203.0.113.5", id="no-trusted-proxies"),
        pytest.param(PROXIES, "10.0.0.1", None, "10.0.0.1", id="proxy-without-header"),
        pytest.param(PROXIES, "203.0.113.5", b"198.51.100.7", "203.0.113.5", id="untrusted-peer"),
        pytest.param(PROXIES, "10.0.0.1", b"198.51.100.7", "198.51.100.7", id="one-hop"),
        pytest.param(PROXIES, "192.0.2.1", b"198.51.100.7", "198.51.100.7", id="single-address"),
        pytest.param(PROXIES, "192.0.2.2", b"198.51.100.7", "192.0.2.2", id="next-to-single"),
        pytest.param(
            PROXIES, "10.0.0.1", b"6.6.6.6, 198.51.100.7", "198.51.100.7", id="spoofed-left-most"
        ),
        pytest.param(
            PROXIES,
            "10.0.0.1",
            b"6.6.6.6,10.9.9.9, 198.51.100.7 , 10.1.2.3",
            "198.51.100.7",
            id="spoofed-trusted-looking-entry-left-of-the-client",
        ),
        pytest.param(
            PROXIES, "10.0.0.1", b"198.51.100.7, 10.1.2.3", "198.51.100.7", id="proxy-chain"
        ),
        pytest.param(PROXIES, "10.0.0.1", b"10.0.0.5, 10.0.0.6", "10.0.0.5", id="all-hops-trusted"),
        pytest.param(PROXIES, "10.0.0.1", b"garbage", "10.0.0.1", id="garbage-only"),
        pytest.param(
            PROXIES, "10.0.0.1", b"198.51.100.7, garbage", "10.0.0.1", id="garbage-nearest"
        ),
        pytest.param(
            PROXIES, "10.0.0.1", b"garbage, 10.0.0.7", "10.0.0.7", id="garbage-behind-a-proxy"
        ),
        pytest.param(PROXIES, "10.0.0.1", b"198.51.100.7, , ", "198.51.100.7", id="empty-entries"),
        pytest.param(PROXIES, "10.0.0.1", b"", "10.0.0.1", id="empty-header"),
        pytest.param(PROXIES, "10.0.0.1", b"\xff\xfe", "10.0.0.1", id="not-ascii"),
        pytest.param(PROXIES, "10.0.0.1", b"198.51.100.7\r\n", "198.51.100.7", id="crlf"),
        pytest.param(PROXIES, "10.0.0.1", b"198.51.100.7:4711", "198.51.100.7", id="ipv4-port"),
        pytest.param(PROXIES, "10.0.0.1", b"2001:db8::1", "2001:db8::1", id="ipv6"),
        pytest.param(
            PROXIES, "10.0.0.1", b"2001:0DB8:0:0:0:0:0:1", "2001:db8::1", id="ipv6-one-spelling"
        ),
        pytest.param(
            PROXIES, "10.0.0.1", b"[2001:db8::1]:443", "2001:db8::1", id="ipv6-brackets-port"
        ),
        pytest.param(PROXIES, "10.0.0.1", b"[2001:db8::1]", "2001:db8::1", id="ipv6-brackets"),
        pytest.param(PROXIES, "10.0.0.1", b"[2001:db8::1", "10.0.0.1", id="unclosed-bracket"),
        pytest.param(PROXIES, "10.0.0.1", b"unknown", "10.0.0.1", id="rfc7239-unknown"),
        pytest.param(PROXIES, "10.0.0.1", b"198.51.100.7/24", "10.0.0.1", id="network"),
        pytest.param(PROXIES, "fd00::1", b"198.51.100.7", "198.51.100.7", id="ipv6-proxy"),
        pytest.param(
            PROXIES, "::ffff:10.0.0.1", b"198.51.100.7", "198.51.100.7", id="ipv4-mapped-peer"
        ),
        pytest.param(
            PROXIES, "::ffff:203.0.113.5", b"198.51.100.7", "203.0.113.5", id="mapped-untrusted"
        ),
        pytest.param(PROXIES, "2001:db8::9", b"198.51.100.7", "2001:db8::9", id="ipv6-untrusted"),
        pytest.param(("10.1.2.3/8",), "10.200.0.1", b"198.51.100.7", "198.51.100.7", id="lax-cidr"),
    ],
)
def test_source_address(
    trusted: tuple[str, ...], peer: str, forwarded: bytes | None, expected: str
) -> None:
    source = SourceAddress(trusted)
    assert source({"client": (peer, 50_000)}, forwarded) == expected
    # The verdicts are remembered: asking again gives the same answer.
    assert source({"client": (peer, 50_000)}, forwarded) == expected


def test_source_without_a_peer_is_unknown() -> None:
    assert SourceAddress(PROXIES)({}, b"198.51.100.7") == "unknown"
    assert SourceAddress(PROXIES)({"client": None}, None) == "unknown"


@pytest.mark.parametrize(
    ("forwarded", "expected"),
    [
        pytest.param(b"::ffff:198.51.100.7", "198.51.100.7", id="client-mapped"),
        # A trusted proxy written in mapped form must be skipped like its IPv4 spelling.
        pytest.param(b"198.51.100.7, ::ffff:10.0.0.9", "198.51.100.7", id="proxy-mapped"),
    ],
)
def test_ipv4_mapped_forwarded_entries_are_ipv4(forwarded: bytes, expected: str) -> None:
    assert SourceAddress(PROXIES)({"client": ("10.0.0.1", 1)}, forwarded) == expected


def test_ipv4_clients_forwarded_in_mapped_form_are_throttled_apart() -> None:
    source = SourceAddress(PROXIES)
    first = source({"client": ("10.0.0.1", 1)}, b"::ffff:198.51.100.7")
    second = source({"client": ("10.0.0.1", 1)}, b"::ffff:203.0.113.9")
    assert throttle_source(first) != throttle_source(second)


@pytest.mark.parametrize(
    ("trusted", "peer", "expected"),
    [
        (PROXIES, "10.0.0.1", True),
        (PROXIES, "::ffff:10.0.0.1", True),
        (PROXIES, "fd12::1", True),
        (PROXIES, "11.0.0.1", False),
        (PROXIES, "testclient", False),
        ((), "10.0.0.1", False),
    ],
)
def test_trusts(trusted: tuple[str, ...], peer: str, expected: bool) -> None:
    assert SourceAddress(trusted).trusts(peer) is expected


def test_invalid_trusted_proxy_refused() -> None:
    with pytest.raises(ValueError, match="does not appear to be an IPv4 or IPv6 network"):
        SourceAddress(("not-a-network",))


# FailureThrottle (in process: no Redis)


def failure_throttle(pair: int = 3, address: int = 5, scope: int = 2) -> FailureThrottle:
    return FailureThrottle(
        f"{pair} per minute", f"{address} per minute", f"{scope} per minute", None
    )


def assert_throttled(result: TooManyRequests | None) -> TooManyRequests:
    assert isinstance(result, TooManyRequests)
    assert result.status_code == 429
    assert 1 <= result.retry_after <= 61
    return result


def test_settings_from_env_feed_the_throttle() -> None:
    settings = Settings.from_env(
        {"LEANAUTH_AUTH_FAILURE_LIMIT": "2 per minute", "LEANAUTH_TRUSTED_PROXIES": "10.0.0.0/8"}
    )
    assert settings.trusted_proxies == ("10.0.0.0/8",)
    throttle = FailureThrottle(
        settings.auth_failure_limit,
        settings.auth_failure_address_limit,
        settings.scope_failure_limit,
        settings.redis_url,
    )
    now = time.time()
    assert throttle.refuse("c", "198.51.100.1", now) is None
    assert throttle.refuse("c", "198.51.100.1", now) is None
    assert_throttled(throttle.refuse("c", "198.51.100.1", now))


def test_a_pair_is_refused_after_its_allowance() -> None:
    throttle = failure_throttle(pair=3, address=100)
    now = time.time()
    for _ in range(3):
        assert throttle.refuse("client", "198.51.100.1", now) is None
    error = assert_throttled(throttle.refuse("client", "198.51.100.1", now))
    assert error.description == "Too many failed authentications; retry later."
    assert_throttled(throttle.refuse("client", "198.51.100.1", now))
    # The same client from elsewhere, and another client from there, are not refused.
    assert throttle.refuse("client", "198.51.100.2", now) is None
    assert throttle.refuse("other", "198.51.100.1", now) is None


def test_an_address_is_refused_after_its_allowance_whatever_the_client() -> None:
    throttle = failure_throttle(pair=100, address=5)
    now = time.time()
    for i in range(5):
        assert throttle.refuse(f"client-{i}", "198.51.100.1", now) is None
    assert_throttled(throttle.refuse("client-new", "198.51.100.1", now))
    assert throttle.refuse("client-new", "198.51.100.2", now) is None


def test_failures_without_a_client_id_count_for_the_address_only() -> None:
    throttle = failure_throttle(pair=1, address=3)
    now = time.time()
    for _ in range(3):
        assert throttle.refuse(None, "198.51.100.1", now) is None
    assert_throttled(throttle.refuse(None, "198.51.100.1", now))
    assert_throttled(throttle.refuse("client", "198.51.100.1", now))


def test_ipv6_sources_count_per_64() -> None:
    throttle = failure_throttle(pair=100, address=3)
    now = time.time()
    for host in ("::1", "::2", "::3"):
        assert throttle.refuse(None, "2001:db8:0:1" + host, now) is None
    assert_throttled(throttle.refuse(None, "2001:db8:0:1:ffff:ffff:ffff:ffff", now))
    assert throttle.refuse(None, "2001:db8:0:2::1", now) is None


def test_long_client_ids_are_counted_by_their_first_64_characters() -> None:
    throttle = failure_throttle(pair=2, address=100)
    now = time.time()
    assert throttle.refuse("x" * 64 + "a", "198.51.100.1", now) is None
    assert throttle.refuse("x" * 64 + "b", "198.51.100.1", now) is None
    assert_throttled(throttle.refuse("x" * 64 + "c", "198.51.100.1", now))


def test_a_block_ends_with_its_window() -> None:
    throttle = failure_throttle(pair=1, address=100)
    now = time.time()
    assert throttle.refuse("client", "198.51.100.1", now) is None
    assert_throttled(throttle.refuse("client", "198.51.100.1", now))
    # A minute on (the window is "per minute"), the pair is no longer refused.
    assert throttle.refuse("client", "198.51.100.1", now + 61) is None


def test_scope_refusals_are_counted_per_app() -> None:
    throttle = failure_throttle(scope=2)
    now = time.time()
    assert not throttle.scope_blocked("app", now)
    assert throttle.refuse_scope("app", now) is None
    assert throttle.refuse_scope("app", now) is None
    error = assert_throttled(throttle.refuse_scope("app", now))
    assert error.description == "Too many requests for unknown or disallowed scopes; retry later."
    assert throttle.scope_blocked("app", now)
    assert not throttle.scope_blocked("other", now)
    assert throttle.refuse_scope("other", now) is None


def test_block_keeps_the_later_end() -> None:
    throttle = failure_throttle()
    now = float(int(time.time()))  # whole seconds: Retry-After is exact
    assert throttle.block(("address", "198.51.100.9"), now + 30)
    assert not throttle.block(("address", "198.51.100.9"), now + 10)
    assert throttle.block(("address", "198.51.100.9"), now + 40)
    error = assert_throttled(throttle.refuse(None, "198.51.100.9", now))
    assert error.retry_after == 40


@pytest.mark.parametrize(
    ("trusted", "headers", "expected"),
    [
        pytest.param(PROXIES, [(b"x-forwarded-for", b"198.51.100.7")], "198.51.100.7", id="one"),
        pytest.param(
            PROXIES,
            [(b"x-forwarded-for", b"6.6.6.6"), (b"x-forwarded-for", b"198.51.100.7")],
            "198.51.100.7",
            id="the-last-header-is-the-nearest-proxy's",
        ),
        pytest.param(PROXIES, [(b"x-real-ip", b"198.51.100.7")], "10.0.0.1", id="other-header"),
        pytest.param(PROXIES, [], "10.0.0.1", id="no-header"),
        pytest.param((), [(b"x-forwarded-for", b"198.51.100.7")], "10.0.0.1", id="untrusting"),
    ],
)
def test_source_of_an_asgi_request(
    trusted: tuple[str, ...], headers: list[tuple[bytes, bytes]], expected: str
) -> None:
    scope = {"type": "http", "client": ("10.0.0.1", 443), "headers": headers}
    assert SourceAddress(trusted).of_request(scope) == expected


def test_a_check_during_a_flush_never_counts_a_token_twice(
    clock: types.SimpleNamespace, store: FakeUsageStore
) -> None:
    """Requests check and count on the event loop while the flush runs on a thread: a check
    must see each token once, never both in the totals just read back and among the counts
    being written. The quota leaves room for exactly one more token, so any token counted
    twice is a refusal."""
    counter = UsageCounter(store)  # type: ignore[arg-type]
    stop = threading.Event()

    def flush_again_and_again() -> None:
        while not stop.is_set():
            counter.flush()

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as the interpreter can
    flusher = threading.Thread(target=flush_again_and_again)
    flusher.start()
    try:
        for issued in range(20_000):
            counter.check(app_with(hourly=issued + 1), MOMENT)
            counter.count("app")
    finally:
        stop.set()
        flusher.join()
        sys.setswitchinterval(interval)
