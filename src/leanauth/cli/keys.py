"""``leanauth keys``: the signing keys and their rotation."""

from __future__ import annotations

import time
from typing import Any

import click

from leanauth import registry
from leanauth.cli.common import emit, json_option, runtime
from leanauth.keys import KeyPhase, schedule
from leanauth.settings import SIGNING_ALGORITHMS


def phase_json(phase: KeyPhase, now: int) -> dict[str, Any]:
    return {
        "kid": phase.key.kid,
        "alg": phase.key.alg,
        "state": phase.state(now),
        "created_at": phase.key.created_at,
        "activates_at": phase.key.activates_at,
        "retires_at": phase.retires_at,
        "unpublished_at": phase.unpublished_at,
    }


@click.group()
def keys() -> None:
    """Signing keys: next → active → retired, by their times."""


@keys.command("list")
@json_option
def keys_list(as_json: bool) -> None:
    """List signing keys (public facts only) with their schedule."""
    with runtime() as rt:
        now = int(time.time())
        phases = schedule(rt.store.list_keys())
        text = "\n".join(
            f"{p.key.kid}  {p.key.alg}  {p.state(now)}" for p in phases if p.published(now)
        )
        emit(as_json, [phase_json(p, now) for p in phases], text)


@keys.command("rotate")
@click.option("--alg", type=click.Choice(SIGNING_ALGORITHMS), help="[LEANAUTH_SIGNING_ALG]")
@click.option(
    "--immediately",
    is_flag=True,
    help="Sign with the new key at once (a compromised key); skips pre-publication.",
)
@json_option
def keys_rotate(alg: str | None, immediately: bool, as_json: bool) -> None:
    """Publish a new key now; it signs after LEANAUTH_KEY_PREPUBLISH seconds."""
    with runtime() as rt:
        key = registry.rotate_key(rt, alg, immediately=immediately)
        now = int(time.time())
        phase = next(p for p in schedule(rt.store.list_keys()) if p.key.kid == key.kid)
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(key.activates_at))
        emit(as_json, phase_json(phase, now), f"new key {key.kid} ({key.alg}) signs from {when}")


def register(group: click.Group) -> None:
    group.add_command(keys)
