"""Registry operations shared by the CLI and the HTTP surfaces: apps, secrets, customers and
key rotation. Each change and its audit record (kind ``admin``) are one store transaction:
a process killed at any moment leaves both or neither, never a live secret or signing key
that was neither printed nor audited."""

from __future__ import annotations

import logging
import secrets
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import orjson

from leanauth.audit import audit_record, now_ms
from leanauth.bootstrap import Runtime
from leanauth.credentials import new_client_secret, new_secret_id
from leanauth.keys import new_stored_key
from leanauth.safetext import has_control_characters
from leanauth.scopes import ScopeClass
from leanauth.settings import MAX_TOKEN_TTL, MIN_TOKEN_TTL
from leanauth.store.base import AlreadyExists, AppChanges, NotFound, StoreError
from leanauth.store.models import App, AuditEvent, ClientSecret, Customer, StoredKey

log = logging.getLogger("leanauth.audit")

MAX_APP_NAME = 200
# A key due to activate within this many seconds (at most half the pre-publication period)
# is kept by a newer rotation: a node whose clock runs ahead may already sign with it.
ACTIVATION_MARGIN = 60
DEFAULT_SECRET_GRACE = 86_400
MAX_APP_USER_ID = 255


_uuid_lock = threading.Lock()
_uuid_last = (0, 0)  # (milliseconds, counter) of the last time-ordered UUID


def time_ordered_uuid() -> tuple[uuid.UUID, int]:
    """A UUIDv7 (RFC 9562 §5.7) and its millisecond time: ids made by one process sort in the
    order they were made (a 12-bit counter orders ids of the same millisecond), so customers
    list in creation order."""
    global _uuid_last  # noqa: PLW0603 (the process-wide counter of RFC 9562 §6.2)
    with _uuid_lock:
        ms, counter = time.time_ns() // 1_000_000, 0
        last_ms, last_counter = _uuid_last
        if ms <= last_ms:
            ms, counter = last_ms, last_counter + 1
            if counter > 0xFFF:
                ms, counter = last_ms + 1, 0
        _uuid_last = (ms, counter)
    value = (ms << 80) | (0x7 << 76) | (counter << 64) | (0b10 << 62) | secrets.randbits(62)
    return uuid.UUID(int=value), ms


@dataclass
class _AuditNotes:
    """The audit records an admin change notes as it learns what it did."""

    actor: str
    events: list[AuditEvent] = field(default_factory=list)

    def add(self, action: str, client_id: str | None, **detail: object) -> None:
        self.events.append(
            AuditEvent(now_ms(), "admin", action, client_id, self.actor, detail or None)
        )


@contextmanager
def _audited(runtime: Runtime) -> Iterator[_AuditNotes]:
    """One admin change: the store calls made in the block and the audit records noted in it
    commit in one transaction, or nothing does. The records' log lines follow the commit, so
    none tells of a change that was rolled back."""
    notes = _AuditNotes(runtime.actor)
    with runtime.store.atomic():
        yield notes
        _write_audit(runtime, notes.events)
    for event in notes.events:
        log.info("%s", orjson.dumps(audit_record(event)).decode())


def _write_audit(runtime: Runtime, events: list[AuditEvent]) -> None:
    try:
        runtime.store.add_audit_events(events)
    except StoreError as exc:
        # Raised inside the transaction: the change is rolled back with it. The same class,
        # so that a refusal of the records stays one (RejectedRecords).
        raise type(exc)(
            f"the audit record could not be written, so nothing changed: {exc}"
        ) from exc


@dataclass(frozen=True)
class NewCredentials:
    """An app with its freshly issued secret: the only time the secret is ever seen."""

    app: App
    client_secret: str
    secret_id: str
    # A rotation's: when the secrets that were live before it stop working, at the latest.
    old_secrets_expire_at: int | None = None


def _issue_secret(runtime: Runtime, client_id: str, now: int) -> tuple[str, ClientSecret]:
    plaintext = new_client_secret()
    record = ClientSecret(new_secret_id(), client_id, runtime.hasher.hash(plaintext), now)
    return plaintext, record


def create_app(
    runtime: Runtime,
    name: str,
    scopes: frozenset[ScopeClass],
    token_ttl: int | None = None,
    *,
    introspect: bool = False,
    quota_hourly: int | None = None,
    quota_daily: int | None = None,
) -> NewCredentials:
    name = _checked_name(name)
    _check_token_ttl(token_ttl)
    _check_scopes(scopes)
    check_quotas(quota_hourly, quota_daily)
    now = int(time.time())
    app = App(
        str(uuid.uuid4()), name, scopes, token_ttl, True, now, introspect, quota_hourly, quota_daily
    )
    plaintext, record = _issue_secret(runtime, app.client_id, now)
    with _audited(runtime) as audit:
        runtime.store.create_app(app, record)
        audit.add("app.create", app.client_id, name=name, secret_id=record.secret_id)
    return NewCredentials(app, plaintext, record.secret_id)


