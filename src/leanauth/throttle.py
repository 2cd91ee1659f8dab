"""Brute-force defence for client authentication (RFC 6749 §2.3.1: the authorization server
MUST protect against brute-force attacks on client credentials).

Failed authentications are counted per (client id, source address) and per source address
with the ``limits`` library: in process on one node, in Redis when ``LEANAUTH_REDIS_URL`` is
set. Past a limit that pair (or that address) gets 429 with ``Retry-After`` until the window
ends. The real app is not locked out by someone hammering its client id from elsewhere: its
own addresses form other pairs.

Only failures touch the counters. Blocks are held in memory and, with Redis, announced to
every node on a pub/sub channel, so checking a request costs a dictionary lookup.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import time
from typing import Any

import limits
import orjson
import redis
from limits.storage import storage_from_string
from limits.strategies import FixedWindowRateLimiter

from leanauth.errors import TooManyRequests
from leanauth.notify import RedisSubscriber
from leanauth.settings import Settings

log = logging.getLogger("leanauth.throttle")

BLOCKS_CHANNEL = "leanauth_auth_blocks"
# A client id is attacker-chosen text: bound what is kept of it.
MAX_CLIENT_ID = 64

BlockKey = tuple[str, ...]


class FailureThrottle:
    def __init__(self, settings: Settings) -> None:
        self._redis_url = settings.redis_url
        uri = settings.redis_url or "memory://"
        self._limiter = FixedWindowRateLimiter(storage_from_string(uri))
        self._pair_limit = limits.parse(settings.auth_failure_limit)
        self._address_limit = limits.parse(settings.auth_failure_address_limit)
        self._blocked: dict[BlockKey, float] = {}
        self._publisher: redis.Redis | None = None
        self._subscriber: RedisSubscriber | None = None

    @property
    def shared(self) -> bool:
        """True when the counters live in Redis (recording a failure does network I/O)."""
        return self._redis_url is not None

    def start(self) -> None:
        if self._redis_url:
            self._publisher = redis.Redis.from_url(self._redis_url, socket_timeout=2)
            self._subscriber = RedisSubscriber(self._redis_url, BLOCKS_CHANNEL, self._on_block)
            self._subscriber.start(lambda: None)

    def stop(self) -> None:
        if self._subscriber is not None:
            self._subscriber.stop()
        if self._publisher is not None:
            self._publisher.close()

    def check(self, client_id: str | None, address: str, now: float) -> None:
        """Raise :class:`TooManyRequests` if this address, or this pair, is blocked."""
        if not self._blocked:
            return
        for key in (("address", address), ("pair", _bounded(client_id), address)):
            until = self._blocked.get(key)
            if until is not None and until > now:
                raise TooManyRequests(
                    "Too many failed authentications; retry later.",
                    retry_after=math.ceil(until - now),
                )

    def record_failure(self, client_id: str | None, address: str) -> None:
        """Count one failed authentication (blocking when the counters are in Redis).

        The failure that uses up the allowance blocks at once: with "5 per minute" the sixth
        attempt is refused. A counter store that cannot be reached costs the count, never the
        answer to the client.
        """
        pair = ("pair", _bounded(client_id), address)
        for key, limit in ((pair, self._pair_limit), (("address", address), self._address_limit)):
            try:
                self._limiter.hit(limit, *key)
                stats = self._limiter.get_window_stats(limit, *key)
            except Exception as exc:
                log.warning("could not count a failed authentication: %s", exc)
                return
            if stats.remaining <= 0:
                self._block(key, stats.reset_time, announce=True)

    def _block(self, key: BlockKey, until: float, announce: bool) -> None:
        now = time.time()
        if self._blocked.get(key, 0) >= until:
            return
        for stale in [k for k, t in self._blocked.items() if t <= now]:
            del self._blocked[stale]
        self._blocked[key] = until
        log.warning("authentication blocked for %s until %d", "/".join(key), until)
        if announce and self._publisher is not None:
            try:
                self._publisher.publish(BLOCKS_CHANNEL, orjson.dumps([list(key), until]))
            except redis.RedisError as exc:
                log.warning("could not announce a block: %s", exc)

    def _on_block(self, payload: bytes) -> None:
        try:
            key, until = orjson.loads(payload)
            self._block(tuple(str(part) for part in key), float(until), announce=False)
        except (ValueError, TypeError):
            log.warning("ignored a malformed block announcement")


def _bounded(client_id: str | None) -> str:
    return (client_id or "")[:MAX_CLIENT_ID]


class SourceAddress:
    """The request's source: the peer, or, from trusted proxies only, X-Forwarded-For."""

    def __init__(self, trusted_proxies: tuple[str, ...]) -> None:
        self._trusted = [ipaddress.ip_network(p, strict=False) for p in trusted_proxies]

    def _is_trusted(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in self._trusted)

    def __call__(self, scope: dict[str, Any], forwarded_for: bytes | None) -> str:
        client = scope.get("client")
        peer = str(client[0]) if client else "unknown"
        if not self._trusted or forwarded_for is None or not self._is_trusted(peer):
            return peer
        # Walk from the nearest hop back: the first address not a trusted proxy is the client.
        hops = [h.strip() for h in forwarded_for.decode("latin-1").split(",") if h.strip()]
        for hop in reversed(hops):
            if not self._is_trusted(hop):
                return hop[:64]
        return peer
