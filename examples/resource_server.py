"""A resource server that accepts leanauth tokens: the API behind the authorization server.

    python examples/resource_server.py --issuer http://127.0.0.1:8000 --port 8100

GET /accounts                          needs an ``api`` token (an app's backend)
GET /customers/{customer_id}/accounts  needs that customer's ``customer.<id>`` token (the LinkSDK)
"""

from __future__ import annotations

import argparse

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from leanauth.resource import token_required
from leanauth.verify import TokenVerifier


def build_app(issuer: str, api_audience: str, link_audience: str) -> Starlette:
    jwks_url = issuer.rstrip("/") + "/oauth2/jwks"
    backend = TokenVerifier(issuer=issuer, audience=api_audience, jwks_url=jwks_url)
    link = TokenVerifier(issuer=issuer, audience=link_audience, jwks_url=jwks_url)

    @token_required(backend, "api")
    async def accounts(request: Request) -> Response:
        token = request.state.token
        return JSONResponse({"client_id": token.client_id, "accounts": ["acc-1", "acc-2"]})

    @token_required(link, "customer", customer_param="customer_id")
    async def customer_accounts(request: Request) -> Response:
        token = request.state.token
        return JSONResponse({"customer_id": token.customer_id, "accounts": ["acc-9"]})

    return Starlette(
        routes=[
            Route("/accounts", accounts),
            Route("/customers/{customer_id}/accounts", customer_accounts),
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--issuer", default="http://127.0.0.1:8000")
    parser.add_argument("--api-audience", default="urn:leanauth:api")
    parser.add_argument("--link-audience", default="urn:leanauth:link")
    parser.add_argument("--port", type=int, default=8100)
    args = parser.parse_args()
    app = build_app(args.issuer, args.api_audience, args.link_audience)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
