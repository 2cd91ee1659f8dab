"""The ``leanauth`` command. Each group of verbs is a module of its own, imported only when
one of its commands runs: they bring the database drivers and the server, which
``leanauth --help`` does not need."""

from __future__ import annotations

import importlib

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


class LazyGroup(click.Group):
    """A group whose commands are imported when they are asked for."""

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
