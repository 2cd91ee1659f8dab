"""The examples: examples/resource_server.py accepts leanauth tokens, and
examples/app_backend.py walks the whole flow against it and a real leanauth server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from conftest import (
    RELAXED_THROTTLE,
    AppCredentials,
    Env,
    Server,
    create_app,
    free_port,
    request_token,
    serving,
    wait_until_known,
)

ROOT = Path(__file__).resolve().parent.parent
# This module waits for its app with failing token requests; the throttle must not mind.


@dataclass
class ResourceServer:
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path


@pytest.fixture(scope="module")
def auth_env(tmp_path_factory: pytest.TempPathFactory) -> Env:
    return Env(tmp_path_factory.mktemp("examples"), dict(RELAXED_THROTTLE))


@pytest.fixture(scope="module")
def auth_server(auth_env: Env) -> Iterator[Server]:
    with serving(auth_env) as running:
        yield running


@pytest.fixture(scope="module")
def backend_app(auth_env: Env, auth_server: Server) -> AppCredentials:
    created = create_app(auth_env, "--name", "Example backend", "--scopes", "api,customer")
    wait_until_known(auth_server, created)
    return created


@pytest.fixture(scope="module")
def resource_server(auth_server: Server, auth_env: Env) -> Iterator[ResourceServer]:
    port = free_port()
    log_path = auth_env.data_dir / f"resource-server-{port}.log"
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "examples/resource_server.py",
                "--issuer",
                auth_server.url,
                "--port",
                str(port),
            ],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    running = ResourceServer(f"http://127.0.0.1:{port}", process, log_path)
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                pytest.fail(f"resource server exited:\n{log_path.read_text(errors='replace')}")
            try:
                httpx.get(running.url + "/accounts", timeout=1)
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    pytest.fail("resource server did not answer within 30 s")
                time.sleep(0.05)
        yield running
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def run_backend(auth_server: Server, resource: ResourceServer, creds: AppCredentials) -> dict:
    result = subprocess.run(
        [
            sys.executable,
            "examples/app_backend.py",
            "--auth-url",
            auth_server.url,
            "--api-url",
            resource.url,
            "--client-id",
            creds.client_id,
            "--client-secret",
            creds.client_secret,
        ],
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


def test_app_backend_walks_the_whole_flow(
    auth_server: Server, resource_server: ResourceServer, backend_app: AppCredentials
) -> None:
    output = run_backend(auth_server, resource_server, backend_app)
    customer_id = output["customer_id"]
    assert str(uuid.UUID(customer_id)) == customer_id
    assert output["backend_accounts"]["client_id"] == backend_app.client_id
    assert output["backend_accounts"]["accounts"]
    assert output["customer_accounts"]["customer_id"] == customer_id
    assert output["customer_accounts"]["accounts"]
    assert output["token_requests"] == 2


def test_app_backend_reads_credentials_from_the_environment(
    auth_server: Server, resource_server: ResourceServer, backend_app: AppCredentials
) -> None:
    env = {"LEANAUTH_CLIENT_ID": backend_app.client_id}
    result = subprocess.run(
        [sys.executable, "examples/app_backend.py", "--auth-url", auth_server.url],
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**_base_env(), **env},
    )
    # Without the secret it refuses to start, naming what is missing.
    assert result.returncode == 2
    assert "client-secret" in result.stderr


def _base_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("LEANAUTH_CLIENT_")}


def test_resource_server_refuses_a_request_without_a_token(
    resource_server: ResourceServer,
) -> None:
    for path in ("/accounts", f"/customers/{uuid.uuid4()}/accounts"):
        response = httpx.get(resource_server.url + path, timeout=10)
        assert response.status_code == 401, response.text
        assert response.headers["www-authenticate"].startswith("Bearer")


def test_resource_server_checks_token_class_and_customer(
    auth_server: Server, resource_server: ResourceServer, backend_app: AppCredentials
) -> None:
    api = request_token(auth_server, backend_app)
    assert api.status_code == 200, api.text
    api_token = api.json()["access_token"]
    headers = {"Authorization": f"Bearer {api_token}"}
    with httpx.Client(base_url=resource_server.url, headers=headers, timeout=10) as client:
        assert client.get("/accounts").status_code == 200
        # An api token is not a customer token (another audience: refused as invalid there).
        assert client.get(f"/customers/{uuid.uuid4()}/accounts").status_code in (401, 403)
        created = client.post(
            auth_server.url + "/customers/v1/", json={"app_user_id": f"user-{uuid.uuid4()}"}
        )
        assert created.status_code == 201, created.text
        customer_id = created.json()["customer_id"]

    customer = request_token(auth_server, backend_app, f"customer.{customer_id}")
    assert customer.status_code == 200, customer.text
    headers = {"Authorization": f"Bearer {customer.json()['access_token']}"}
    with httpx.Client(base_url=resource_server.url, headers=headers, timeout=10) as client:
        assert client.get(f"/customers/{customer_id}/accounts").status_code == 200
        assert client.get(f"/customers/{uuid.uuid4()}/accounts").status_code == 403
        assert client.get("/accounts").status_code in (401, 403)
        garbage = {"Authorization": "Bearer garbage"}
        assert client.get("/accounts", headers=garbage).status_code == 401
