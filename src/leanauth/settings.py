"""One frozen, typed Settings object, read from ``LEANAUTH_*`` environment variables.

Every option is documented here, next to its default, and in the README's settings table.
A bad value stops start-up with one line naming the setting (:class:`SettingsError`).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import difflib
import ipaddress
import os
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

SIGNING_ALGORITHMS = ("ES256", "EdDSA", "PS256", "RS256")

# The LinkSDK refuses a customer token with less than ten minutes left: a customer token
# lives at least that, plus a minute for the trip to the SDK (and for clients to reuse it).
MIN_CUSTOMER_TOKEN_TTL = 660
MIN_TOKEN_TTL = 60
MAX_TOKEN_TTL = 86_400


class SettingsError(ValueError):
    """A setting has a bad value; the message is one line that names it."""


@dataclass(frozen=True, repr=False)
class Secret:
    """A secret value whose ``repr`` never shows it (so it cannot leak into logs)."""

    value: bytes = field(repr=False)

    def __repr__(self) -> str:
        return "Secret('**********')"


@dataclass(frozen=True)
class Settings:
    # LEANAUTH_DATABASE_URL: SQLAlchemy URL of the registry. Default: an SQLite file
    # ``var/leanauth.db`` under the working directory.
    database_url: str = field(default="sqlite:///var/leanauth.db", repr=False)
    # LEANAUTH_DB_POOL_SIZE / LEANAUTH_DB_CONNECT_TIMEOUT / LEANAUTH_DB_STATEMENT_TIMEOUT:
    # PostgreSQL connections per process, and seconds to wait for a connection or a statement.
    db_pool_size: int = 5
    db_connect_timeout: float = 5.0
    db_statement_timeout: float = 5.0
    # LEANAUTH_DB_REQUEST_TIMEOUT: seconds a request waits for the database (a customer id
    # that may be new, the Customers API, a revocation) before it is answered 503.
    db_request_timeout: float = 2.0
    # LEANAUTH_REDIS_URL: optional Redis (redis://host:port/db) for cluster-wide fast state and
    # change notifications; without it each node keeps that state in process.
    redis_url: str | None = field(default=None, repr=False)
    # LEANAUTH_HOST / LEANAUTH_PORT: where ``leanauth serve`` listens.
    host: str = "127.0.0.1"
    port: int = 8000
    # LEANAUTH_ISSUER: the ``iss`` of every token and the metadata's issuer. Default:
    # ``http://<host>:<port>``.
    issuer: str = "http://127.0.0.1:8000"
    # LEANAUTH_SIGNING_ALG: algorithm of newly created signing keys.
    signing_alg: str = "ES256"
    # LEANAUTH_TOKEN_TTL: default token lifetime in seconds (an app may override it).
    token_ttl: int = 3600
    # LEANAUTH_API_AUDIENCE / LEANAUTH_CUSTOMER_AUDIENCE: ``aud`` of ``api`` tokens and of
    # ``customer.<id>`` tokens.
    api_audience: str = "urn:leanauth:api"
    customer_audience: str = "urn:leanauth:link"
    admin_audience: str = "urn:leanauth:admin"
    # LEANAUTH_KEY_ENCRYPTION_KEY: 32 bytes, base64 or base64url, that encrypt signing keys
    # at rest and key the client-secret hashes. When unset, LEANAUTH_KEY_ENCRYPTION_KEY_FILE
    # (default: ``leanauth.kek`` beside the SQLite database) is read, or created with mode 0600.
    key_encryption_key: Secret | None = None
    key_encryption_key_file: Path | None = None
    # LEANAUTH_REFRESH_INTERVAL: seconds between two looks for registry changes made by other
    # processes (the CLI, other workers); bounds how stale the in-process caches can be.
    refresh_interval: float = 1.0
    # LEANAUTH_JWKS_MAX_AGE: seconds a client may cache the JWKS and the metadata.
    jwks_max_age: int = 300
    # LEANAUTH_KEY_PREPUBLISH: seconds a new signing key is published before it signs, so
    # verifiers' cached JWKS hold it first; at least LEANAUTH_JWKS_MAX_AGE.
    key_prepublish: int = 600
    # LEANAUTH_KEY_ROTATION_DAYS: rotate the signing key automatically when the newest key is
    # this many days old (0: only by `leanauth keys rotate`).
    key_rotation_days: int = 0
    # LEANAUTH_AUTH_FAILURE_LIMIT / LEANAUTH_AUTH_FAILURE_ADDRESS_LIMIT: failed client
    # authentications allowed per (client id, source address) and per source address, as
    # "N per SECOND|MINUTE|HOUR"; past them the token endpoint answers 429 to that pair or
    # address until the window ends (RFC 6749 §2.3.1 asks for brute-force protection).
    auth_failure_limit: str = "10 per minute"
    auth_failure_address_limit: str = "100 per minute"
    # LEANAUTH_SCOPE_FAILURE_LIMIT: requests of an authenticated app refused for their scope
    # (an unknown customer, say) allowed per app and process; past it those refusals get 429
    # and the app's unknown customer ids are no longer looked up in the database.
    scope_failure_limit: str = "600 per minute"
    # LEANAUTH_TRUSTED_PROXIES: comma list of proxy addresses or networks whose
    # X-Forwarded-For is believed; from anyone else the peer address is the source.
    trusted_proxies: tuple[str, ...] = ()
    # LEANAUTH_INTROSPECTION_MAX_STALENESS: seconds the revocation list may go without a
    # successful refresh before introspection answers 503 rather than risk a wrong answer;
    # at least twice LEANAUTH_REFRESH_INTERVAL (a healthy node refreshes that often).
    introspection_max_staleness: float = 10.0
    # LEANAUTH_MAX_CLOCK_SKEW: seconds this node's clock may be off from the database's
    # (PostgreSQL) before it says so in its log and in /readyz; at most the 30 s the token
    # checks allow between nodes, past which the node is not ready (leanauth.clock).
    max_clock_skew: float = 5.0
    # LEANAUTH_MAX_REVOCATIONS_PER_APP: live revocations (RFC 7009) one app may hold; every
    # node keeps them in memory until the revoked tokens expire.
    max_revocations_per_app: int = 10_000
    # LEANAUTH_AUDIT_LOG: also emit every audit record as a log line (they always go to the
    # database); "all", "failures" (failed authentications and admin changes) or "none".
    audit_log: str = "failures"
    # LEANAUTH_AUDIT_QUEUE_MB: memory each process may fill with audit records waiting for
    # the database (during an outage); past it new records are dropped, counted and logged.
    audit_queue_mb: int = 64
    # LEANAUTH_JOURNAL_DIR: where each worker journals the audit records it has not yet
    # written to the database (a worker that dies loses none); "off": no journal.
    # Default: ``journal/`` beside the SQLite database, else ``var/journal``.
    journal_dir: str = ""
    # LEANAUTH_AUDIT_RETENTION_DAYS: audit records older than this are deleted (hourly).
    audit_retention_days: int = 90
    # LEANAUTH_CUSTOMERS_API: serve the Customers API (/customers/v1/) on this server.
    customers_api: bool = True
    # LEANAUTH_DRAIN_SECONDS: on SIGTERM, seconds the node goes on serving while /readyz
    # answers 503, so that load balancers take it out before it stops accepting.
    drain_seconds: float = 5.0
    # LEANAUTH_SHUTDOWN_TIMEOUT: after the drain, seconds requests already received may take
    # to finish before the worker exits regardless.
    shutdown_timeout: int = 10
    # LEANAUTH_MAX_CONNECTIONS: open connections per worker; past it requests get 503.
    max_connections: int = 2048
    # LEANAUTH_KEEPALIVE_TIMEOUT: seconds an idle keep-alive connection is kept open.
    keepalive_timeout: int = 5
    # LEANAUTH_HEADER_TIMEOUT / LEANAUTH_BODY_TIMEOUT: seconds a client has to send a
    # request's head (from its first byte, or from connecting) and then its body.
    header_timeout: float = 10.0
    body_timeout: float = 10.0
    # LEANAUTH_LOG_LEVEL: debug, info, warning or error.
    log_level: str = "info"
    # LEANAUTH_LOG_FORMAT: ``plain`` lines for people or ``json``, one object per line.
    log_format: str = "plain"
    # LEANAUTH_METRICS_PORT: serve Prometheus metrics (every worker's, merged) on this port of
    # LEANAUTH_HOST, from the supervisor; 0: at GET /metrics on the public port instead.
    metrics_port: int = 0
    # LEANAUTH_METRICS_DIR: where the workers of one node leave their metrics snapshots (the
    # supervisor sets a fresh one per run); unset: a temporary directory of the process.
    metrics_dir: Path | None = None

    @property
    def sqlite_path(self) -> Path | None:
        """The file of an SQLite database URL, or None for other databases."""
        if not self.database_url.startswith("sqlite"):
            return None
        path = self.database_url.split(":///", 1)[1] if ":///" in self.database_url else ""
        return Path(path) if path and path != ":memory:" else None

    @property
    def data_dir(self) -> Path:
        """Where local files live: beside the SQLite database, else ``var/``."""
        db = self.sqlite_path
        return db.parent if db is not None else Path("var")

    @property
    def journal_folder(self) -> Path | None:
        """The audit journal's folder; None when the journal is off."""
        if self.journal_dir.lower() == "off":
            return None
        return Path(self.journal_dir) if self.journal_dir else self.data_dir / "journal"

    def kek_file(self) -> Path:
        if self.key_encryption_key_file is not None:
            return self.key_encryption_key_file
        return self.data_dir / "leanauth.kek"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        reader = _Reader(env)
        host = reader.text("HOST", cls.host)
        port = reader.integer("PORT", cls.port, low=1, high=65_535)
        settings = cls(
            database_url=reader.database_url(),
            db_pool_size=reader.integer("DB_POOL_SIZE", cls.db_pool_size, 1, 100),
            db_connect_timeout=reader.number(
                "DB_CONNECT_TIMEOUT", cls.db_connect_timeout, 0.1, 120
            ),
            db_statement_timeout=reader.number(
                "DB_STATEMENT_TIMEOUT", cls.db_statement_timeout, 0.1, 600
            ),
            db_request_timeout=reader.number(
                "DB_REQUEST_TIMEOUT", cls.db_request_timeout, 0.1, 600
            ),
            redis_url=reader.redis_url(),
            host=host,
            port=port,
            issuer=reader.issuer(f"http://{host}:{port}"),
            signing_alg=reader.choice("SIGNING_ALG", cls.signing_alg, SIGNING_ALGORITHMS),
            token_ttl=reader.integer("TOKEN_TTL", cls.token_ttl, MIN_TOKEN_TTL, MAX_TOKEN_TTL),
            api_audience=reader.text("API_AUDIENCE", cls.api_audience),
            customer_audience=reader.text("CUSTOMER_AUDIENCE", cls.customer_audience),
            admin_audience=reader.text("ADMIN_AUDIENCE", cls.admin_audience),
            key_encryption_key=reader.kek(),
            key_encryption_key_file=reader.path("KEY_ENCRYPTION_KEY_FILE"),
            refresh_interval=reader.number("REFRESH_INTERVAL", cls.refresh_interval, 0.05, 60),
            jwks_max_age=reader.integer("JWKS_MAX_AGE", cls.jwks_max_age, 0, 86_400),
            log_level=reader.choice(
                "LOG_LEVEL", cls.log_level, ("debug", "info", "warning", "error")
            ),
            log_format=reader.choice("LOG_FORMAT", cls.log_format, ("plain", "json")),
            key_prepublish=reader.integer("KEY_PREPUBLISH", cls.key_prepublish, 0, 30 * 86_400),
            key_rotation_days=reader.integer("KEY_ROTATION_DAYS", cls.key_rotation_days, 0, 3650),
            auth_failure_limit=reader.rate("AUTH_FAILURE_LIMIT", cls.auth_failure_limit),
            auth_failure_address_limit=reader.rate(
                "AUTH_FAILURE_ADDRESS_LIMIT", cls.auth_failure_address_limit
            ),
            scope_failure_limit=reader.rate("SCOPE_FAILURE_LIMIT", cls.scope_failure_limit),
            trusted_proxies=reader.networks("TRUSTED_PROXIES"),
            introspection_max_staleness=reader.number(
                "INTROSPECTION_MAX_STALENESS", cls.introspection_max_staleness, 1, 3600
            ),
            max_clock_skew=reader.number("MAX_CLOCK_SKEW", cls.max_clock_skew, 0.1, 30),
            max_revocations_per_app=reader.integer(
                "MAX_REVOCATIONS_PER_APP", cls.max_revocations_per_app, 1, 10_000_000
            ),
            audit_log=reader.choice("AUDIT_LOG", cls.audit_log, ("all", "failures", "none")),
            journal_dir=reader.text("JOURNAL_DIR", cls.journal_dir),
            audit_queue_mb=reader.integer("AUDIT_QUEUE_MB", cls.audit_queue_mb, 1, 16_384),
            customers_api=reader.boolean("CUSTOMERS_API", cls.customers_api),
            audit_retention_days=reader.integer(
                "AUDIT_RETENTION_DAYS", cls.audit_retention_days, 1, 36_500
            ),
            metrics_port=reader.integer("METRICS_PORT", cls.metrics_port, 0, 65_535),
            metrics_dir=reader.path("METRICS_DIR"),
            drain_seconds=reader.number("DRAIN_SECONDS", cls.drain_seconds, 0, 600),
            shutdown_timeout=reader.integer("SHUTDOWN_TIMEOUT", cls.shutdown_timeout, 1, 600),
            max_connections=reader.integer("MAX_CONNECTIONS", cls.max_connections, 1, 1_000_000),
            keepalive_timeout=reader.integer("KEEPALIVE_TIMEOUT", cls.keepalive_timeout, 1, 600),
            header_timeout=reader.number("HEADER_TIMEOUT", cls.header_timeout, 0.1, 600),
            body_timeout=reader.number("BODY_TIMEOUT", cls.body_timeout, 0.1, 600),
        )
        if settings.introspection_max_staleness < 2 * settings.refresh_interval:
            raise SettingsError(
                "LEANAUTH_INTROSPECTION_MAX_STALENESS: must be at least twice "
                f"LEANAUTH_REFRESH_INTERVAL ({settings.refresh_interval}), "
                f"got {settings.introspection_max_staleness}"
            )
        if settings.admin_audience in (settings.api_audience, settings.customer_audience):
            # An admin token must never pass for another class at a resource server.
            raise SettingsError(
                "LEANAUTH_ADMIN_AUDIENCE: must differ from LEANAUTH_API_AUDIENCE and "
                "LEANAUTH_CUSTOMER_AUDIENCE"
            )
        if settings.metrics_port == settings.port:
            raise SettingsError(
                f"LEANAUTH_METRICS_PORT: must differ from LEANAUTH_PORT ({settings.port}); "
                "0 serves /metrics on that port"
            )
        if settings.key_prepublish < settings.jwks_max_age:
            raise SettingsError(
                f"LEANAUTH_KEY_PREPUBLISH: must be at least LEANAUTH_JWKS_MAX_AGE "
                f"({settings.jwks_max_age}), got {settings.key_prepublish}"
            )
        return settings