def _checked_name(name: str) -> str:
    name = name.strip()
    if not name or len(name) > MAX_APP_NAME:
        raise ValueError(f"the app name must have 1 to {MAX_APP_NAME} characters")
    if has_control_characters(name):
        raise ValueError("the app name must not contain control characters")
    return name


def _check_token_ttl(token_ttl: int | None) -> None:
    if token_ttl is not None and not MIN_TOKEN_TTL <= token_ttl <= MAX_TOKEN_TTL:
        raise ValueError(f"the token lifetime must be {MIN_TOKEN_TTL} to {MAX_TOKEN_TTL} seconds")


def _check_scopes(scopes: frozenset[ScopeClass]) -> None:
    if not scopes:
        raise ValueError("an app needs at least one scope class")


def update_app(runtime: Runtime, client_id: str, changes: AppChanges) -> App:
    """Change some of an app's settings, checked as ``create_app`` checks them. Every node
    applies the change when it reads the change feed: narrower scopes or another token
    lifetime hold for the next token it issues (tokens issued before keep their own)."""
    if not changes:
        raise ValueError("nothing to change")
    if "name" in changes:
        changes = {**changes, "name": _checked_name(changes["name"])}
    if "scopes" in changes:
        _check_scopes(changes["scopes"])
    _check_token_ttl(changes.get("token_ttl"))
    check_quotas(changes.get("quota_hourly"), changes.get("quota_daily"))
    # The audit record as JSON has it: scopes as a sorted list.
    detail = {k: sorted(v) if isinstance(v, frozenset) else v for k, v in changes.items()}
    with _audited(runtime) as audit:
        app = runtime.store.update_app(client_id, **changes)
        audit.add("app.update", client_id, **detail)
    return app


def delete_app(runtime: Runtime, client_id: str) -> dict[str, int]:
    """Remove an app with its secrets, customers, revocations and usage counts; its audit
    records stay. Every node drops it from its view when it reads the change feed: its
    credentials are refused, so no token is issued to it or for its customers, and the
    tokens it holds stop counting (introspection, the Customers API). Returns how many rows
    of each went."""
    with _audited(runtime) as audit:
        app = require_app(runtime, client_id)
        removed = runtime.store.delete_app(client_id)
        audit.add("app.delete", client_id, name=app.name, **removed)
    return removed


def rotate_secret(
    runtime: Runtime, client_id: str, grace: int = DEFAULT_SECRET_GRACE
) -> NewCredentials:
    """Issue a new secret; the old one keeps working for ``grace`` seconds (0: ends now).

    At most two secrets are live at once. Of two rotations racing on one app, one wins and
    the other fails with :class:`~leanauth.store.base.Conflict`, changing nothing.
    """
    if grace < 0:
        raise ValueError("the grace period cannot be negative")
    app = require_app(runtime, client_id)
    now = int(time.time())
    live = frozenset(s.secret_id for s in runtime.store.list_secrets(client_id) if s.live_at(now))
    plaintext, record = _issue_secret(runtime, client_id, now)
    with _audited(runtime) as audit:
        runtime.store.rotate_secret(record, now, now + grace, live)
        audit.add("secret.rotate", client_id, secret_id=record.secret_id, grace=grace)
    return NewCredentials(app, plaintext, record.secret_id, now + grace)


def revoke_secret(runtime: Runtime, client_id: str, secret_id: str) -> None:
    with _audited(runtime) as audit:
        runtime.store.revoke_secret(client_id, secret_id, int(time.time()))
        audit.add("secret.revoke", client_id, secret_id=secret_id)


def set_enabled(runtime: Runtime, client_id: str, enabled: bool) -> App:
    """Enable or disable an app. A disabled app gets no token, and the tokens it holds are
    refused by this server's own checks (Customers API, introspection) until it is enabled."""
    with _audited(runtime) as audit:
        app = runtime.store.update_app(client_id, enabled=enabled)
        audit.add("app.enable" if enabled else "app.disable", client_id)
    return app


def revoke_app_tokens(runtime: Runtime, client_id: str) -> App:
    """End every token the app holds now: one not-before time for the app, not a row per
    token. The moment is the next whole second, since ``iat`` counts whole seconds: a token
    issued in the current second may predate the revocation. Returns once that moment has
    come: a node that has not heard of the change yet then issues tokens that count (one that
    has waits for it in the token endpoint)."""
    not_before = int(time.time()) + 1
    with _audited(runtime) as audit:
        app = runtime.store.update_app(client_id, tokens_not_before=not_before)
        audit.add("app.revoke_tokens", client_id, not_before=not_before)
    time.sleep(max(0.0, not_before - time.time()))
    return app


def check_quotas(hourly: int | None, daily: int | None) -> None:
    for name, value in (("hourly", hourly), ("daily", daily)):
        if value is not None and value < 1:
            raise ValueError(f"the {name} quota must be a positive number of tokens")


def set_quotas(runtime: Runtime, client_id: str, hourly: int | None, daily: int | None) -> App:
    check_quotas(hourly, daily)
    with _audited(runtime) as audit:
        app = runtime.store.update_app(client_id, quota_hourly=hourly, quota_daily=daily)
        audit.add("app.quota", client_id, quota_hourly=hourly, quota_daily=daily)
    return app


