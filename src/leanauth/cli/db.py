"""``leanauth db``: the schema's migrations, and backups."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import click

from leanauth.bootstrap import NotInitialised
from leanauth.cli.common import emit, fail, json_option, load_settings, refusal, runtime, store_only
from leanauth.safetext import masked_url
from leanauth.settings import Settings
from leanauth.store import migrate
from leanauth.store.backup import backup_sqlite
from leanauth.store.engine import sqlite_file

# The README's recipe (Upgrades and rollback), for the error line of `db backup`.
PG_DUMP_RECIPE = 'pg_dump --format=custom --file=FILE "$LEANAUTH_DATABASE_URL"'


@click.group()
def db() -> None:
    """The database schema (Alembic migrations), and backups."""


@db.command("upgrade")
@json_option
def db_upgrade(as_json: bool) -> None:
    """Apply every pending migration (safe to run on several nodes at once)."""
    with runtime(schema="upgrade") as rt:
        revision = rt.store.schema_revision()
        data = {"revision": revision, "head": migrate.head_revision()}
        emit(as_json, data, f"schema at {revision}")


@db.command("current")
@json_option
def db_current(as_json: bool) -> None:
    """Show the database's schema revision and the one this code needs."""
    settings = load_settings()
    revision = schema_revision(settings)
    head, state = migrate.head_revision(), migrate.schema_state(revision)
    data = {"revision": revision, "head": head, "current": state == "current", "state": state}
    says = {
        "current": "up to date",
        "behind": "behind: run `leanauth db upgrade`",
        "ahead": str(migrate.SchemaAhead(revision)),
    }
    emit(as_json, data, f"{revision} (head {head}, {says[state]})")


def schema_revision(settings: Settings) -> str:
    """The database's revision; a database without the schema is refused like a missing one."""
    with store_only(settings) as store:
        revision = store.schema_revision()
    if revision is None:
        refusal(NotInitialised(settings))
    return revision


@db.command("backup")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@json_option
def db_backup(file: Path, as_json: bool) -> None:
    """Copy the SQLite database to FILE, consistently, while servers run (PostgreSQL: use
    pg_dump). FILE must not exist; it is made with mode 0600."""
    settings = load_settings()
    source = sqlite_file(settings.database_url)
    if source is None:
        if settings.database_url.startswith("sqlite"):
            fail("an in-memory SQLite database has nothing to back up", code="unsupported")
        fail(f"on PostgreSQL, back up with pg_dump: {PG_DUMP_RECIPE}", code="unsupported")
    revision = schema_revision(settings)
    try:
        backup_sqlite(source, file)
    except FileExistsError:
        fail(
            f"{file} exists: a backup never replaces a file, give another name",
            code="already_exists",
        )
    except (OSError, sqlite3.Error) as exc:
        reason = getattr(exc, "strerror", None) or exc
        fail(f"cannot back up to {file}: {reason}", code="backup_failed")
    data = {
        "database_url": masked_url(settings.database_url),
        "file": str(file),
        "revision": revision,
    }
    lines = [
        f"backed up {data['database_url']} (revision {revision}) to {file}",
        "the key-encryption key is not in it: keep it too (LEANAUTH_KEY_ENCRYPTION_KEY or "
        "its file)",
    ]
    emit(as_json, data, "\n".join(lines))
