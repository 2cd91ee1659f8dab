"""Seed a prepared bench database with a large registry, fast: N apps in all and M customers
of the bench app, written straight into the tables (COPY on PostgreSQL, one executemany
transaction on SQLite), as a long-running installation would have them. Customer ids are
UUIDv7 made over the past 30 days, as `leanauth customers create` makes them. Writes the
customer ids, one a line, for the load generator.

Usage: python bench/seed.py --client-id ID --apps N --customers M --ids-out FILE
(the database is LEANAUTH_DATABASE_URL; run before the server starts, which then loads it).
"""

from __future__ import annotations

import argparse
import os
import secrets
import sqlite3
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg

from leanauth.store.engine import sqlite_file
from leanauth.store.sqlbase import first_line

SPREAD_MS = 30 * 86_400_000


def uuid7_ids(count: int, now_ms: int) -> Iterator[str]:
    """``count`` UUIDv7 strings made over the ``SPREAD_MS`` before ``now_ms``, in order."""
    step = max(1, SPREAD_MS // max(count, 1))
    start = now_ms - SPREAD_MS
    for n in range(count):
        ms = start + n * step
        value = (ms << 80) | (0x7 << 76) | (secrets.randbits(12) << 64)
        value |= (0b10 << 62) | secrets.randbits(62)
        yield str(uuid.UUID(int=value))


def app_rows(count: int, now: int) -> list[tuple[str, str, str, int, bool, bool]]:
    """Apps as (client_id, name, scopes, created_at, enabled, introspect)."""
    return [
        (str(uuid.uuid4()), f"seeded-{n}", "api,customer", now, True, False) for n in range(count)
    ]


def seed_postgres(url: str, client_id: str, apps: int, customer_ids: list[str]) -> None:
    now = int(time.time())
    libpq = "postgresql://" + url.split("://", 1)[1]
    with psycopg.connect(libpq) as conn, conn.cursor() as cursor:
        with cursor.copy(
            "COPY apps (client_id, name, scopes, created_at, enabled, introspect) FROM STDIN"
        ) as copy:
            rows = app_rows(apps, now)
            for row in rows:
                copy.write_row(row)
        with cursor.copy(
            "COPY client_secrets (secret_id, client_id, secret_hash, created_at) FROM STDIN"
        ) as copy:
            for row in rows:
                copy.write_row((f"sec_{secrets.token_hex(8)}", row[0], os.urandom(32), now))
        with cursor.copy(
            "COPY customers (customer_id, client_id, app_user_id, created_at) FROM STDIN"
        ) as copy:
            for n, customer_id in enumerate(customer_ids):
                copy.write_row((customer_id, client_id, f"seeded-user-{n}", now))
        cursor.execute("ANALYZE")


def seed_sqlite(path: Path, client_id: str, apps: int, customer_ids: list[str]) -> None:
    now = int(time.time())
    conn = sqlite3.connect(path, timeout=30)
    try:
        with conn:
            rows = app_rows(apps, now)
            conn.executemany(
                "INSERT INTO apps (client_id, name, scopes, created_at, enabled, introspect)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                rows,
            )
            conn.executemany(
                "INSERT INTO client_secrets (secret_id, client_id, secret_hash, created_at)"
                " VALUES (?, ?, ?, ?)",
                ((f"sec_{secrets.token_hex(8)}", r[0], os.urandom(32), now) for r in rows),
            )
            conn.executemany(
                "INSERT INTO customers (customer_id, client_id, app_user_id, created_at)"
                " VALUES (?, ?, ?, ?)",
                ((c, client_id, f"seeded-user-{n}", now) for n, c in enumerate(customer_ids)),
            )
        conn.execute("ANALYZE")
    finally:
        conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--client-id", required=True, help="the app the customers belong to")
    parser.add_argument("--apps", type=int, default=10_000, help="apps in all (with the bench app)")
    parser.add_argument("--customers", type=int, default=1_000_000)
    parser.add_argument("--ids-out", type=Path, required=True)
    args = parser.parse_args()
    url = os.environ["LEANAUTH_DATABASE_URL"]
    started = time.monotonic()
    customer_ids = list(uuid7_ids(args.customers, time.time_ns() // 1_000_000))
    extra_apps = max(0, args.apps - 1)
    try:
        database = sqlite_file(url)
        if database is not None:
            seed_sqlite(database, args.client_id, extra_apps, customer_ids)
        else:
            seed_postgres(url, args.client_id, extra_apps, customer_ids)
    except (psycopg.Error, sqlite3.Error) as exc:
        raise SystemExit(f"seed.py: {first_line(exc)}") from None
    args.ids_out.write_text("\n".join(customer_ids) + "\n")
    print(
        f"seeded {extra_apps + 1} apps and {args.customers} customers"
        f" in {time.monotonic() - started:.1f}s"
    )


if __name__ == "__main__":
    main()
