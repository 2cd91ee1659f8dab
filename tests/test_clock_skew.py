"""Nodes whose clocks are a few seconds apart agree about each other's tokens.

One node runs under libfaketime (its clock shifted), the other on the real clock; both
serve one installation."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from conftest import (
    AppCredentials,
    Env,
    Server,
    create_app,
    needs_faketime,
    new_token,
    request_token,
    shifted_clock,
    start_server,
    wait_for,
)

pytestmark = needs_faketime


def shifted(env: Env, offset: str) -> Env:
    """The same installation, seen through a clock shifted by ``offset`` (``+2s``)."""
    return Env(env.data_dir, {**env.extra, **shifted_clock(offset)})


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Server]]:
    # One installation, one issuer, as behind a load balancer.
    env = Env(tmp_path_factory.mktemp("skew"), {"LEANAUTH_ISSUER": "http://skew.test"})
    env.cli("init")
    running = {
        "real": start_server(env),
        "ahead": start_server(shifted(env, "+2s")),
        "behind": start_server(shifted(env, "-2s")),
    }
    yield running
    for server in running.values():
        server.stop()


@pytest.fixture(scope="module")
def skew_app(nodes: dict[str, Server]) -> AppCredentials:
    creds = create_app(nodes["real"].env, "--name", "skew", "--scopes", "api,customer")
    for server in nodes.values():
        wait_for(lambda s=server: request_token(s, creds).status_code == 200)
    return creds


@pytest.mark.parametrize(
    ("issuer", "checker"),
    [("ahead", "real"), ("real", "behind"), ("ahead", "behind"), ("behind", "ahead")],
)
def test_a_token_from_a_node_with_another_clock_is_good_at_once(
    nodes: dict[str, Server], skew_app: AppCredentials, issuer: str, checker: str
) -> None:
    token = new_token(nodes[issuer], skew_app)
    checking = nodes[checker]
    customers = httpx.get(
        checking.url + "/customers/v1/?size=1",
        headers={"Authorization": f"Bearer {token}"},
        timeout=10,
    )
    assert customers.status_code == 200, customers.text
    introspection = httpx.post(
        checking.url + "/oauth2/introspect",
        data={
            "token": token,
            "client_id": skew_app.client_id,
            "client_secret": skew_app.client_secret,
        },
        timeout=10,
    )
    assert introspection.json()["active"] is True
