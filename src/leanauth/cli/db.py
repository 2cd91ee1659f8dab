"""``leanauth db``: the schema's migrations."""

from __future__ import annotations

import click

from leanauth.cli.common import emit, json_option, runtime
from leanauth.store import migrate


@click.group()
def db() -> None:
    """The database schema (Alembic migrations)."""


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
    with runtime(schema="none") as rt:
        revision, head = rt.store.schema_revision(), migrate.head_revision()
        data = {"revision": revision, "head": head, "current": revision == head}
        state = "up to date" if revision == head else "behind: run `leanauth db upgrade`"
        emit(as_json, data, f"{revision or 'empty'} (head {head}, {state})")


def register(group: click.Group) -> None:
    group.add_command(db)
