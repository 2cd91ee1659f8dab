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
        "revoked_at": phase.key.revoked_at,
    }


@click.group()
def keys() -> None:
    """Signing keys: next → active → retired by their times; revoked when compromised."""


@keys.command("list")
@json_option
def keys_list(as_json: bool) -> None:
    """List signing keys (public facts only) with their schedule."""
    with runtime() as rt:
        now = int(time.time())
        stored = rt.store.list_keys()
        phases = schedule(stored)
        # Keys revoked before they activated take no part in the schedule; list them too.
        scheduled = {p.key.kid for p in phases}
        phases += [KeyPhase(k, None, None) for k in stored if k.kid not in scheduled]
        text = "\n".join(
            f"{p.key.kid}  {p.key.alg}  {p.state(now)}"
            for p in phases
            if p.published(now) or p.key.revoked
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


# A kid is base64url and may begin with "-": an unknown "option" is taken as the kid.
@keys.command("revoke", context_settings={"ignore_unknown_options": True})
@click.argument("kid")
@json_option
def keys_revoke(kid: str, as_json: bool) -> None:
    """Revoke a compromised key: it leaves the JWKS and its tokens are refused at once.

    If it was signing, a new key of the same algorithm signs from now on. Tokens it signed
    stop working on this server (Customers API, introspection) within a second; resource
    servers verifying offline drop it when they next fetch the JWKS."""
    with runtime() as rt:
        revoked, replacement = registry.revoke_key(rt, kid)
        now = int(time.time())
        phases = {p.key.kid: p for p in schedule(rt.store.list_keys())}
        data: dict[str, Any] = {
            "revoked": {"kid": revoked.kid, "alg": revoked.alg, "revoked_at": revoked.revoked_at},
            "signing_key": None
            if replacement is None
            else phase_json(phases[replacement.kid], now),
        }
        text = f"key {revoked.kid} revoked"
        if replacement is not None:
            text += f"; new key {replacement.kid} ({replacement.alg}) signs from now"
        emit(as_json, data, text)
