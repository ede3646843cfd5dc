"""renewal notices: a partial index over the annual subscriptions that will renew

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

# As in models.schema.RENEWAL_NOTICE_WHERE (a migration does not import the models: it must stay as written).
WHERE = "status <> 'canceled' AND status <> 'suspended' AND cycle = 'annual' AND cancel_at_period_end IS FALSE"


def upgrade() -> None:
    op.create_index(
        "ix_subscriptions_renewal_notice",
        "subscriptions",
        ["current_period_end"],
        unique=False,
        postgresql_where=sa.text(WHERE),
    )


def downgrade() -> None:
    op.drop_index("ix_subscriptions_renewal_notice", table_name="subscriptions")
