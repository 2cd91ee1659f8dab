"""An app's backend walking the whole Lean flow over HTTP with the leanauth SDK:

1. get an ``api`` token (the SDK does it on first use),
2. create a customer through the Customers API,
3. mint a ``customer.<id>`` token for the LinkSDK,
4. call the resource server with each token.

    python examples/app_backend.py --auth-url http://127.0.0.1:8000 \\
        --api-url http://127.0.0.1:8100 --client-id ID --client-secret SECRET

Prints one JSON object describing each step.
"""

from __future__ import annotations

import argparse
import json
import os
import uuid

import httpx

from leanauth.client import ClientCredentials


def run(auth_url: str, api_url: str, client_id: str, client_secret: str) -> dict[str, object]:
    auth = ClientCredentials(client_id, client_secret, auth_url.rstrip("/") + "/oauth2/token")
    with httpx.Client(auth=auth, timeout=10) as backend:
        created = backend.post(
            auth_url.rstrip("/") + "/customers/v1/", json={"app_user_id": f"user-{uuid.uuid4()}"}
        )
        created.raise_for_status()
        customer_id = created.json()["customer_id"]
        accounts = backend.get(api_url.rstrip("/") + "/accounts")
        accounts.raise_for_status()

    # What the app's front end hands to the LinkSDK.
    link_token = auth.customer_token(customer_id)
    customer_accounts = httpx.get(
        f"{api_url.rstrip('/')}/customers/{customer_id}/accounts",
        headers={"Authorization": f"Bearer {link_token}"},
        timeout=10,
    )
    customer_accounts.raise_for_status()
    return {
        "customer_id": customer_id,
        "backend_accounts": accounts.json(),
        "customer_accounts": customer_accounts.json(),
        "token_requests": auth.requests_made,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--auth-url", default="http://127.0.0.1:8000")
    parser.add_argument("--api-url", default="http://127.0.0.1:8100")
    parser.add_argument("--client-id", default=os.environ.get("LEANAUTH_CLIENT_ID"))
    parser.add_argument("--client-secret", default=os.environ.get("LEANAUTH_CLIENT_SECRET"))
    args = parser.parse_args()
    if not args.client_id or not args.client_secret:
        parser.error("--client-id and --client-secret (or LEANAUTH_CLIENT_ID/SECRET) are needed")
    print(
        json.dumps(run(args.auth_url, args.api_url, args.client_id, args.client_secret), indent=2)
    )


if __name__ == "__main__":
    main()
