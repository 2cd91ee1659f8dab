"""HTTP endpoints: the token endpoint (a thin ASGI handler) and Starlette routes."""
