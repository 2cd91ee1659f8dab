"""What every command shares: the root group, --json output, one-line errors, the runtime."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

import click

from leanauth import __version__
from leanauth.bootstrap import Runtime, SchemaMode, open_runtime
from leanauth.logs import configure_logging
from leanauth.safetext import escape, escape_lines
from leanauth.settings import Settings, SettingsError
from leanauth.store.base import AlreadyExists, Conflict, NotFound, StoreError
from leanauth.store.migrate import SchemaOutdated

json_option = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")


@click.group()
@click.version_option(__version__, prog_name="leanauth")
def main() -> None:
    """leanauth: OAuth 2.0 client-credentials tokens for the Lean Authentication API."""


def fail(message: str) -> NoReturn:
    """One ``error:`` line on stderr. The message may quote input (a client id, a path), so
    it is escaped whole: a newline in it cannot add a line, an escape sequence cannot act."""
    click.echo(f"error: {escape(message)}", err=True)
    sys.exit(1)


def emit(as_json: bool, data: Any, text: str) -> None:
    """Print ``data`` as JSON or ``text`` for people. Either may carry attacker-chosen text
    (audit rows, names): JSON escapes it, and the text's lines get their unprintable
    characters escaped so no escape sequence reaches the operator's terminal."""
    click.echo(json.dumps(data, indent=2) if as_json else escape_lines(text))


@contextmanager
def runtime(schema: SchemaMode = "auto") -> Iterator[Runtime]:
    """The settings and the store, with one-line errors for everything an operator can fix."""
    try:
        rt = open_runtime(Settings.from_env(), schema=schema)
    except (SettingsError, StoreError, SchemaOutdated) as exc:
        fail(str(exc))
    # Admin changes are emitted as audit log lines on stderr, like the server's.
    configure_logging(rt.settings.log_level, rt.settings.log_format)
    try:
        yield rt
    except (NotFound, AlreadyExists, Conflict, ValueError, StoreError) as exc:
        fail(str(exc))
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
