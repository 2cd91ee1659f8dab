"""``leanauth audit``: the audit trail (authentications, tokens, admin changes)."""

from __future__ import annotations

import time
from typing import Any

import click

from leanauth.cli.common import emit, json_option, parse_duration, runtime
from leanauth.safetext import escape
from leanauth.store.models import AuditEvent


def event_json(event: AuditEvent) -> dict[str, Any]:
    return {
        "at": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(event.at_ms / 1000))
        + f".{event.at_ms % 1000:03d}Z",
        "kind": event.kind,
        "outcome": event.outcome,
        "client_id": event.client_id,
        "source": event.source,
        "detail": event.detail,
    }


def event_text(event: AuditEvent) -> str:
    """One line per event: every field may hold request text (a refused client id, a
    forwarded address, a reason), so each is escaped and a newline cannot start a line."""
    data = event_json(event)
    detail = " ".join(f"{escape(str(k))}={escape(str(v))}" for k, v in (event.detail or {}).items())
    fields = (event.kind, event.outcome, event.client_id or "-", event.source or "-")
    return "  ".join([data["at"], *map(escape, fields), detail])


@click.group()
def audit() -> None:
    """The audit trail."""


@audit.command("list")
@click.option("--app", "client_id", help="Only events of this client id.")
@click.option("--since", help="Only events newer than this (90s, 30m, 24h, 7d).")
@click.option("--limit", type=click.IntRange(1, 100_000), default=1000, show_default=True)
@json_option
def audit_list(client_id: str | None, since: str | None, limit: int, as_json: bool) -> None:
    """The newest events, oldest first."""
    since_ms = None if since is None else int((time.time() - parse_duration(since)) * 1000)
    with runtime() as rt:
        events = rt.store.list_audit_events(client_id, since_ms, limit)
        emit(as_json, [event_json(e) for e in events], "\n".join(map(event_text, events)))
