"""Request ids (X-Request-Id) and structured audit log lines."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from conftest import AppCredentials, Env, Server, known_app, serving, token_form, wait_for


@pytest.fixture(scope="module")
def behind_proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server whose peer (this test, on loopback) is a trusted proxy, logging JSON."""
    env = Env(
        tmp_path_factory.mktemp("proxied"),
        {"LEANAUTH_TRUSTED_PROXIES": "127.0.0.1/32", "LEANAUTH_LOG_FORMAT": "json"},
    )
    with serving(env) as running:
        yield running


def test_every_response_has_its_own_request_id(server: Server, app: AppCredentials) -> None:
    with httpx.Client(timeout=10) as client:
        tokens = [client.post(server.token_url, data=token_form(app)) for _ in range(2)]
        refused = client.post(server.token_url, data={"grant_type": "client_credentials"})
        jwks = client.get(server.url + "/oauth2/jwks")
        ready = client.get(server.url + "/readyz")
    ids = [r.headers["x-request-id"] for r in (*tokens, refused, jwks, ready)]
    assert len(set(ids)) == len(ids)
    assert all(8 <= len(i) <= 64 for i in ids)


def test_audit_record_carries_the_request_id(env: Env, server: Server, app: AppCredentials) -> None:
    response = httpx.post(server.token_url, data=token_form(app), timeout=10)
    request_id = response.headers["x-request-id"]

    def audited() -> bool:
        events = env.cli("audit", "list", "--app", app.client_id, "--limit", "50")
        return any(e.get("detail", {}).get("request_id") == request_id for e in events)

    wait_for(audited, timeout=5)


def test_client_supplied_request_id_is_ignored_from_untrusted_peers(
    server: Server, app: AppCredentials
) -> None:
    response = httpx.post(
        server.token_url, data=token_form(app), headers={"X-Request-Id": "planted"}, timeout=10
    )
    assert response.headers["x-request-id"] != "planted"


def test_trusted_proxy_request_id_is_adopted(behind_proxy: Server) -> None:
    response = httpx.get(
        behind_proxy.url + "/livez", headers={"X-Request-Id": "lb-1234.abc"}, timeout=10
    )
    assert response.headers["x-request-id"] == "lb-1234.abc"


def test_trusted_proxy_traceparent_trace_id_is_adopted(behind_proxy: Server) -> None:
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    response = httpx.get(
        behind_proxy.url + "/livez",
        headers={"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"},
        timeout=10,
    )
    assert response.headers["x-request-id"] == trace_id


@pytest.mark.parametrize("planted", ["a b", "x" * 200, "id\u202e", "0" * 3 + "\\n"])
def test_malformed_incoming_ids_are_replaced(behind_proxy: Server, planted: str) -> None:
    response = httpx.get(
        behind_proxy.url + "/livez", headers={"X-Request-Id": planted.encode()}, timeout=10
    )
    assert response.headers["x-request-id"] != planted


def json_lines(log_path: Path) -> list[dict[str, object]]:
    lines = []
    for line in log_path.read_text().splitlines():
        try:
            lines.append(json.loads(line))
        except ValueError:
            continue
    return lines


def test_json_log_has_audit_records_as_objects(behind_proxy: Server) -> None:
    creds = known_app(behind_proxy.env, behind_proxy, "--scopes", "api")
    response = httpx.post(
        behind_proxy.token_url,
        data=token_form(creds, "api", secret="lsk_not-the-secret-zq9"),
        headers={"X-Request-Id": "probe-77"},
        timeout=10,
    )
    assert response.status_code == 401

    def logged() -> list[dict[str, object]]:
        audits = [line.get("audit") for line in json_lines(behind_proxy.log_path)]
        return [a for a in audits if isinstance(a, dict) and a.get("request_id") == "probe-77"]

    wait_for(lambda: bool(logged()), timeout=5)
    record = logged()[0]
    assert record["audit"] == "token"
    assert record["outcome"] == "invalid_client"
    assert record["client_id"] == creds.client_id
    assert str(record["at"]).endswith("Z")
    assert "zq9" not in json.dumps(record)
