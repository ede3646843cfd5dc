"""plan price history, boleto replacements, paid boleto amounts, refunds

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "plans", sa.Column("effective_from", sa.Date(), server_default=sa.text("'2000-01-01'"), nullable=False)
    )
    op.add_column(
        "plans", sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False)
    )
    op.drop_constraint("uq_plans_product_cycle", "plans", type_="unique")
    op.create_unique_constraint(
        op.f("uq_plans_product_cycle_effective_from"), "plans", ["product", "cycle", "effective_from"]
    )

    op.add_column("boletos", sa.Column("sequence", sa.Integer(), server_default=sa.text("1"), nullable=False))
    op.add_column("boletos", sa.Column("paid_amount_cents", sa.BigInteger(), nullable=True))
    op.add_column("boletos", sa.Column("replaced_on", sa.Date(), nullable=True))
    op.execute("UPDATE boletos SET paid_amount_cents = amount_cents WHERE status = 'paid'")
    op.drop_constraint("uq_boletos_invoice_id", "boletos", type_="unique")
    op.create_unique_constraint(op.f("uq_boletos_invoice_id_sequence"), "boletos", ["invoice_id", "sequence"])
    op.create_index(
        "ix_boletos_awaiting_overdue",
        "boletos",
        ["invoice_id"],
        unique=False,
        postgresql_where=sa.text("status IN ('issued', 'expired') AND overdue_on IS NULL"),
    )
    op.create_index(
        "uq_boletos_live_invoice",
        "boletos",
        ["invoice_id"],
        unique=True,
        postgresql_where=sa.text("status IN ('issued', 'overdue')"),
    )

    op.create_table(
        "refunds",
        sa.Column("id", sa.BigInteger(), nullable=False),
        sa.Column("subscription_id", sa.BigInteger(), nullable=False),
        sa.Column("organization_id", sa.BigInteger(), nullable=False),
        sa.Column("charge_id", sa.BigInteger(), nullable=True),
        sa.Column("method", sa.String(length=16), nullable=False),
        sa.Column("amount_cents", sa.BigInteger(), nullable=False),
        sa.Column("status", sa.String(length=16), server_default="pending", nullable=False),
        sa.Column("reason", sa.Text(), server_default="", nullable=False),
        sa.Column("gateway_id", sa.Text(), nullable=True),
        sa.Column("gateway_code", sa.Text(), nullable=True),
        sa.Column("gateway_message", sa.Text(), nullable=True),
        sa.Column("reference", sa.Text(), nullable=True),
        sa.Column("resolved_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint("amount_cents > 0", name=op.f("ck_refunds_amount_positive")),
        sa.CheckConstraint(
            "method = 'payout' OR charge_id IS NOT NULL", name=op.f("ck_refunds_card_refund_has_charge")
        ),
        sa.CheckConstraint("method IN ('card', 'payout')", name=op.f("ck_refunds_method")),
        sa.CheckConstraint(
            "status IN ('pending', 'succeeded', 'failed', 'unknown', 'paid')", name=op.f("ck_refunds_status")
        ),
        sa.ForeignKeyConstraint(["charge_id"], ["charges.id"], name=op.f("fk_refunds_charge_id_charges")),
        sa.ForeignKeyConstraint(
            ["organization_id"], ["organizations.id"], name=op.f("fk_refunds_organization_id_organizations")
        ),
        sa.ForeignKeyConstraint(
            ["subscription_id"], ["subscriptions.id"], name=op.f("fk_refunds_subscription_id_subscriptions")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_refunds")),
    )
    op.create_index(op.f("ix_refunds_charge_id"), "refunds", ["charge_id"], unique=False)
    op.create_index(op.f("ix_refunds_organization_id"), "refunds", ["organization_id"], unique=False)
    op.create_index(op.f("ix_refunds_subscription_id"), "refunds", ["subscription_id"], unique=False)
    op.create_index(
        "ix_refunds_open",
        "refunds",
        ["created_at"],
        unique=False,
        postgresql_where=sa.text("status IN ('pending', 'unknown')"),
    )


def downgrade() -> None:
    op.drop_index("ix_refunds_open", table_name="refunds", postgresql_where=sa.text("status IN ('pending', 'unknown')"))
    op.drop_index(op.f("ix_refunds_subscription_id"), table_name="refunds")
    op.drop_index(op.f("ix_refunds_organization_id"), table_name="refunds")
    op.drop_index(op.f("ix_refunds_charge_id"), table_name="refunds")
    op.drop_table("refunds")

    op.drop_index("uq_boletos_live_invoice", table_name="boletos")
    op.drop_index("ix_boletos_awaiting_overdue", table_name="boletos")
    op.drop_constraint(op.f("uq_boletos_invoice_id_sequence"), "boletos", type_="unique")
    # Replacement boletos cannot survive the older one-boleto-per-invoice schema.
    op.execute("DELETE FROM boletos WHERE sequence > 1")
    op.create_unique_constraint("uq_boletos_invoice_id", "boletos", ["invoice_id"])
    op.drop_column("boletos", "replaced_on")
    op.drop_column("boletos", "paid_amount_cents")
    op.drop_column("boletos", "sequence")

    op.drop_constraint(op.f("uq_plans_product_cycle_effective_from"), "plans", type_="unique")
    op.execute(
        "DELETE FROM plans p USING plans q WHERE p.product = q.product AND p.cycle = q.cycle "
        "AND p.effective_from < q.effective_from"
    )
    op.create_unique_constraint("uq_plans_product_cycle", "plans", ["product", "cycle"])
    op.drop_column("plans", "created_at")
    op.drop_column("plans", "effective_from")
