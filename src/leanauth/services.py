"""The parts a running server is made of, built once from the runtime, and the background
work that keeps request handling free of database writes."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from leanauth import metrics, registry
from leanauth.audit import AuditTrail
from leanauth.bootstrap import Runtime
from leanauth.cache import RegistryCache
from leanauth.clientauth import ClientAuthenticator
from leanauth.credentials import SecretUse
from leanauth.journal import Journal, JournalUnavailable, database_tag, ensure_folder
from leanauth.notify import listener_for
from leanauth.owntokens import OwnTokens
from leanauth.quotas import UsageCounter
from leanauth.scopes import ScopeClass
from leanauth.settings import Settings, SettingsError
from leanauth.throttle import FailureThrottle, SourceAddress
from leanauth.tokens import TokenIssuer

log = logging.getLogger("leanauth.services")

# Once a second: on PostgreSQL every flush costs round trips and server work on top of the
# rows themselves, and flushing four times a second took 10% off token throughput (measured);
# on SQLite a second's batch shows in the tail latency (p99 ~10 ms instead of ~7 ms).
FLUSH_INTERVAL = 1.0
KEY_ROTATION_CHECK_INTERVAL = 60.0
AUDIT_PRUNE_INTERVAL = 3600.0


@dataclass
class Services:
    runtime: Runtime
    cache: RegistryCache
    issuer: TokenIssuer
    throttle: FailureThrottle
    usage: UsageCounter
    audit: AuditTrail
    source_address: SourceAddress
    clients: ClientAuthenticator
    own_tokens: OwnTokens
    secret_use: SecretUse = field(default_factory=SecretUse)

    @classmethod
    def build(cls, runtime: Runtime) -> Services:
        settings = runtime.settings
        cache = RegistryCache(
            runtime.store,
            runtime.cipher,
            settings.refresh_interval,
            listener_for(settings),
            settings.db_request_timeout,
        )
        throttle = FailureThrottle(
            settings.auth_failure_limit,
            settings.auth_failure_address_limit,
            settings.scope_failure_limit,
            settings.redis_url,
        )
        audiences: dict[ScopeClass, str] = {
            "api": settings.api_audience,
            "customer": settings.customer_audience,
            "admin": settings.admin_audience,
        }
        issuer = TokenIssuer(settings.issuer, audiences, settings.token_ttl)
        return cls(
            runtime=runtime,
            cache=cache,
            issuer=issuer,
            throttle=throttle,
            usage=UsageCounter(runtime.store),
            audit=AuditTrail(
                runtime.store,
                settings.audit_log,
                settings.audit_queue_mb * 1024 * 1024,
                open_journal(settings),
            ),
            source_address=SourceAddress(settings.trusted_proxies),
            clients=ClientAuthenticator(cache, runtime.hasher, throttle),
            own_tokens=OwnTokens(cache, settings.issuer, issuer),
        )

    def flush(self, final: bool = False) -> None:
        """Write what requests recorded in memory to the store (blocking); what cannot be
        written now is kept for the next flush. Journal segments go once both their audit
        records and the usage counts of their tokens are in the store. The ``final`` flush
        (at exit) stops at the first failure: with the database away, each step would wait
        out its own deadline, and the journal keeps the records for the next start anyway."""
        self.usage.add(self.audit.take_over_orphans())
        self.audit.seal_journal()
        steps = (
            ("secret_use", self._flush_secret_use),
            ("usage", self.usage.flush),
            ("audit", lambda: self.audit.flush(everything=final)),
        )
        failed = set()
        for name, step in steps:
            try:
                step()
            except Exception as exc:
                failed.add(name)
                metrics.BACKGROUND_WRITE_FAILURES.inc(name)
                log.warning("background write failed (will retry): %s", exc)
                if final:
                    return
        if "usage" not in failed:
            self.audit.release_journal()

    def metrics_sample(self) -> dict[str, float]:
        """The gauges (and the audit trail's own counts) for this process's metrics snapshot;
        times as Unix times, turned into ages when rendered (so a stalled worker's age grows)."""
        cache = self.cache
        synced_ago = time.monotonic() - cache.synced_at
        return {
            metrics.AUDIT_QUEUED.name: self.audit.queued,
            metrics.AUDIT_DROPPED.name: self.audit.dropped,
            metrics.AUDIT_REJECTED.name: self.audit.rejected,
            metrics.AUDIT_UNJOURNALED.name: self.audit.unjournaled,
            metrics.REGISTRY_STALENESS.name: time.time() - synced_ago,
            metrics.REGISTRY_APPS.name: cache.app_count,
            metrics.REGISTRY_CUSTOMERS.name: cache.directory.size,
            metrics.SIGNING_KEY_AGE.name: cache.keyring.active_since,
        }

    def _flush_secret_use(self) -> None:
        self.secret_use.flush(self.runtime.store.record_secret_use)

    def prune_audit_trail(self) -> None:
        """Delete audit records past their retention (every node may: it is idempotent)."""
        days = self.runtime.settings.audit_retention_days
        before_ms = int((time.time() - days * 86_400) * 1000)
        removed = self.runtime.store.prune_audit_events(before_ms)
        if removed:
            log.info("deleted %d audit records older than %d days", removed, days)

    def rotate_key_if_due(self) -> None:
        key = registry.rotate_key_if_due(self.runtime, int(time.time()))
        if key is not None:
            log.info(
                "rotated the signing key automatically: %s signs from %d", key.kid, key.activates_at
            )


def open_journal(settings: Settings) -> Journal | None:
    """This process's audit journal (None when LEANAUTH_JOURNAL_DIR is ``off``)."""
    folder = settings.journal_folder
    if folder is None:
        return None
    try:
        return Journal(folder, database_tag(settings.database_url))
    except JournalUnavailable as exc:
        raise _unusable(exc) from None


def check_journal_folder(settings: Settings) -> None:
    """Refuse, before any worker starts, a journal folder that cannot be made or written."""
    folder = settings.journal_folder
    if folder is not None:
        try:
            ensure_folder(folder)
        except JournalUnavailable as exc:
            raise _unusable(exc) from None


def _unusable(exc: JournalUnavailable) -> SettingsError:
    return SettingsError(
        f"LEANAUTH_JOURNAL_DIR: cannot keep the audit journal in {exc} "
        "(set a writable folder, or 'off')"
    )
