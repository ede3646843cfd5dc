"""boletos: the Pix "copia e cola" of a boleto híbrido

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("boletos", sa.Column("pix_code", sa.Text(), nullable=True))


def downgrade() -> None:
    op.drop_column("boletos", "pix_code")
