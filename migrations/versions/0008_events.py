"""events to the main application: the event outbox written by triggers in the transaction of each
change, webhook endpoints, and one delivery row per event and endpoint

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

# Every event row: its type, the object's kind and id, whose it is, and a snapshot of the row as it was
# committed (the API's shape is made from it when the event is read: `jobs.events.event_body`).
# `txid` orders events by transaction, so a reader never moves its cursor past a transaction still
# running (`pg_snapshot_xmin`). Deliveries: one per endpoint whose event types match (all when empty).
EMIT = """
CREATE FUNCTION renova_emit_event(
    event_type text, object_type text, object_id bigint, organization_id bigint, subscription_id bigint,
    snapshot jsonb
) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    event_id bigint;
BEGIN
    INSERT INTO events (type, object_type, object_id, organization_id, subscription_id, snapshot, occurred_at)
    VALUES (
        event_type, object_type, object_id, organization_id, subscription_id, snapshot,
        COALESCE((SELECT test_clock.now FROM test_clock WHERE test_clock.id = 1), now())
    )
    RETURNING id INTO event_id;
    INSERT INTO event_deliveries (event_id, endpoint_id, ordering_key)
    SELECT event_id, endpoint.id, COALESCE('subscription:' || subscription_id, 'organization:' || organization_id)
    FROM webhook_endpoints endpoint
    WHERE endpoint.enabled AND (endpoint.event_types = '[]'::jsonb OR endpoint.event_types ? event_type);
END
$$;
"""

SUBSCRIPTIONS = """
CREATE FUNCTION renova_subscription_events() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    row_json jsonb := to_jsonb(NEW);
BEGIN
    IF TG_OP = 'INSERT' THEN
        PERFORM renova_emit_event('subscription.created', 'subscription', NEW.id, NEW.organization_id, NEW.id, row_json);
        RETURN NULL;
    END IF;
    IF NEW.status IS DISTINCT FROM OLD.status THEN
        IF NEW.status = 'past_due' THEN
            PERFORM renova_emit_event('subscription.past_due', 'subscription', NEW.id, NEW.organization_id, NEW.id, row_json);
        ELSIF NEW.status = 'suspended' THEN
            PERFORM renova_emit_event('subscription.suspended', 'subscription', NEW.id, NEW.organization_id, NEW.id, row_json);
        ELSIF NEW.status = 'canceled' THEN
            PERFORM renova_emit_event('subscription.canceled', 'subscription', NEW.id, NEW.organization_id, NEW.id, row_json);
        ELSIF NEW.status = 'active' THEN
            PERFORM renova_emit_event('subscription.reactivated', 'subscription', NEW.id, NEW.organization_id, NEW.id, row_json);
        END IF;
    END IF;
    IF NEW.cycle IS DISTINCT FROM OLD.cycle THEN
        PERFORM renova_emit_event('subscription.cycle_changed', 'subscription', NEW.id, NEW.organization_id, NEW.id, row_json);
    END IF;
    IF NEW.payment_method IS DISTINCT FROM OLD.payment_method
       OR NEW.pending_payment_method IS DISTINCT FROM OLD.pending_payment_method THEN
        PERFORM renova_emit_event('subscription.payment_method_changed', 'subscription', NEW.id, NEW.organization_id, NEW.id, row_json);
    END IF;
    IF NEW.cancel_at_period_end AND NOT OLD.cancel_at_period_end AND NEW.status <> 'canceled' THEN
        PERFORM renova_emit_event('subscription.cancel_scheduled', 'subscription', NEW.id, NEW.organization_id, NEW.id, row_json);
    END IF;
    RETURN NULL;
END
$$;
"""

INVOICES = """
CREATE FUNCTION renova_invoice_events() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    row_json jsonb := to_jsonb(NEW);
    subscription_json jsonb;
    was text := 'open';