def decode_key(text: str) -> bytes | None:
    """Decode a 32-byte key written in base64, base64url or hex; None when it is not one."""
    text = text.strip()
    candidates: list[bytes] = []
    with contextlib.suppress(ValueError):
        candidates.append(bytes.fromhex(text))
    padded = text + "=" * (-len(text) % 4)
    for decoder in (base64.urlsafe_b64decode, base64.b64decode):
        with contextlib.suppress(binascii.Error, ValueError):
            candidates.append(decoder(padded))
    return next((c for c in candidates if len(c) == 32), None)


class _Reader:
    """Reads and checks one ``LEANAUTH_<NAME>`` variable at a time."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self._env = env

    def _raw(self, name: str) -> str | None:
        value = self._env.get(f"LEANAUTH_{name}")
        return None if value is None or value.strip() == "" else value.strip()

    def _fail(self, name: str, why: str) -> SettingsError:
        return SettingsError(f"LEANAUTH_{name}: {why}")

    def text(self, name: str, default: str) -> str:
        return self._raw(name) or default

    def path(self, name: str) -> Path | None:
        raw = self._raw(name)
        return Path(raw) if raw else None

    def integer(self, name: str, default: int, low: int, high: int) -> int:
        raw = self._raw(name)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            raise self._fail(name, f"expected an integer, got {raw!r}") from None
        if not low <= value <= high:
            raise self._fail(name, f"must be between {low} and {high}, got {value}")
        return value

    def number(self, name: str, default: float, low: float, high: float) -> float:
        raw = self._raw(name)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            raise self._fail(name, f"expected a number, got {raw!r}") from None
        if not low <= value <= high:
            raise self._fail(name, f"must be between {low} and {high}, got {value}")
        return value

    def choice(self, name: str, default: str, allowed: tuple[str, ...]) -> str:
        raw = self._raw(name)
        if raw is None:
            return default
        by_folded = {a.casefold(): a for a in allowed}
        if raw.casefold() not in by_folded:
            raise self._fail(name, f"must be one of {', '.join(allowed)}, got {raw!r}")
        return by_folded[raw.casefold()]

    def database_url(self) -> str:
        raw = self._raw("DATABASE_URL") or Settings.database_url
        scheme = raw.split(":", 1)[0].split("+", 1)[0]
        if scheme not in ("sqlite", "postgresql", "postgres") or "://" not in raw:
            raise self._fail("DATABASE_URL", "expected sqlite:///PATH or postgresql://...")
        return raw

    def boolean(self, name: str, default: bool) -> bool:
        raw = self._raw(name)
        if raw is None:
            return default
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise self._fail(name, f"expected true or false, got {raw!r}")

    def rate(self, name: str, default: str) -> str:
        raw = self._raw(name)
        if raw is None:
            return default
        # Imported only to check a rate that is set: every command reads the settings.
        import limits  # noqa: PLC0415

        try:
            limits.parse(raw)
        except ValueError:
            raise self._fail(
                name, f"expected 'N per second|minute|hour|day', got {raw!r}"
            ) from None
        return raw

    def networks(self, name: str) -> tuple[str, ...]:
        raw = self._raw(name)
        if raw is None:
            return ()
        parts = tuple(p.strip() for p in raw.split(",") if p.strip())
        for part in parts:
            try:
                ipaddress.ip_network(part, strict=False)
            except ValueError:
                raise self._fail(name, f"{part!r} is not an address or network") from None
        return parts

    def redis_url(self) -> str | None:
        raw = self._raw("REDIS_URL")
        if raw is not None and urlsplit(raw).scheme not in ("redis", "rediss", "unix"):
            raise self._fail("REDIS_URL", "expected redis://HOST:PORT/DB, rediss:// or unix://")
        return raw

    def issuer(self, default: str) -> str:
        raw = self._raw("ISSUER") or default
        parts = urlsplit(raw)
        # RFC 8414 §2: an https URL with no query or fragment (http is allowed for local use).
        if parts.scheme not in ("https", "http") or not parts.netloc:
            raise self._fail("ISSUER", f"expected an http(s) URL, got {raw!r}")
        if "?" in raw or "#" in raw:
            raise self._fail("ISSUER", "must not have a query or fragment")
        return raw.rstrip("/")

    def kek(self) -> Secret | None:
        raw = self._raw("KEY_ENCRYPTION_KEY")
        if raw is None:
            return None
        key = decode_key(raw)
        if key is None:
            raise self._fail("KEY_ENCRYPTION_KEY", "expected 32 bytes in base64, base64url or hex")
        return Secret(key)


class _NamesAsked(Mapping[str, str]):
    """An empty environment that notes every name looked up in it."""

    def __init__(self) -> None:
        self.names: set[str] = set()

    def __getitem__(self, name: str) -> str:
        self.names.add(name)
        raise KeyError(name)

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0


def known_variables() -> frozenset[str]:
    """Every ``LEANAUTH_*`` variable :meth:`Settings.from_env` reads, found by letting it
    read an empty environment that notes each name: the list cannot fall behind the code."""
    asked = _NamesAsked()
    Settings.from_env(asked)
    return frozenset(asked.names)


# The test suite's own variables (tests/conftest.py): the servers it starts inherit them.
_TEST_PREFIX = "LEANAUTH_TEST_"


def unknown_variables(
    environ: Mapping[str, str], also_known: Collection[str] = ()
) -> list[tuple[str, str | None]]:
    """The ``LEANAUTH_*`` names in ``environ`` that nothing reads, each with the known name
    it is most likely a typo of (None when none is close)."""
    known = known_variables() | set(also_known)
    suffixes = {name.removeprefix("LEANAUTH_"): name for name in known}
    unknown = []
    for name in sorted(environ):
        if not name.startswith("LEANAUTH_") or name in known or name.startswith(_TEST_PREFIX):
            continue
        # Compared without the prefix every name shares, which would make any two look alike.
        close = difflib.get_close_matches(name.removeprefix("LEANAUTH_"), suffixes, 1, 0.75)
        unknown.append((name, suffixes[close[0]] if close else None))
    return unknown