def require_app(runtime: Runtime, client_id: str) -> App:
    app = runtime.store.get_app(client_id)
    if app is None:
        raise NotFound(f"no app with client id {client_id}")
    return app


class DuplicateCustomer(AlreadyExists):
    """The app has a customer with this app_user_id already: ``customer_id``."""

    def __init__(self, existing: Customer) -> None:
        super().__init__(
            f"app {existing.client_id} has a customer with app_user_id "
            f"{existing.app_user_id!r} already: {existing.customer_id}"
        )
        self.customer_id = existing.customer_id


def create_customer(runtime: Runtime, client_id: str, app_user_id: str) -> Customer:
    if not 1 <= len(app_user_id) <= MAX_APP_USER_ID:
        raise ValueError(f"app_user_id must have 1 to {MAX_APP_USER_ID} characters")
    if has_control_characters(app_user_id):
        raise ValueError("app_user_id must not contain control characters")
    require_app(runtime, client_id)
    customer_id, created_ms = time_ordered_uuid()
    customer = Customer(str(customer_id), client_id, app_user_id, created_ms // 1000)
    try:
        with _audited(runtime) as audit:
            runtime.store.create_customer(customer)
            audit.add("customer.create", client_id, customer_id=customer.customer_id)
    except AlreadyExists as exc:
        # Read once the failed transaction has rolled back (PostgreSQL reads nothing more in
        # one that failed). None: the row was refused for another reason (the app was
        # deleted meanwhile: NotFound says so), or that customer is gone already.
        existing = runtime.store.find_customer(client_id, app_user_id)
        if existing is not None:
            raise DuplicateCustomer(existing) from exc
        require_app(runtime, client_id)
        raise
    return customer


def delete_customer(runtime: Runtime, client_id: str, customer_id: str) -> None:
    """Remove a customer: its tokens can no longer be had (those issued live out their time)."""
    with _audited(runtime) as audit:
        runtime.store.delete_customer(client_id, customer_id.lower())
        audit.add("customer.delete", client_id, customer_id=customer_id.lower())


def rotate_key(runtime: Runtime, alg: str | None = None, immediately: bool = False) -> StoredKey:
    """Publish a new signing key now; it signs after the pre-publication period
    (``immediately``: at once, for a compromised key: verifiers holding a cached JWKS will
    refuse its tokens until they refetch)."""
    now = int(time.time())
    # What this rotation replaces: a waiting key published after this look is another
    # rotation's, and makes this one fail rather than drop a kid just printed.
    seen_waiting = frozenset(k.kid for k in runtime.store.list_keys() if k.activates_at > now)
    activates_at = now if immediately else now + runtime.settings.key_prepublish
    candidate = new_stored_key(
        alg or runtime.settings.signing_alg, runtime.cipher, now, activates_at
    )
    with _audited(runtime) as audit:
        key = runtime.store.rotate_key(
            candidate, now, keep_within=_activation_margin(runtime), seen_waiting=seen_waiting
        )
        assert key is not None
        _note_rotation(audit, key)
    return key


def revoke_key(runtime: Runtime, kid: str) -> tuple[StoredKey, StoredKey | None]:
    """Revoke a compromised key: it leaves the JWKS and this server refuses its tokens (on
    every node as soon as it hears of the change). If it was signing, a new key of the same
    algorithm signs from now on; returns it as the second value."""
    now = int(time.time())
    key = next((k for k in runtime.store.list_keys() if k.kid == kid), None)
    if key is None:
        raise NotFound(f"no signing key {kid}")
    replacement = new_stored_key(key.alg, runtime.cipher, now)
    with _audited(runtime) as audit:
        revoked, signer = runtime.store.revoke_key(kid, now, replacement)
        audit.add("key.revoke", None, kid=kid, replaced_by=signer.kid if signer else None)
    return revoked, signer


def _note_rotation(audit: _AuditNotes, key: StoredKey) -> None:
    # The key as stored: the store may have queued it behind waiting keys (activates_at).
    audit.add("key.rotate", None, kid=key.kid, alg=key.alg, activates_at=key.activates_at)


def _activation_margin(runtime: Runtime) -> int:
    return min(ACTIVATION_MARGIN, runtime.settings.key_prepublish // 2)


def rotate_key_if_due(runtime: Runtime, now: int) -> StoredKey | None:
    """Automatic rotation: a new key when the newest is ``key_rotation_days`` old. Of several
    processes due at once, one rotates."""
    days = runtime.settings.key_rotation_days
    keys = runtime.store.list_keys()
    due_before = now - days * 86_400
    if not days or (keys and max(k.created_at for k in keys) >= due_before):
        return None
    candidate = new_stored_key(
        runtime.settings.signing_alg, runtime.cipher, now, now + runtime.settings.key_prepublish
    )
    with _audited(runtime) as audit:
        key = runtime.store.rotate_key(
            candidate, now, created_before=due_before, keep_within=_activation_margin(runtime)
        )
        if key is not None:
            _note_rotation(audit, key)
    return key