BEGIN
    IF TG_OP = 'INSERT' THEN
        PERFORM renova_emit_event('invoice.created', 'invoice', NEW.id, NEW.organization_id, NEW.subscription_id, row_json);
    ELSE
        was := OLD.status;
    END IF;
    IF NEW.status IS DISTINCT FROM was THEN
        IF NEW.status = 'paid' THEN
            PERFORM renova_emit_event('invoice.paid', 'invoice', NEW.id, NEW.organization_id, NEW.subscription_id, row_json);
            IF NEW.kind = 'subscribe' THEN
                -- The first payment: the subscription starts being served.
                SELECT to_jsonb(s) INTO subscription_json FROM subscriptions s WHERE s.id = NEW.subscription_id;
                PERFORM renova_emit_event('subscription.activated', 'subscription', NEW.subscription_id, NEW.organization_id, NEW.subscription_id, subscription_json);
            END IF;
        ELSIF NEW.status = 'void' THEN
            PERFORM renova_emit_event('invoice.voided', 'invoice', NEW.id, NEW.organization_id, NEW.subscription_id, row_json);
        ELSIF NEW.status = 'uncollectible' THEN
            PERFORM renova_emit_event('invoice.uncollectible', 'invoice', NEW.id, NEW.organization_id, NEW.subscription_id, row_json);
        END IF;
    END IF;
    RETURN NULL;
END
$$;
"""

CHARGES = """
CREATE FUNCTION renova_charge_events() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    invoice record;
    was text := 'pending';
BEGIN
    IF TG_OP = 'UPDATE' THEN
        was := OLD.status;
    END IF;
    IF NEW.status IS NOT DISTINCT FROM was OR NEW.status NOT IN ('succeeded', 'failed') THEN
        RETURN NULL;
    END IF;
    SELECT i.organization_id, i.subscription_id INTO invoice FROM invoices i WHERE i.id = NEW.invoice_id;
    PERFORM renova_emit_event(
        'charge.' || NEW.status, 'charge', NEW.id, invoice.organization_id, invoice.subscription_id,
        to_jsonb(NEW) - 'card_token' - 'reconcile_claimed_until'
        || jsonb_build_object('subscription_id', invoice.subscription_id, 'organization_id', invoice.organization_id)
    );
    RETURN NULL;
END
$$;
"""

BOLETOS = """
CREATE FUNCTION renova_boleto_events() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    invoice record;
    event_type text;
BEGIN
    IF TG_OP = 'INSERT' THEN
        event_type := 'boleto.issued';
    ELSIF NEW.status = 'overdue' AND OLD.status <> 'overdue' THEN
        event_type := 'boleto.overdue';
    ELSE
        RETURN NULL;
    END IF;
    SELECT i.organization_id, i.subscription_id INTO invoice FROM invoices i WHERE i.id = NEW.invoice_id;
    PERFORM renova_emit_event(
        event_type, 'boleto', NEW.id, invoice.organization_id, invoice.subscription_id,
        to_jsonb(NEW) || jsonb_build_object('subscription_id', invoice.subscription_id, 'organization_id', invoice.organization_id)
    );
    RETURN NULL;
END
$$;
"""

CHANGE_REQUESTS = """
CREATE FUNCTION renova_change_request_events() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.status NOT IN ('applied', 'rejected') THEN
        RETURN NULL;
    END IF;
    IF TG_OP = 'UPDATE' THEN
        IF NEW.status IS NOT DISTINCT FROM OLD.status THEN
            RETURN NULL;
        END IF;
    END IF;
    PERFORM renova_emit_event(
        'change_request.' || NEW.status, 'change_request', NEW.id, NEW.organization_id, NEW.subscription_id,
        to_jsonb(NEW) - 'payload_hash' - 'last_error'
    );
    RETURN NULL;
END
$$;
"""

REFUNDS = """
CREATE FUNCTION renova_refund_events() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        PERFORM renova_emit_event('refund.created', 'refund', NEW.id, NEW.organization_id, NEW.subscription_id, to_jsonb(NEW));
    END IF;
    IF NEW.status IN ('succeeded', 'paid') THEN
        IF TG_OP = 'INSERT' THEN
            PERFORM renova_emit_event('refund.paid', 'refund', NEW.id, NEW.organization_id, NEW.subscription_id, to_jsonb(NEW));
        ELSIF OLD.status NOT IN ('succeeded', 'paid') THEN
            PERFORM renova_emit_event('refund.paid', 'refund', NEW.id, NEW.organization_id, NEW.subscription_id, to_jsonb(NEW));
        END IF;
    END IF;
    RETURN NULL;
