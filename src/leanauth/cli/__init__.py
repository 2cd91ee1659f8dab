"""The ``leanauth`` command. Each group of verbs is a module of its own, imported only when
one of its commands runs: they bring the database drivers and the server, which
``leanauth --help`` does not need."""

from __future__ import annotations

import importlib
import json
import sys
from typing import Any

try:
    import click
except ModuleNotFoundError as missing:  # the base install: the verifier and SDK only
    raise SystemExit(
        "The leanauth command comes with the server: pip install 'leanauth[server]'"
    ) from missing

from leanauth import __version__

# Each command, by name: the module of leanauth.cli that defines it (under the same name).
COMMANDS = {
    "apps": "apps",
    "audit": "audit",
    "customers": "customers",
    "db": "db",
    "init": "serve",
    "keys": "keys",
    "serve": "serve",
    "token": "token",
}
# What `leanauth --help` says of each, without importing it: the command's own summary
# (tests/test_cli.py holds them equal).
SUMMARIES = {
    "apps": "Apps (OAuth clients), their secrets and quotas.",
    "audit": "The audit trail.",
    "customers": "Customers (end-users) of an app.",
    "db": "The database schema (Alembic migrations), and backups.",
    "init": "Apply migrations; prepare the key-encryption key and the first signing key.",
    "keys": "Signing keys: next → active → retired by their times; revoked when compromised.",
    "serve": "Run the server on a database `leanauth init` or `leanauth db upgrade` prepared.",
    "token": "Ask a running server for a token.",
}


# Where the top group keeps the words it was run with (ctx.meta is shared by every context
# of one run): a usage error may come before its command's --json option is read.
ARGS = "leanauth.args"


def json_error(code: str, message: str) -> None:
    """What a failing command prints under --json instead of its ``error:`` line: one JSON
    object on stderr, with a code scripts may branch on (each keeps its meaning) and the
    message. json.dumps escapes every control character: the message needs nothing more."""
    click.echo(json.dumps({"error": code, "message": message}), err=True)


def asked_for_json(exc: click.UsageError, args: list[str]) -> bool:
    """Whether the command a usage error is about has --json and was given it: by its value
    when its options were read (an error raised by the command itself), else by its words
    before any ``--`` (an option that could not be read stopped the reading)."""
    ctx = exc.ctx
    if ctx is None or not any(param.name == "as_json" for param in ctx.command.params):
        return False
    if "as_json" in ctx.params:
        return bool(ctx.params["as_json"])
    words = args[: args.index("--")] if "--" in args else args
    return "--json" in words


class LazyGroup(click.Group):
    """A group whose commands are imported when they are asked for. Under --json, usage
    errors are JSON too (see json_error)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta[ARGS] = list(args)
        return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:
            if not asked_for_json(exc, ctx.meta.get(ARGS, [])):
                raise  # click prints it as always: usage, hint and error
            json_error("usage", exc.format_message())
            sys.exit(exc.exit_code)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        module = COMMANDS.get(cmd_name)
        if module is None:
            return None
        command: click.Command = getattr(
            importlib.import_module(f"leanauth.cli.{module}"), cmd_name
        )
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        limit = formatter.width - 6 - max(len(name) for name in COMMANDS)
        rows = [
            (name, click.Command(name, help=SUMMARIES[name]).get_short_help_str(limit))
            for name in self.list_commands(ctx)
        ]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


main = LazyGroup(
    "leanauth",
    help="leanauth: OAuth 2.0 client-credentials tokens for the Lean Authentication API.",
)
click.version_option(__version__, prog_name="leanauth")(main)


__all__ = ["main"]
