"""Registry operations shared by the CLI and the HTTP admin surfaces: apps, secrets,
customers and key rotation. Each is one store transaction."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from leanauth.bootstrap import Runtime
from leanauth.credentials import new_client_secret, new_secret_id
from leanauth.keys import StoredKey, new_stored_key
from leanauth.scopes import ScopeClass
from leanauth.settings import MAX_TOKEN_TTL, MIN_TOKEN_TTL
from leanauth.store.base import NotFound
from leanauth.store.models import App, ClientSecret, Customer

MAX_APP_NAME = 200
MAX_APP_USER_ID = 255


@dataclass(frozen=True)
class NewCredentials:
    """An app with its freshly issued secret: the only time the secret is ever seen."""

    app: App
    client_secret: str
    secret_id: str


def _issue_secret(runtime: Runtime, client_id: str, now: int) -> tuple[str, ClientSecret]:
    plaintext = new_client_secret()
    record = ClientSecret(new_secret_id(), client_id, runtime.hasher.hash(plaintext), now)
    return plaintext, record


def create_app(
    runtime: Runtime, name: str, scopes: frozenset[ScopeClass], token_ttl: int | None = None
) -> NewCredentials:
    name = name.strip()
    if not name or len(name) > MAX_APP_NAME:
        raise ValueError(f"the app name must have 1 to {MAX_APP_NAME} characters")
    if token_ttl is not None and not MIN_TOKEN_TTL <= token_ttl <= MAX_TOKEN_TTL:
        raise ValueError(f"the token lifetime must be {MIN_TOKEN_TTL} to {MAX_TOKEN_TTL} seconds")
    if not scopes:
        raise ValueError("an app needs at least one scope class")
    now = int(time.time())
    app = App(str(uuid.uuid4()), name, scopes, token_ttl, True, now)
    plaintext, record = _issue_secret(runtime, app.client_id, now)
    runtime.store.create_app(app, record)
    return NewCredentials(app, plaintext, record.secret_id)


def rotate_secret(runtime: Runtime, client_id: str) -> NewCredentials:
    app = require_app(runtime, client_id)
    now = int(time.time())
    plaintext, record = _issue_secret(runtime, client_id, now)
    runtime.store.replace_secrets(client_id, record, now)
    return NewCredentials(app, plaintext, record.secret_id)


def require_app(runtime: Runtime, client_id: str) -> App:
    app = runtime.store.get_app(client_id)
    if app is None:
        raise NotFound(f"no app with client id {client_id}")
    return app


def create_customer(runtime: Runtime, client_id: str, app_user_id: str) -> Customer:
    if not 1 <= len(app_user_id) <= MAX_APP_USER_ID:
        raise ValueError(f"app_user_id must have 1 to {MAX_APP_USER_ID} characters")
    require_app(runtime, client_id)
    customer = Customer(str(uuid.uuid4()), client_id, app_user_id, int(time.time()))
    runtime.store.create_customer(customer)
    return customer


def rotate_key(runtime: Runtime, alg: str | None = None) -> StoredKey:
    now = int(time.time())
    key = new_stored_key(alg or runtime.settings.signing_alg, runtime.cipher, now)
    runtime.store.rotate_key(key, now)
    return key
