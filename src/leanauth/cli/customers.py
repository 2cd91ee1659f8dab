"""``leanauth customers``: an app's end-users."""

from __future__ import annotations

from typing import Any

import click

from leanauth import registry
from leanauth.cli.common import emit, json_option, runtime
from leanauth.store.base import NotFound
from leanauth.store.models import Customer


def customer_json(customer: Customer) -> dict[str, Any]:
    return {
        "customer_id": customer.customer_id,
        "app_user_id": customer.app_user_id,
        "client_id": customer.client_id,
        "created_at": customer.created_at,
    }


@click.group()
def customers() -> None:
    """Customers (end-users) of an app."""


@customers.command("create")
@click.option("--app", "client_id", required=True, help="The app's client_id.")
@click.option(
    "--app-user-id", required=True, help="The app's own id for the user (unique per app)."
)
@json_option
def customers_create(client_id: str, app_user_id: str, as_json: bool) -> None:
    """Create a customer of an app."""
    with runtime() as rt:
        customer = registry.create_customer(rt, client_id, app_user_id)
        emit(as_json, customer_json(customer), f"customer_id: {customer.customer_id}")


@customers.command("find")
@click.option("--app", "client_id", required=True, help="The app's client_id.")
@click.option("--app-user-id", required=True, help="The app's own id for the user.")
@json_option
def customers_find(client_id: str, app_user_id: str, as_json: bool) -> None:
    """Show the app's customer with this app_user_id (exit status 1 when there is none)."""
    with runtime() as rt:
        registry.require_app(rt, client_id)
        customer = rt.store.find_customer(client_id, app_user_id)
        if customer is None:
            raise NotFound(f"app {client_id} has no customer with app_user_id {app_user_id!r}")
        text = f"{customer.customer_id}  {customer.app_user_id}"
        emit(as_json, customer_json(customer), text)


@customers.command("list")
@click.option("--app", "client_id", required=True, help="The app's client_id.")
@json_option
def customers_list(client_id: str, as_json: bool) -> None:
    """List an app's customers."""
    with runtime() as rt:
        registry.require_app(rt, client_id)
        found = rt.store.list_customers(client_id)
        text = "\n".join(f"{c.customer_id}  {c.app_user_id}" for c in found) or "no customers"
        emit(as_json, [customer_json(c) for c in found], text)


@customers.command("delete")
@click.option("--app", "client_id", required=True, help="The app's client_id.")
@click.argument("customer_id")
@json_option
def customers_delete(client_id: str, customer_id: str, as_json: bool) -> None:
    """Remove a customer of an app: no more tokens for it, on every node within a second."""
    with runtime() as rt:
        registry.delete_customer(rt, client_id, customer_id)
        data = {"client_id": client_id, "customer_id": customer_id.lower(), "deleted": True}
        emit(as_json, data, f"customer {customer_id.lower()} deleted")
