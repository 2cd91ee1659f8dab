"""The in-process view of the registry that keeps the token hot path off the database.

Apps with their secret hashes, the signing keys, the revoked tokens and every customer's
app (:mod:`leanauth.directory`) are loaded whole at start-up. A background task follows the
store's change feed every ``refresh_interval`` seconds (at once when another node announces
a change) and applies exactly what changed. As floors, in case a change was missed, apps,
keys and revocations are re-read every ``REGISTRY_REFRESH_INTERVAL`` seconds, and everything,
customers included, every ``FULL_LOAD_INTERVAL`` seconds, or when the feed could not be read
for so long that it may have been pruned meanwhile. A new load is built aside and swapped in
whole: the view is never empty.

The few store calls requests do make (a customer id that may be new, the Customers API,
revocations) run on :class:`StoreCalls`: threads of their own, and a deadline per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

from leanauth import metrics
from leanauth.directory import CustomerDirectory, NewIdLookups, id_key
from leanauth.keys import KeyCipher, KeyRing
from leanauth.notify import ChangeListener
from leanauth.settings import Settings
from leanauth.store.base import CHANGE_RETENTION, RegistryStore, StoreError
from leanauth.store.models import App, Change, Credentials, Customer, StoredKey

log = logging.getLogger("leanauth.cache")

REGISTRY_REFRESH_INTERVAL = 60.0
# Customers are many (a million takes a second or two to read): the change feed keeps them
# current, and the full load is a rarer floor, well within the feed's retention.
FULL_LOAD_INTERVAL = 1800.0
STALE_FEED_AFTER = CHANGE_RETENTION / 2
# Threads for requests' store calls. A healthy database answers them in a millisecond or
# two, so four carry thousands a second; and four stuck on a dead connection still leave
# the connection pool (LEANAUTH_DB_POOL_SIZE, 5, and as many again) to the background jobs.
REQUEST_THREADS = 4
# Requests' store calls that may wait for a thread. Past that many, the threads are stuck
# (a healthy database empties the queue in milliseconds): a request is answered at once
# rather than held for its whole deadline, and a flood of them holds no more memory.
MAX_WAITING_CALLS = 64

P = ParamSpec("P")
T = TypeVar("T")


class StoreTimeout(StoreError):
    """The store did not answer a request within the request's deadline (or could not be
    asked: every thread for requests' calls is stuck, and a queue waits for them)."""


class StoreCalls:
    """Runs requests' blocking store calls, each waited for at most its deadline.

    The calls run on threads of their own rather than asyncio's default executor, which the
    background jobs (the change feed, the flush of the audit trail) use: look-ups stuck on a
    dead connection then cannot take the threads those jobs need to notice that the
    database is back. A request that gives up answers 503 at once; its call is left to end
    on its own (the connection's deadlines end it), and whatever it returns is dropped.
    A call still queued when its request gives up never runs."""

    def __init__(
        self, timeout: float, threads: int = REQUEST_THREADS, max_waiting: int = MAX_WAITING_CALLS
    ) -> None:
        self.timeout = timeout
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="leanauth-request-store")
        self._limit = threads + max_waiting
        # Calls submitted and not yet ended (running, stuck, or waiting for a thread).
        self._unfinished = 0
        self._lock = threading.Lock()

    async def run(self, call: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """``call(*args, **kwargs)`` in a thread; :class:`StoreTimeout` after ``timeout``
        seconds, or at once when the threads are stuck and ``max_waiting`` calls wait for
        them. The call sees the request's context (its request id, for the audit)."""
        # Only the event loop's thread submits: the count cannot grow between check and add.
        if self._unfinished >= self._limit:
            raise StoreTimeout(f"the database is not answering ({self._limit} calls wait)")
        context = contextvars.copy_context()

        def in_context() -> T:
            return context.run(call, *args, **kwargs)

        submitted = self._executor.submit(in_context)
        with self._lock:
            self._unfinished += 1
        submitted.add_done_callback(self._ended)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(submitted), self.timeout)
        except TimeoutError:
            raise StoreTimeout(f"the database did not answer within {self.timeout:g}s") from None

    def _ended(self, _: Future[Any]) -> None:
        # Run by the call's thread when it ends, or by the loop's when a waiting call is
        # cancelled (or ended before this was added).
        with self._lock:
            self._unfinished -= 1

    def close(self) -> None:
        """Stop taking calls; a call stuck in its thread is not waited for here."""
        self._executor.shutdown(wait=False, cancel_futures=True)


@dataclass(frozen=True, slots=True)
class CachedClient:
    app: App
    secret_hashes: tuple[bytes, ...]
    secret_ids: tuple[str, ...]
    # Each secret's end (inf: none), checked on every authentication: a secret past its
    # grace period stops working on time even when the store cannot be reached to reload.
    secret_expiries: tuple[float, ...]
    # The earliest expiry among the secrets: past it the entry is rebuilt from the store.
    valid_until: float


