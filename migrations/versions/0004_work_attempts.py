"""failed attempts of change requests, gateway events and notices: backoff and "needs attention"

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

# Notifications already count their attempts and keep the last error (0001).
_COUNTED = ("change_requests", "gateway_events")
_SCHEDULED = ("change_requests", "gateway_events", "notifications")

# (name, table, indexed column, predicate)
_INDEXES = (
    ("ix_gateway_events_unprocessed", "gateway_events", "received_at", "processed_at IS NULL"),
    (
        "ix_change_requests_needs_attention",
        "change_requests",
        "needs_attention_at",
        "status = 'pending' AND needs_attention_at IS NOT NULL",
    ),
    (
        "ix_gateway_events_needs_attention",
        "gateway_events",
        "needs_attention_at",
        "processed_at IS NULL AND needs_attention_at IS NOT NULL",
    ),
    (
        "ix_notifications_needs_attention",
        "notifications",
        "needs_attention_at",
        "status = 'pending' AND needs_attention_at IS NOT NULL",
    ),
)


def upgrade() -> None:
    for table in _COUNTED:
        op.add_column(table, sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False))
        op.add_column(table, sa.Column("last_error", sa.Text(), nullable=True))
    for table in _SCHEDULED:
        op.add_column(table, sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=True))
        op.add_column(table, sa.Column("needs_attention_at", sa.DateTime(timezone=True), nullable=True))
    for name, table, column, predicate in _INDEXES:
        op.create_index(name, table, [column], unique=False, postgresql_where=sa.text(predicate))


def downgrade() -> None:
    for name, table, _, _ in reversed(_INDEXES):
        op.drop_index(name, table_name=table)
    for table in _SCHEDULED:
        op.drop_column(table, "needs_attention_at")
        op.drop_column(table, "next_attempt_at")
    for table in _COUNTED:
        op.drop_column(table, "last_error")
        op.drop_column(table, "attempts")
