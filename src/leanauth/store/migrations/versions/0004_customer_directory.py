"""Customers in app order: the directory every worker holds is loaded app by app, each app's
customer ids in order.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02
"""

from __future__ import annotations

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_customers_client_customer", "customers", ["client_id", "customer_id"])


def downgrade() -> None:
    op.drop_index("ix_customers_client_customer", "customers")