def _cached(credentials: Credentials) -> CachedClient:
    expiries = tuple(
        float("inf") if s.expires_at is None else float(s.expires_at) for s in credentials.secrets
    )
    return CachedClient(
        credentials.app,
        tuple(s.secret_hash for s in credentials.secrets),
        tuple(s.secret_id for s in credentials.secrets),
        expiries,
        min(expiries, default=float("inf")),
    )


class RegistryCache:
    def __init__(
        self,
        store: RegistryStore,
        cipher: KeyCipher,
        refresh_interval: float,
        listener: ChangeListener | None = None,
        request_timeout: float = Settings.db_request_timeout,
    ) -> None:
        self._store = store
        self._listener = listener
        self._cipher = cipher
        self._refresh_interval = refresh_interval
        self._clients: dict[str, CachedClient] = {}
        # The longest token lifetime any app has been given (None: the default). It only
        # falls (an app deleted, or given a shorter lifetime) once every token issued under
        # the longer one has expired: a token is never judged against a lifetime shorter
        # than the one it was issued with.
        self.longest_app_ttl = 0
        self._longest_held_until = 0.0
        self.directory = CustomerDirectory()
        self._new_id_lookups = NewIdLookups()
        # Revoked token ids → their expiry; kept until then.
        self._revoked: dict[str, int] = {}
        # monotonic() of the last complete look at the store: how fresh this view is.
        self.synced_at = 0.0
        self._change_cursor = 0
        self._last_full_load = self._last_registry_refresh = 0.0
        self._task: asyncio.Task[None] | None = None
        self.store_calls = StoreCalls(request_timeout)
        self.keyring: KeyRing
        self._keys: Sequence[StoredKey] = ()

    # Loading

    def load(self) -> None:
        """Read everything (blocking): at start-up and as the rarest floor."""
        as_of_ms = time.time_ns() // 1_000_000
        cursor = self._store.latest_change_id()
        self._reload_registry(int(time.time()))
        started = time.monotonic()
        self.directory.replace(self._store.customer_members(), as_of_ms)
        log.info(
            "customer directory loaded: %d customers in %.2fs, %.0f MB",
            self.directory.size,
            time.monotonic() - started,
            self.directory.nbytes / 1e6,
        )
        self._change_cursor = cursor
        self._last_full_load = self.synced_at = time.monotonic()

    def _reload_registry(self, now: int) -> None:
        """Apps with their secrets, the keys and the revocations, read whole."""
        self._clients = {c.app.client_id: _cached(c) for c in self._store.all_credentials(now)}
        longest = max((c.app.token_ttl or 0 for c in self._clients.values()), default=0)
        if longest < self.longest_app_ttl and now > self._longest_held_until:
            self.longest_app_ttl = 0  # every token of the longer lifetime has expired
        self._hold_longest(longest, now)
        self._keys = self._store.list_keys()
        self.keyring = KeyRing(self._keys, self._cipher, now)
        self._revoked = {r.jti: r.expires_at for r in self._store.list_revoked(now)}
        self._last_registry_refresh = time.monotonic()

    def apply_changes(self) -> None:
        """Apply what the change feed names (blocking; run in a worker thread)."""
        moment = time.monotonic()
        if (
            moment - self._last_full_load >= FULL_LOAD_INTERVAL
            or moment - self.synced_at >= STALE_FEED_AFTER
        ):
            self.load()
            return
        as_of_ms = time.time_ns() // 1_000_000
        changes = self._store.changes_since(self._change_cursor)
        now = int(time.time())
        if moment - self._last_registry_refresh >= REGISTRY_REFRESH_INTERVAL:
            self._reload_registry(now)  # what the changes below would reload, read whole
        else:
            self._apply_registry_changes(changes, now)
        customers = {c.entity_id for c in changes if c.kind == "customer"}
        if customers:
            self._apply_customer_changes(customers)
        if changes:
            self._change_cursor = changes[-1].change_id
        for client_id, client in list(self._clients.items()):
            if client.valid_until <= now:
                self._reload_client(client_id, now)
        self._revoked = {jti: exp for jti, exp in self._revoked.items() if exp >= now}
        self.directory.mark_current(as_of_ms)
        self.synced_at = time.monotonic()

    def _apply_registry_changes(self, changes: Sequence[Change], now: int) -> None:
        """Apps, keys and revocations the changes name, reloaded one by one."""
        keys_changed = False
        for change in changes:
            if change.kind == "app":
                self._reload_client(change.entity_id, now)
            elif change.kind == "key":
                keys_changed = True
            elif change.kind == "revocation":
                revoked = self._store.get_revoked(change.entity_id)
                if revoked is not None:
                    self._revoked[revoked.jti] = revoked.expires_at
        if keys_changed:
            self._keys = self._store.list_keys()
            self.keyring = KeyRing(self._keys, self._cipher, now)

    def _apply_customer_changes(self, customer_ids: set[str]) -> None:
        """Customers added or removed: one read for the lot."""
        found = {c.customer_id: c.client_id for c in self._store.get_customers(customer_ids)}
        for customer_id in customer_ids:
            owner = found.get(customer_id)
            if owner is None:
                self.directory.remove(id_key(customer_id))
            else:
                self.directory.add(id_key(customer_id), owner)

    def follow_key_schedule(self) -> None:
        """Keys activate and retired keys leave the JWKS with time, not with a change: rebuild
        the ring from the keys in memory when that moment comes, so it happens on time even
        while the store cannot be reached."""
        now = int(time.time())
        if now >= self.keyring.next_change_at:
            self.keyring = KeyRing(self._keys, self._cipher, now)

    def _reload_client(self, client_id: str, now: int) -> None:
        credentials = self._store.get_credentials(client_id, now)
        if credentials is None:
            self._clients.pop(client_id, None)
        else:
            self._clients[client_id] = _cached(credentials)
            self._hold_longest(credentials.app.token_ttl or 0, now)

    def _hold_longest(self, ttl: int, now: float) -> None:
        if ttl >= self.longest_app_ttl:
            self.longest_app_ttl, self._longest_held_until = ttl, now + ttl

    async def start(self) -> None:
        await asyncio.to_thread(self.load)
        wake = asyncio.Event()
        if self._listener is not None:
            loop = asyncio.get_running_loop()

            def wake_from_thread() -> None:
                loop.call_soon_threadsafe(wake.set)

            self._listener.start(wake_from_thread)
        self._task = asyncio.create_task(self._follow_changes(wake), name="leanauth-cache-refresh")

    async def stop(self) -> None:
        if self._listener is not None:
            await asyncio.to_thread(self._listener.stop)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self.store_calls.close()

    async def _follow_changes(self, wake: asyncio.Event) -> None:
        while True:
            # A notification from another node wakes this at once; else poll on the interval.
            # The key ring changes with time too (a key activates, a retired one leaves).
            until_keys_change = self.keyring.next_change_at - time.time()
            timeout = max(0.01, min(self._refresh_interval, until_keys_change))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), timeout=timeout)
            wake.clear()
            self.follow_key_schedule()
            try:
                await asyncio.to_thread(self.apply_changes)
            except StoreError as exc:
                log.warning("registry refresh failed; serving from cache: %s", exc)
            except Exception:
                log.exception("registry refresh failed; serving from cache")

    # Hot-path reads

    def add_revoked(self, jti: str, expires_at: int) -> None:
        self._revoked[jti] = expires_at

    def is_revoked(self, jti: str) -> bool:
        return jti in self._revoked

    def client(self, client_id: str) -> CachedClient | None:
        return self._clients.get(client_id)

    @property
    def app_count(self) -> int:
        return len(self._clients)

    def token_is_current(self, client_id: str, issued_at: float) -> bool:
        """Whether a token of ``client_id`` issued at ``issued_at`` still counts: its app
        exists and is enabled, and has not revoked its tokens since."""
        client = self._clients.get(client_id)
        return client is not None and client.app.token_is_current(issued_at)

    def customer_added(self, customer: Customer) -> None:
        """A customer this process created: known here at once, before the feed says so."""
        self.directory.add(id_key(customer.customer_id), customer.client_id)

    async def owns_customer(
        self,
        client_id: str,
        customer_id: str,
        key: bytes,
        may_ask_store: bool,
        now: float,
    ) -> bool:
        """Whether app ``client_id`` owns the customer: from memory, except for an id that
        may name a customer created a moment ago on another node, which the store is asked
        about (:class:`~leanauth.directory.NewIdLookups` bounds how often), for at most the
        store calls' deadline.

        Raises :class:`~leanauth.store.base.StoreError` when the store cannot answer (in
        time: :class:`StoreTimeout`) and :class:`NewIdLookupsSpent` when the app has spent
        this second's look-ups."""
        verdict = self.directory.owner(key, client_id)
        lookups = self._new_id_lookups
        if verdict is not None or lookups.known_missing(key):
            metrics.CUSTOMER_LOOKUPS.inc("memory")
            return bool(verdict)
        if not may_ask_store:
            metrics.CUSTOMER_LOOKUPS.inc("refused")
            return False
        if not lookups.allow(client_id, now):
            metrics.CUSTOMER_LOOKUPS.inc("refused")
            raise NewIdLookupsSpent
        metrics.CUSTOMER_LOOKUPS.inc("store")
        found = await self.store_calls.run(self._store.get_customer, customer_id)
        if found is None:
            lookups.remember_missing(key)
            return False
        self.directory.add(key, found.client_id)
        return found.client_id == client_id


class NewIdLookupsSpent(Exception):
    """An app asked about more possibly-new customer ids this second than it may."""