END
$$;
"""

# The inserting transaction's id (xid8, as a bigint): events are read in transaction order.
TXID = "(pg_current_xact_id())::text::bigint"

TRIGGERS = {
    "subscriptions": "renova_subscription_events",
    "invoices": "renova_invoice_events",
    "charges": "renova_charge_events",
    "boletos": "renova_boleto_events",
    "change_requests": "renova_change_request_events",
    "refunds": "renova_refund_events",
}


def upgrade() -> None:
    op.create_table(
        "webhook_endpoints",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("secret", sa.Text(), nullable=False),
        sa.Column("event_types", postgresql.JSONB(), server_default=sa.text("'[]'::jsonb"), nullable=False),
        sa.Column("description", sa.Text(), server_default="", nullable=False),
        sa.Column("enabled", sa.Boolean(), server_default=sa.text("true"), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhook_endpoints")),
    )
    op.create_table(
        "events",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("type", sa.String(length=64), nullable=False),
        sa.Column("object_type", sa.String(length=32), nullable=False),
        sa.Column("object_id", sa.BigInteger(), nullable=False),
        sa.Column("organization_id", sa.BigInteger(), nullable=False),
        sa.Column("subscription_id", sa.BigInteger(), nullable=True),
        sa.Column("snapshot", postgresql.JSONB(), nullable=False),
        sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("txid", sa.BigInteger(), server_default=sa.text(TXID), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_events")),
    )
    op.create_index("ix_events_order", "events", ["txid", "id"])
    op.create_index(op.f("ix_events_created_at"), "events", ["created_at"])
    op.create_table(
        "event_deliveries",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("event_id", sa.BigInteger(), nullable=False),
        sa.Column("endpoint_id", sa.BigInteger(), nullable=False),
        sa.Column("ordering_key", sa.String(length=64), nullable=False),
        sa.Column("status", sa.String(length=16), server_default="pending", nullable=False),
        sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("last_attempt_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_status_code", sa.Integer(), nullable=True),
        sa.Column("last_response", sa.Text(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("status IN ('pending', 'delivered', 'failed')", name=op.f("ck_event_deliveries_status")),
        sa.ForeignKeyConstraint(
            ["event_id"], ["events.id"], name=op.f("fk_event_deliveries_event_id_events"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["endpoint_id"], ["webhook_endpoints.id"], name=op.f("fk_event_deliveries_endpoint_id_webhook_endpoints")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_event_deliveries")),
        sa.UniqueConstraint("event_id", "endpoint_id", name=op.f("uq_event_deliveries_event_id_endpoint_id")),
    )
    op.create_index(
        "ix_event_deliveries_pending",
        "event_deliveries",
        ["endpoint_id", "ordering_key"],
        postgresql_where=sa.text("status = 'pending'"),
    )
    op.create_index("ix_event_deliveries_endpoint", "event_deliveries", ["endpoint_id", "id"])
    for function in (EMIT, SUBSCRIPTIONS, INVOICES, CHARGES, BOLETOS, CHANGE_REQUESTS, REFUNDS):
        op.execute(function)
    for table, function in TRIGGERS.items():
        op.execute(
            f"CREATE TRIGGER {table}_events AFTER INSERT OR UPDATE ON {table} "
            f"FOR EACH ROW EXECUTE FUNCTION {function}()"
        )


def downgrade() -> None:
    for table, function in TRIGGERS.items():
        op.execute(f"DROP TRIGGER {table}_events ON {table}")
        op.execute(f"DROP FUNCTION {function}()")
    op.execute("DROP FUNCTION renova_emit_event(text, text, bigint, bigint, bigint, jsonb)")
    op.drop_table("event_deliveries")
    op.drop_table("events")
    op.drop_table("webhook_endpoints")
