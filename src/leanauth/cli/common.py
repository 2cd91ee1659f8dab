"""What every command shares: --json output, one-line (or, under --json, JSON) errors, the
runtime."""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

import click

from leanauth.bootstrap import NotInitialised, Runtime, SchemaMode, open_runtime, open_store
from leanauth.cli import json_error
from leanauth.logs import configure_logging
from leanauth.safetext import escape, escape_lines, masked_url
from leanauth.settings import Settings, SettingsError, unknown_variables
from leanauth.store.base import AlreadyExists, Conflict, NotFound, StoreError
from leanauth.store.migrate import SchemaAhead, SchemaOutdated
from leanauth.store.sql import SqlStore

# The exit status of every command, `serve` included, on a database a newer release has
# migrated: restarting cannot help, so a systemd unit lists it in RestartPreventExitStatus=.
# Not 1 (every other error), 2 (click's usage errors) or 3 (uvicorn's start-up failure);
# 78 is EX_CONFIG of sysexits.h.
EXIT_SCHEMA_AHEAD = 78

log = logging.getLogger("leanauth.cli")

json_option = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")


# The ``error`` of each failure under --json, by its exception: stable, for scripts to branch
# on. The first match counts (SettingsError, AlreadyExists and Conflict are ValueErrors).
ERROR_CODES: tuple[tuple[type[BaseException], str], ...] = (
    (SettingsError, "invalid_settings"),
    (NotInitialised, "not_initialised"),
    (SchemaAhead, "schema_ahead"),
    (SchemaOutdated, "schema_outdated"),
    (NotFound, "not_found"),
    (AlreadyExists, "already_exists"),
    (Conflict, "conflict"),
    (StoreError, "database_error"),
    (ValueError, "invalid_value"),
)


def error_code(exc: BaseException | None) -> str:
    """The --json ``error`` for ``exc``; ``failed`` for what has no code of its own."""
    return next((code for kind, code in ERROR_CODES if isinstance(exc, kind)), "failed")


def json_wanted() -> bool:
    """Whether the running command was given --json (its options are read by now)."""
    ctx = click.get_current_context(silent=True)
    return ctx is not None and bool(ctx.params.get("as_json"))


def fail(message: str, status: int = 1, code: str | None = None) -> NoReturn:
    """One ``error:`` line on stderr, or under --json one JSON object (``{"error": code,
    "message": ...}``); then exit with ``status``. ``code`` defaults to that of the
    exception being handled, so that a caller in an ``except`` block need not name it.

    The message may quote input (a client id, a path): the line escapes it whole, so a
    newline in it cannot add a line and an escape sequence cannot act."""
    if json_wanted():
        json_error(code or error_code(sys.exception()), message)
    else:
        click.echo(f"error: {escape(message)}", err=True)
    sys.exit(status)


def emit(as_json: bool, data: Any, text: str) -> None:
    """Print ``data`` as JSON or ``text`` for people. Either may carry attacker-chosen text
    (audit rows, names): JSON escapes it, and the text's lines get their unprintable
    characters escaped so no escape sequence reaches the operator's terminal."""
    click.echo(json.dumps(data, indent=2) if as_json else escape_lines(text))


def load_settings() -> Settings:
    """The settings, or one error line; logging set up as they say (admin changes are
    emitted as audit log lines on stderr, like the server's); unknown ``LEANAUTH_*``
    variables named in a warning."""
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        # A misspelt name may be why the value is wrong: said too, in plain lines like the
        # error's (the settings that choose the log format are what failed).
        configure_logging("info", "plain")
        warn_unknown_variables()
        fail(str(exc), code="invalid_settings")
    configure_logging(settings.log_level, settings.log_format)
    warn_unknown_variables()
    return settings


def warn_unknown_variables() -> None:
    """A warning for each ``LEANAUTH_*`` variable nothing reads (a typo's setting would
    silently keep its default). Never its value, which may be a secret."""
    if not unknown_variables(os.environ, set()):
        return  # the commands' own options need not be looked at (nor imported)
    root = importlib.import_module("leanauth.cli").main
    for name, likely in unknown_variables(os.environ, option_variables(root)):
        hint = f" (did you mean {likely}?)" if likely else ""
        log.warning("unknown setting %s ignored%s", name, hint)


def option_variables(group: click.Group) -> set[str]:
    """The variables the commands' own options read (``token``'s LEANAUTH_CLIENT_ID, ...)."""
    names: set[str] = set()
    context = click.Context(group)
    for name in group.list_commands(context):
        command = group.get_command(context, name)
        if command is None:
            continue
        if isinstance(command, click.Group):
            names |= option_variables(command)
        for param in command.params:
            envvar = param.envvar
            names.update([envvar] if isinstance(envvar, str) else envvar or ())
    return names


# A command waits this long at most for the database to answer a connection (or
# LEANAUTH_DB_CONNECT_TIMEOUT, if shorter): a person is waiting, and an address that does
# not answer is most often a wrong one.
CLI_CONNECT_TIMEOUT = 3.0


def for_commands(settings: Settings) -> Settings:
    """``settings`` with the command line's shorter connection deadline."""
    timeout = min(settings.db_connect_timeout, CLI_CONNECT_TIMEOUT)
    return dataclasses.replace(settings, db_connect_timeout=timeout)


def refusal(exc: Exception, settings: Settings | None = None) -> NoReturn:
    """The one line for a store that cannot be used as it is, with its exit status."""
    if isinstance(exc, StoreError) and settings is not None:
        fail(
            f"cannot use the database at {masked_url(settings.database_url)} "
            f"(waited at most {settings.db_connect_timeout:g}s): {exc}; "
            "check LEANAUTH_DATABASE_URL and that the database is up",
            code="database_unavailable",
        )
    fail(str(exc), EXIT_SCHEMA_AHEAD if isinstance(exc, SchemaAhead) else 1, error_code(exc))


# What an operator can fix before a command can run on the store.
REFUSALS = (SettingsError, StoreError, SchemaOutdated, SchemaAhead, NotInitialised)


@contextmanager
def store_only(settings: Settings) -> Iterator[SqlStore]:
    """The store alone, neither the key-encryption key nor the schema checked: for commands
    that only look at the schema (its revision, a backup). It makes no database either."""
    settings = for_commands(settings)
    try:
        store = open_store(settings)
    except REFUSALS as exc:
        refusal(exc, settings)
    try:
        yield store
    except REFUSALS as exc:
        refusal(exc, settings)
    finally:
        store.close()


@contextmanager
def runtime(schema: SchemaMode = "require", settings: Settings | None = None) -> Iterator[Runtime]:
    """The settings and the store, with one-line errors for everything an operator can fix."""
    settings = for_commands(settings or load_settings())
    try:
        rt = open_runtime(settings, schema=schema)
    except REFUSALS as exc:
        refusal(exc, settings)
    try:
        yield rt
    except (NotFound, AlreadyExists, Conflict, ValueError, StoreError) as exc:
        fail(str(exc), code=error_code(exc))
    finally:
        rt.store.close()


_DURATION = re.compile(r"^\s*(\d+)\s*([smhd]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86_400}


def parse_duration(text: str) -> int:
    """Seconds from ``90``, ``90s``, ``30m``, ``24h`` or ``7d``."""
    match = _DURATION.match(text.lower())
    if match is None:
        raise click.BadParameter(
            f"expected a duration such as 0, 90s, 30m, 24h or 7d, got {text!r}"
        )
    return int(match.group(1)) * _UNITS[match.group(2)]
