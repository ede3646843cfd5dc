"""charges: found by the PSP's id, which its webhooks name (a chargeback, a refund made elsewhere)

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index(
        "ix_charges_gateway_id",
        "charges",
        ["gateway_id"],
        unique=False,
        postgresql_where=sa.text("gateway_id IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_charges_gateway_id", table_name="charges")
