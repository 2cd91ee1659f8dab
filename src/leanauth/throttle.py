"""Brute-force defence for client authentication (RFC 6749 §2.3.1: the authorization server
MUST protect against brute-force attacks on client credentials).

Only failures are counted, and only failures are refused: the secret is checked first (it
costs microseconds, and secrets carry 256 bits), so **correct credentials are never refused
by the throttle**. Someone failing against a known client id — from anywhere, even from
behind the same load balancer as the real app — earns 429s for their own failures and
takes nothing from the app.

Failures are counted per (client id, source) and per source, where the source is the
request's address (IPv4-mapped IPv6 addresses as IPv4; IPv6 addresses per /64, the block a
single host is usually given). Past a limit, further failures from that pair or source get
429 with ``Retry-After`` until the window ends.

Counting is always done in process, so the limit holds with or without Redis. With Redis
(``LEANAUTH_REDIS_URL``) failures are also counted cluster-wide, by a background thread: a
request never waits on Redis, and a Redis that is down or hangs costs the cluster-wide count
for a while, never a worker's time. A block the cluster count imposes is announced to every
node over pub/sub.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import math
import queue
import threading
import time
from typing import Any

import limits
import orjson
import redis
from limits.storage import MemoryStorage, storage_from_string
from limits.strategies import FixedWindowRateLimiter

from leanauth import metrics
from leanauth.errors import TooManyRequests
from leanauth.notify import RedisSubscriber, redis_channel

log = logging.getLogger("leanauth.throttle")

BLOCKS_CHANNEL = "leanauth_auth_blocks"
# A client id is attacker-chosen text: bound what is kept of it.
MAX_CLIENT_ID = 64
# Redis is asked with short timeouts; after a failure it is left alone for a while.
REDIS_TIMEOUT = 0.5
REDIS_RETRY_AFTER = 5.0
# Failures waiting to be counted in Redis; past this they are counted locally only.
MAX_PENDING = 10_000
# Expired blocks are swept at most this often.
SWEEP_INTERVAL = 1.0

BlockKey = tuple[str, ...]
# One failure's counts: each key with the limit it counts against.
Hits = tuple[tuple[BlockKey, limits.RateLimitItem], ...]


class FailureThrottle:
    def __init__(
        self, pair_limit: str, address_limit: str, scope_limit: str, redis_url: str | None
    ) -> None:
        """Limits in ``limits``' notation (``10/minute``); shared through Redis at
        ``redis_url`` when there is one."""
        self._local = FixedWindowRateLimiter(MemoryStorage())
        self._pair_limit = limits.parse(pair_limit)
        self._address_limit = limits.parse(address_limit)
        self._scope_limit = limits.parse(scope_limit)
        self._blocked: dict[BlockKey, float] = {}
        self._lock = threading.Lock()
        self._swept_at = 0.0
        self._shared = SharedCounter(redis_url, self) if redis_url else None

    def start(self) -> None:
        if self._shared is not None:
            self._shared.start()

    def stop(self) -> None:
        if self._shared is not None:
            self._shared.stop()

    def refuse(self, client_id: str | None, address: str, now: float) -> TooManyRequests | None:
        """Count one failed authentication. Returns the 429 to answer instead of 401 when
        this pair or source has used up its allowance (the failure that uses it up included:
        with "5 per minute" the sixth failure is refused), else None."""
        source = throttle_source(address)
        limits_hit: list[tuple[BlockKey, limits.RateLimitItem]] = [
            (("address", source), self._address_limit)
        ]
        if client_id:
            # Without a client id (no credentials, or undecodable ones) only the source counts.
            limits_hit.append((("pair", client_id[:MAX_CLIENT_ID], source), self._pair_limit))
        keys = tuple(key for key, _ in limits_hit)
        until = self._blocked_until(keys, now)
        if until is None:
            for key, limit in limits_hit:
                if not self._local.hit(limit, *key):
                    self.block(key, self._local.get_window_stats(limit, *key).reset_time)
            if self._shared is not None:
                self._shared.count(tuple(limits_hit))
            until = self._blocked_until(keys, now)
        if until is None:
            return None
        metrics.THROTTLE_BLOCKS.inc("auth")
        return TooManyRequests(
            "Too many failed authentications; retry later.", retry_after=math.ceil(until - now)
        )

    def scope_blocked(self, client_id: str, now: float) -> bool:
        """Whether the app has used up its allowance of refused scopes."""
        return self._blocked.get(("scope", client_id), 0.0) > now

    def refuse_scope(self, client_id: str, now: float) -> TooManyRequests | None:
        """Count one request of an authenticated app refused for its scope; the 429 to
        answer instead once the app has used up its allowance (in this process)."""
        key: BlockKey = ("scope", client_id)
        if not self.scope_blocked(client_id, now) and not self._local.hit(self._scope_limit, *key):
            self.block(key, self._local.get_window_stats(self._scope_limit, *key).reset_time)
        until = self._blocked_until((key,), now)
        if until is None:
            return None
        metrics.THROTTLE_BLOCKS.inc("scope")
        return TooManyRequests(
            "Too many requests for unknown or disallowed scopes; retry later.",
            retry_after=math.ceil(until - now),
        )

    def _blocked_until(self, keys: tuple[BlockKey, ...], now: float) -> float | None:
        ends = [until for key in keys if (until := self._blocked.get(key, 0.0)) > now]
        return max(ends) if ends else None

    def block(self, key: BlockKey, until: float) -> bool:
        """Refuse failures of ``key`` until ``until``; False when it was blocked as long."""
        now = time.time()
        with self._lock:
            if self._blocked.get(key, 0.0) >= until:
                return False
            if now - self._swept_at > SWEEP_INTERVAL:
                self._blocked = {k: t for k, t in self._blocked.items() if t > now}
                self._swept_at = now
            self._blocked[key] = until
        log.warning("failed authentications blocked for %s until %d", "/".join(key), until)
        return True


class SharedCounter:
    """Counts failures in Redis from a background thread, and shares blocks between nodes."""

    def __init__(self, url: str, throttle: FailureThrottle) -> None:
        self._url = url
        self._throttle = throttle
        options: dict[str, Any] = {
            "socket_timeout": REDIS_TIMEOUT,
            "socket_connect_timeout": REDIS_TIMEOUT,
        }
        self._limiter = FixedWindowRateLimiter(storage_from_string(url, **options))
        self._publisher = redis.Redis.from_url(url, **options)
        self._channel = redis_channel(url, BLOCKS_CHANNEL)
        self._subscriber = RedisSubscriber(url, self._channel, self._on_block)
        self._pending: queue.Queue[Hits | None] = queue.Queue(MAX_PENDING)
        self._down_until = 0.0
        self._thread = threading.Thread(target=self._run, name="leanauth-throttle", daemon=True)

    def start(self) -> None:
        self._subscriber.start(lambda: None)
        self._thread.start()

    def stop(self) -> None:
        self._subscriber.stop()
        with contextlib.suppress(queue.Full):
            self._pending.put_nowait(None)
        self._thread.join(timeout=2)
        self._publisher.close()

    def count(self, hits: Hits) -> None:
        """Queue one failure's hits (never blocks the request). With the queue full it is
        counted in this process only, like any failure while Redis is away."""
        with contextlib.suppress(queue.Full):
            self._pending.put_nowait(hits)

    def _run(self) -> None:
        while (hits := self._pending.get()) is not None:
            if time.monotonic() < self._down_until:
                continue  # counted in this process only while Redis is left alone
            try:
                self._hit(hits)
            except (redis.RedisError, limits.errors.StorageError, OSError) as exc:
                self._down_until = time.monotonic() + REDIS_RETRY_AFTER
                log.warning(
                    "Redis unusable for failure counts (%s); counting in process only for %.0fs",
                    type(exc).__name__,
                    REDIS_RETRY_AFTER,
                )

    def _hit(self, hits: Hits) -> None:
        for key, limit in hits:
            if self._limiter.hit(limit, *key):
                continue
            # The cluster's count is spent: every node hears of it (this one may have
            # blocked already on its own count, the others have not).
            until = self._limiter.get_window_stats(limit, *key).reset_time
            self._throttle.block(key, until)
            self._publisher.publish(self._channel, orjson.dumps([list(key), until]))

    def _on_block(self, payload: bytes) -> None:
        try:
            key, until = orjson.loads(payload)
            self._throttle.block(tuple(str(part) for part in key), float(until))
        except (ValueError, TypeError):
            log.warning("ignored a malformed block announcement")


def throttle_source(address: str) -> str:
    """The unit failures are counted by: the address, or its /64 for IPv6."""
    if ":" not in address:
        return address
    try:
        ip = ipaddress.IPv6Address(address)
    except ValueError:
        return address[:64]
    return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))


def normalised(address: str) -> str:
    """``address`` in one spelling: IPv4-mapped IPv6 (``::ffff:10.0.0.1``, what a server
    listening on ``::`` sees for IPv4 clients) as plain IPv4."""
    if address.startswith("::ffff:") and "." in address:
        return address[7:]
    return address


def _forwarded_hop(hop: str) -> str | None:
    """One X-Forwarded-For entry as an address (brackets and a port allowed), else None."""
    hop = hop.strip()
    if hop.startswith("["):
        hop = hop[1 : hop.find("]")] if "]" in hop else ""
    elif hop.count(":") == 1:
        hop = hop.split(":", 1)[0]
    try:
        ip = ipaddress.ip_address(hop)
    except ValueError:
        return None
    # An IPv4-mapped entry (what a proxy listening on :: writes) is its IPv4 address; before
    # Python 3.13, str() spells it ::ffff:a00:1, which no IPv4 network or other hop matches.
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
    return str(mapped or ip)


class SourceAddress:
    """The request's source: the peer, or, from trusted proxies only, X-Forwarded-For.

    Behind a load balancer or proxy every request comes from the proxy's address:
    ``LEANAUTH_TRUSTED_PROXIES`` must name it, or every client counts as the proxy."""

    def __init__(self, trusted_proxies: tuple[str, ...]) -> None:
        self._trusted = [ipaddress.ip_network(p, strict=False) for p in trusted_proxies]
        # Peers are few (the proxies and the real clients): remember each answer.
        self._verdicts: dict[str, bool] = {}

    def _is_trusted(self, address: str) -> bool:
        verdict = self._verdicts.get(address)
        if verdict is None:
            try:
                ip = ipaddress.ip_address(address)
            except ValueError:
                verdict = False
            else:
                verdict = any(ip in network for network in self._trusted)
            if len(self._verdicts) > 4096:
                self._verdicts.clear()
            self._verdicts[address] = verdict
        return verdict

    def trusts(self, peer: str) -> bool:
        """Whether ``peer`` (a connection's address) is one of the trusted proxies."""
        if peer.startswith("::ffff:"):
            peer = normalised(peer)
        return bool(self._trusted) and self._is_trusted(peer)

    def of_request(self, scope: dict[str, Any]) -> str:
        """The source of an ASGI request (its last X-Forwarded-For header, if any, is the one
        the nearest proxy wrote)."""
        forwarded_for = None
        if self._trusted:
            for name, value in scope["headers"]:
                if name == b"x-forwarded-for":
                    forwarded_for = value
        return self(scope, forwarded_for)

    def __call__(self, scope: dict[str, Any], forwarded_for: bytes | None) -> str:
        client = scope.get("client")
        peer: str = client[0] if client else "unknown"
        if peer.startswith("::ffff:"):
            peer = normalised(peer)
        if not self._trusted or forwarded_for is None or not self._is_trusted(peer):
            return peer
        # Walk from the nearest hop back: the first address not a trusted proxy is the client.
        # An entry that is not an address ends the walk at the proxy that passed it on.
        nearest = peer
        for raw in reversed(forwarded_for.decode("latin-1").split(",")):
            if not raw.strip():
                continue
            hop = _forwarded_hop(raw)
            if hop is None:
                return nearest
            if not self._is_trusted(hop):
                return hop
            nearest = hop
        return nearest
