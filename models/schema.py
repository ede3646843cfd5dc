"""The data model (DESIGN §3). Every money column is integer cents; business dates are `date`s."""

from __future__ import annotations

from datetime import date, datetime
from typing import Any

from sqlalchemy import (
    CheckConstraint,
    ForeignKey,
    Index,
    Integer,
    SmallInteger,
    String,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from models.base import Base, Timestamped
from models.states import (
    BoletoStatus,
    ChangeRequestStatus,
    ChargeStatus,
    Cycle,
    InvoiceKind,
    InvoiceStatus,
    NotificationStatus,
    PaymentMethod,
    RefundMethod,
    RefundStatus,
    Role,
    RunStatus,
    SubscriptionStatus,
    sql_in,
)


class Organization(Timestamped, Base):
    """A customer organization; its id is the main application's id."""

    __tablename__ = "organizations"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(Text)
    # CPF or CNPJ, normalized to digits (a CNPJ may be alphanumeric).
    document: Mapped[str | None] = mapped_column(String(14))

    members: Mapped[list[Member]] = relationship(back_populates="organization", order_by="Member.id")
    card: Mapped[Card | None] = relationship(back_populates="organization")


class Member(Timestamped, Base):
    __tablename__ = "members"
    __table_args__ = (CheckConstraint(f"role IN {sql_in(Role)}", name="role"),)

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    organization_id: Mapped[int] = mapped_column(ForeignKey("organizations.id"), index=True)
    name: Mapped[str] = mapped_column(Text, server_default="")
    email: Mapped[str | None] = mapped_column(Text)
    role: Mapped[str] = mapped_column(String(16))
    financial_responsible: Mapped[bool] = mapped_column(server_default=text("false"))
    active: Mapped[bool] = mapped_column(server_default=text("true"))

    organization: Mapped[Organization] = relationship(back_populates="members")


class Card(Timestamped, Base):
    """The organization's one card: a gateway token and display data, never a card number."""

    __tablename__ = "cards"
    __table_args__ = (
        CheckConstraint("last4 ~ '^[0-9]{4}$'", name="last4_digits"),
        CheckConstraint("exp_month BETWEEN 1 AND 12", name="exp_month_range"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    organization_id: Mapped[int] = mapped_column(ForeignKey("organizations.id"), unique=True)
    token: Mapped[str] = mapped_column(Text)
    brand: Mapped[str] = mapped_column(String(32))
    last4: Mapped[str] = mapped_column(String(4))
    exp_month: Mapped[int] = mapped_column(SmallInteger)
    exp_year: Mapped[int] = mapped_column(SmallInteger)

    organization: Mapped[Organization] = relationship(back_populates="card")


class Plan(Base):
    """A product's price for one billing cycle from a date on: the price in force on a date is the
    row with the latest `effective_from` on or before it (a change applies from each renewal after)."""

    __tablename__ = "plans"
    __table_args__ = (
        UniqueConstraint("product", "cycle", "effective_from"),
        CheckConstraint(f"cycle IN {sql_in(Cycle)}", name="cycle"),
        CheckConstraint("price_cents >= 0", name="price_not_negative"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    product: Mapped[str] = mapped_column(String(64))
    cycle: Mapped[str] = mapped_column(String(16))
    price_cents: Mapped[int]
    currency: Mapped[str] = mapped_column(String(3), server_default="BRL")
    effective_from: Mapped[date] = mapped_column(server_default=text("'2000-01-01'"))
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())


# Written as `jobs.billing_day.scan_renewal_notices` writes its filter, so that PostgreSQL proves the
# query implies it.
RENEWAL_NOTICE_WHERE = (
    "status <> 'canceled' AND status <> 'suspended' AND cycle = 'annual' AND cancel_at_period_end IS FALSE"
)


class Subscription(Timestamped, Base):
    __tablename__ = "subscriptions"
    __table_args__ = (
        CheckConstraint(f"cycle IN {sql_in(Cycle)}", name="cycle"),
        CheckConstraint(f"status IN {sql_in(SubscriptionStatus)}", name="status"),
        CheckConstraint(f"payment_method IN {sql_in(PaymentMethod)}", name="payment_method"),
        CheckConstraint(
            f"pending_payment_method IS NULL OR pending_payment_method IN {sql_in(PaymentMethod)}",
            name="pending_payment_method",
        ),
        CheckConstraint("balance_cents >= 0", name="balance_not_negative"),
        CheckConstraint("current_period_start < current_period_end", name="period_order"),
        # One live subscription per product and organization.
        Index(
            "uq_subscriptions_live_product",
            "organization_id",
            "product",
            unique=True,
            postgresql_where=text("status <> 'canceled'"),
        ),
        # The daily run's renewal scan: renewals due (T <= D) among subscriptions still billed.
        Index(
            "ix_subscriptions_renewal_due",
            "current_period_end",
            postgresql_where=text("status <> 'canceled'"),
        ),
        # The renewal-notice scan: annual subscriptions that will renew. Without it the notice window
        # (30 days) would be read through the renewal index, which also holds every monthly subscription.
        Index(
            "ix_subscriptions_renewal_notice",
            "current_period_end",
            postgresql_where=text(RENEWAL_NOTICE_WHERE),
        ),
        # The boleto scan: annual subscriptions whose effective method is boleto.
        Index(
            "ix_subscriptions_boleto_due",
            "current_period_end",
            postgresql_where=text(
                "status <> 'canceled' AND cycle = 'annual' "
                "AND coalesce(pending_payment_method, payment_method) = 'boleto'"
            ),
        ),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    organization_id: Mapped[int] = mapped_column(ForeignKey("organizations.id"), index=True)
    product: Mapped[str] = mapped_column(String(64), server_default="conecta")
    cycle: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), server_default=SubscriptionStatus.ACTIVE.value)
    payment_method: Mapped[str] = mapped_column(String(16))
    pending_payment_method: Mapped[str | None] = mapped_column(String(16))
    billing_anchor: Mapped[date]
    current_period_start: Mapped[date]
    current_period_end: Mapped[date]
    balance_cents: Mapped[int] = mapped_column(server_default=text("0"))
    cancel_at_period_end: Mapped[bool] = mapped_column(server_default=text("false"))
    canceled_at: Mapped[datetime | None]
    suspended_at: Mapped[datetime | None]

    organization: Mapped[Organization] = relationship()

    @property
    def effective_payment_method(self) -> str:
        return self.pending_payment_method or self.payment_method


class Invoice(Timestamped, Base):
    __tablename__ = "invoices"
    __table_args__ = (
        CheckConstraint(f"status IN {sql_in(InvoiceStatus)}", name="status"),
        CheckConstraint(f"kind IN {sql_in(InvoiceKind)}", name="kind"),
        CheckConstraint(f"cycle IN {sql_in(Cycle)}", name="cycle"),
        CheckConstraint(f"method IN {sql_in(PaymentMethod)}", name="method"),
        CheckConstraint("amount_cents >= 0 AND discount_cents >= 0", name="amounts_not_negative"),
        CheckConstraint("total_cents = amount_cents - discount_cents", name="total_is_amount_less_discount"),
        CheckConstraint("period_start < period_end", name="period_order"),
        # A renewal is billed once per subscription and period (a voided bill frees its period, e.g.
        # a cancellation undone); change-request invoices are unique by their request instead.
        Index(
            "uq_invoices_renewal_period",
            "subscription_id",
            "period_start",
            unique=True,
            postgresql_where=text("kind = 'renewal' AND status <> 'void'"),
        ),
        Index("ix_invoices_open", "subscription_id", postgresql_where=text("status = 'open'")),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    subscription_id: Mapped[int] = mapped_column(ForeignKey("subscriptions.id"), index=True)
    organization_id: Mapped[int] = mapped_column(ForeignKey("organizations.id"), index=True)
    change_request_id: Mapped[int | None] = mapped_column(ForeignKey("change_requests.id"), unique=True)
    kind: Mapped[str] = mapped_column(String(16), server_default=InvoiceKind.RENEWAL.value)
    cycle: Mapped[str] = mapped_column(String(16))
    period_start: Mapped[date]
    period_end: Mapped[date]
    amount_cents: Mapped[int]
    discount_cents: Mapped[int] = mapped_column(server_default=text("0"))
    total_cents: Mapped[int]
    status: Mapped[str] = mapped_column(String(16), server_default=InvoiceStatus.OPEN.value)
    method: Mapped[str] = mapped_column(String(16))
    due_date: Mapped[date]
    paid_on: Mapped[date | None]
    paid_at: Mapped[datetime | None]

    subscription: Mapped[Subscription] = relationship()
    charges: Mapped[list[Charge]] = relationship(back_populates="invoice", order_by="Charge.attempt")
    # Every boleto issued for the invoice, a replacement ("segunda via") after the one it replaced.
    boletos: Mapped[list[Boleto]] = relationship(back_populates="invoice", order_by="Boleto.sequence")


class Charge(Timestamped, Base):
    """One attempt to charge an invoice's card (Kill Bill style: pending → succeeded/failed/unknown)."""

    __tablename__ = "charges"
    __table_args__ = (
        UniqueConstraint("invoice_id", "attempt"),
        CheckConstraint(f"status IN {sql_in(ChargeStatus)}", name="status"),
        CheckConstraint("amount_cents > 0", name="amount_positive"),
        # The janitor's scan of charges whose outcome is not known yet.
        Index("ix_charges_unresolved", "created_at", postgresql_where=text("status IN ('pending', 'unknown')")),
        # The dunning scan.
        Index(
            "ix_charges_retry_due",
            "next_retry_on",
            postgresql_where=text("next_retry_on IS NOT NULL"),
        ),
        # A PSP's webhook names the charge by the PSP's id (a chargeback, a refund made elsewhere).
        Index("ix_charges_gateway_id", "gateway_id", postgresql_where=text("gateway_id IS NOT NULL")),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    invoice_id: Mapped[int] = mapped_column(ForeignKey("invoices.id"))
    attempt: Mapped[int] = mapped_column(Integer)
    idempotency_key: Mapped[str] = mapped_column(String(64), unique=True)
    amount_cents: Mapped[int]
    card_id: Mapped[int | None] = mapped_column(ForeignKey("cards.id"))
    # The gateway token this attempt used: a replay of its idempotency key must send the same body,
    # even after the organization replaced its card.
    card_token: Mapped[str] = mapped_column(Text)
    card_last4: Mapped[str | None] = mapped_column(String(4))
    status: Mapped[str] = mapped_column(String(16), server_default=ChargeStatus.PENDING.value)
    gateway_id: Mapped[str | None] = mapped_column(Text)
    gateway_code: Mapped[str | None] = mapped_column(Text)
    gateway_message: Mapped[str | None] = mapped_column(Text)
    hard_decline: Mapped[bool] = mapped_column(server_default=text("false"))
    # Set on a failed attempt while a later retry is scheduled; cleared once that retry is made.
    next_retry_on: Mapped[date | None]
    resolved_at: Mapped[datetime | None]
    # Until when a reconciliation message owns this unresolved attempt: the tick enqueues it again
    # only after that (jobs.payments.claim_unresolved_charges).
    reconcile_claimed_until: Mapped[datetime | None]

    invoice: Mapped[Invoice] = relationship(back_populates="charges")


class Boleto(Timestamped, Base):
    """A boleto issued for an invoice. An invoice has one live boleto at a time; a replacement
    ("segunda via") is a new row with the next `sequence`, the one it replaces being cancelled."""

    __tablename__ = "boletos"
    __table_args__ = (
        CheckConstraint(f"status IN {sql_in(BoletoStatus)}", name="status"),
        UniqueConstraint("invoice_id", "sequence"),
        # The overdue scan: boletos not yet counted overdue (an expired one awaiting its segunda via too).
        Index(
            "ix_boletos_awaiting_overdue",
            "invoice_id",
            postgresql_where=text("status IN ('issued', 'expired') AND overdue_on IS NULL"),
        ),
        Index(
            "uq_boletos_live_invoice",
            "invoice_id",
            unique=True,
            postgresql_where=text("status IN ('issued', 'overdue')"),
        ),
        # The overdue, suspension and reminder scans.
        Index(
            "ix_boletos_open_due",
            "due_date",
            postgresql_where=text("status IN ('issued', 'overdue')"),
        ),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    invoice_id: Mapped[int] = mapped_column(ForeignKey("invoices.id"))
    sequence: Mapped[int] = mapped_column(Integer, server_default=text("1"))
    gateway_id: Mapped[str] = mapped_column(Text, unique=True)
    nosso_numero: Mapped[str] = mapped_column(String(32))
    barcode: Mapped[str] = mapped_column(String(44))
    digitable_line: Mapped[str] = mapped_column(String(64))
    # A boleto híbrido's Pix "copia e cola" (BR Code), when the gateway issued one.
    pix_code: Mapped[str | None] = mapped_column(Text)
    amount_cents: Mapped[int]
    due_date: Mapped[date]
    status: Mapped[str] = mapped_column(String(16), server_default=BoletoStatus.ISSUED.value)
    paid_on: Mapped[date | None]
    paid_at: Mapped[datetime | None]
    # What the payer actually paid (the gateway's word), which may differ from `amount_cents`.
    paid_amount_cents: Mapped[int | None]
    overdue_on: Mapped[date | None]
    # The day it was given up for a replacement (expired at the gateway, or a member asked for a
    # segunda via): the replacement is due BOLETO_DUE_DAYS after it, the same day on every retry.
    replaced_on: Mapped[date | None]

    invoice: Mapped[Invoice] = relationship(back_populates="boletos")


class LedgerEntry(Base):
    """Money movements of a subscription; `paid = used + credit` holds over its entries."""

    __tablename__ = "ledger_entries"

    id: Mapped[int] = mapped_column(primary_key=True)
    subscription_id: Mapped[int] = mapped_column(ForeignKey("subscriptions.id"), index=True)
    invoice_id: Mapped[int | None] = mapped_column(ForeignKey("invoices.id"), index=True)
    change_request_id: Mapped[int | None] = mapped_column(ForeignKey("change_requests.id"), index=True)
    kind: Mapped[str] = mapped_column(String(32))
    amount_cents: Mapped[int]
    description: Mapped[str] = mapped_column(Text, server_default="")
    details: Mapped[dict[str, Any]] = mapped_column(server_default=text("'{}'::jsonb"))
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())


class Refund(Timestamped, Base):
    """Money given back from an ended subscription's balance (Kill Bill style, like a charge).

    `card`: refunded through the gateway against the charge the money came from, in three phases
    (pending → succeeded / failed / unknown; key `refund:{id}`). `payout`: money that came by boleto,
    which the gateway cannot return: pending until on-call pays it out and records the reference.
    A card refund the gateway refuses becomes a payout, so the money is never kept.
    """

    __tablename__ = "refunds"
    __table_args__ = (
        CheckConstraint(f"method IN {sql_in(RefundMethod)}", name="method"),
        CheckConstraint(f"status IN {sql_in(RefundStatus)}", name="status"),
        CheckConstraint("amount_cents > 0", name="amount_positive"),
        CheckConstraint("method = 'payout' OR charge_id IS NOT NULL", name="card_refund_has_charge"),
        Index("ix_refunds_open", "created_at", postgresql_where=text("status IN ('pending', 'unknown')")),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    subscription_id: Mapped[int] = mapped_column(ForeignKey("subscriptions.id"), index=True)
    organization_id: Mapped[int] = mapped_column(ForeignKey("organizations.id"), index=True)
    charge_id: Mapped[int | None] = mapped_column(ForeignKey("charges.id"), index=True)
    method: Mapped[str] = mapped_column(String(16))
    amount_cents: Mapped[int]
    status: Mapped[str] = mapped_column(String(16), server_default=RefundStatus.PENDING.value)
    reason: Mapped[str] = mapped_column(Text, server_default="")
    gateway_id: Mapped[str | None] = mapped_column(Text)
    gateway_code: Mapped[str | None] = mapped_column(Text)
    gateway_message: Mapped[str | None] = mapped_column(Text)
    # A payout's bank reference (or a card refund's replacement payout), set when it is closed.
    reference: Mapped[str | None] = mapped_column(Text)
    resolved_at: Mapped[datetime | None]


class ChangeRequest(Base):
    __tablename__ = "change_requests"
    __table_args__ = (
        UniqueConstraint("organization_id", "idempotency_key"),
        CheckConstraint(f"status IN {sql_in(ChangeRequestStatus)}", name="status"),
        Index("ix_change_requests_pending", "created_at", postgresql_where=text("status = 'pending'")),
        # Stuck requests for the operator (`renova attention list`, and their count).
        Index(
            "ix_change_requests_needs_attention",
            "needs_attention_at",
            postgresql_where=text("status = 'pending' AND needs_attention_at IS NOT NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    # No foreign key: a request naming an unknown organization is still recorded, then rejected.
    organization_id: Mapped[int]
    subscription_id: Mapped[int | None] = mapped_column(index=True)
    requested_by: Mapped[int | None]
    idempotency_key: Mapped[str] = mapped_column(String(255))
    kind: Mapped[str] = mapped_column(String(32))
    payload: Mapped[dict[str, Any]]
    payload_hash: Mapped[str] = mapped_column(String(64))
    source: Mapped[str] = mapped_column(String(16), server_default="queue")
    status: Mapped[str] = mapped_column(String(16), server_default=ChangeRequestStatus.PENDING.value)
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    result: Mapped[dict[str, Any] | None]
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())
    processed_at: Mapped[datetime | None]
    # Failed processing attempts (jobs.work_attempts): the tick re-enqueues the request only from
    # `next_attempt_at`, and never once it needs attention (until an operator retries it).
    attempts: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    last_error: Mapped[str | None] = mapped_column(Text)
    next_attempt_at: Mapped[datetime | None]
    needs_attention_at: Mapped[datetime | None]


class Notification(Base):
    __tablename__ = "notifications"
    __table_args__ = (
        CheckConstraint(f"status IN {sql_in(NotificationStatus)}", name="status"),
        Index("ix_notifications_unsent", "created_at", postgresql_where=text("status = 'pending'")),
        Index(
            "ix_notifications_needs_attention",
            "needs_attention_at",
            postgresql_where=text("status = 'pending' AND needs_attention_at IS NOT NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    organization_id: Mapped[int] = mapped_column(ForeignKey("organizations.id"), index=True)
    subscription_id: Mapped[int | None] = mapped_column(ForeignKey("subscriptions.id"), index=True)
    kind: Mapped[str] = mapped_column(String(48))
    dedupe_key: Mapped[str] = mapped_column(String(255), unique=True)
    # Explicit recipients (e.g. the requester of a rejected change); empty means the organization's
    # owners and financial responsibles, resolved when the notice is sent.
    recipients: Mapped[list[Any]] = mapped_column(server_default=text("'[]'::jsonb"))
    context: Mapped[dict[str, Any]] = mapped_column(server_default=text("'{}'::jsonb"))
    status: Mapped[str] = mapped_column(String(16), server_default=NotificationStatus.PENDING.value)
    # Delivery attempts, successful or not; the failed ones schedule the next (jobs.work_attempts).
    attempts: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    last_error: Mapped[str | None] = mapped_column(Text)
    next_attempt_at: Mapped[datetime | None]
    needs_attention_at: Mapped[datetime | None]
    sent_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())


class BillingRun(Base):
    __tablename__ = "billing_runs"

    id: Mapped[int] = mapped_column(primary_key=True)
    run_date: Mapped[date] = mapped_column(unique=True)
    status: Mapped[str] = mapped_column(String(16), server_default=RunStatus.RUNNING.value)
    due_count: Mapped[int] = mapped_column(server_default=text("0"))
    done_count: Mapped[int] = mapped_column(server_default=text("0"))
    failed_count: Mapped[int] = mapped_column(server_default=text("0"))
    counts: Mapped[dict[str, Any]] = mapped_column(server_default=text("'{}'::jsonb"))
    scans: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    started_at: Mapped[datetime] = mapped_column(server_default=func.now())
    last_scan_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]


class GatewayEvent(Base):
    __tablename__ = "gateway_events"
    __table_args__ = (
        # The tick's finder of unprocessed events (the table keeps every event ever received).
        Index("ix_gateway_events_unprocessed", "received_at", postgresql_where=text("processed_at IS NULL")),
        Index(
            "ix_gateway_events_needs_attention",
            "needs_attention_at",
            postgresql_where=text("processed_at IS NULL AND needs_attention_at IS NOT NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    event_id: Mapped[str] = mapped_column(String(128), unique=True)
    type: Mapped[str] = mapped_column(String(64))
    payload: Mapped[dict[str, Any]]
    received_at: Mapped[datetime] = mapped_column(server_default=func.now())
    processed_at: Mapped[datetime | None]
    # Failed processing attempts (jobs.work_attempts), as on change requests.
    attempts: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    last_error: Mapped[str | None] = mapped_column(Text)
    next_attempt_at: Mapped[datetime | None]
    needs_attention_at: Mapped[datetime | None]


class AuditEvent(Base):
    """Who did what from the console or the CLI, and why."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(primary_key=True)
    actor: Mapped[str] = mapped_column(Text)
    action: Mapped[str] = mapped_column(String(64))
    target_type: Mapped[str | None] = mapped_column(String(32))
    target_id: Mapped[str | None] = mapped_column(Text)
    reason: Mapped[str] = mapped_column(Text, server_default="")
    details: Mapped[dict[str, Any]] = mapped_column(server_default=text("'{}'::jsonb"))
    created_at: Mapped[datetime] = mapped_column(server_default=func.now(), index=True)


class ClockSetting(Base):
    """The test clock (development and test only): when its one row exists, every process reads
    "now" from it instead of the wall clock (`jobs.clock.now`). Production refuses it."""

    __tablename__ = "test_clock"
    __table_args__ = (CheckConstraint("id = 1", name="single_row"),)

    id: Mapped[int] = mapped_column(SmallInteger, primary_key=True, autoincrement=False, server_default=text("1"))
    now: Mapped[datetime]
    updated_at: Mapped[datetime] = mapped_column(server_default=func.now())


class Operator(Base):
    """Someone who logs in to the ops console: a viewer looks, an operator acts (`jobs.operators`)."""

    __tablename__ = "operators"
    __table_args__ = (CheckConstraint("role IN ('viewer', 'operator')", name="role"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(String(254), unique=True)
    # Argon2id (pwdlib); the password itself is never stored.
    password_hash: Mapped[str] = mapped_column(Text)
    role: Mapped[str] = mapped_column(String(16))
    active: Mapped[bool] = mapped_column(server_default=text("true"))
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())
    last_login_at: Mapped[datetime | None]


class WebhookEndpoint(Base):
    """Where events are pushed (`jobs.event_delivery`): the main application's URL, its own signing
    secret, and the event types it wants (all when empty)."""

    __tablename__ = "webhook_endpoints"

    id: Mapped[int] = mapped_column(primary_key=True)
    url: Mapped[str] = mapped_column(Text)
    # Standard Webhooks signing secret (`whsec_…`): Renova must sign with it, so it is kept as is.
    secret: Mapped[str] = mapped_column(Text)
    event_types: Mapped[list[Any]] = mapped_column(server_default=text("'[]'::jsonb"))
    description: Mapped[str] = mapped_column(Text, server_default="")
    enabled: Mapped[bool] = mapped_column(server_default=text("true"))
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())


class Event(Base):
    """What changed, for the main application (`jobs.events`). Written only by the database's triggers
    (migration 0008), in the transaction of the change: a snapshot of the row, shaped as the API shows
    it when read."""

    __tablename__ = "events"
    __table_args__ = (Index("ix_events_order", "txid", "id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    type: Mapped[str] = mapped_column(String(64))
    object_type: Mapped[str] = mapped_column(String(32))
    object_id: Mapped[int]
    organization_id: Mapped[int]
    subscription_id: Mapped[int | None]
    snapshot: Mapped[dict[str, Any]]
    # The business instant (the test clock's when one is set).
    occurred_at: Mapped[datetime]
    # The inserting transaction's id: the read order (`jobs.events.list_events`).
    txid: Mapped[int] = mapped_column(server_default=text("(pg_current_xact_id())::text::bigint"))
    created_at: Mapped[datetime] = mapped_column(server_default=func.now(), index=True)


class EventDelivery(Base):
    """One event for one endpoint: pending until the endpoint answers 2xx, failed after three days."""

    __tablename__ = "event_deliveries"
    __table_args__ = (
        CheckConstraint("status IN ('pending', 'delivered', 'failed')", name="status"),
        UniqueConstraint("event_id", "endpoint_id"),
        Index(
            "ix_event_deliveries_pending", "endpoint_id", "ordering_key", postgresql_where=text("status = 'pending'")
        ),
        Index("ix_event_deliveries_endpoint", "endpoint_id", "id"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    event_id: Mapped[int] = mapped_column(ForeignKey("events.id", ondelete="CASCADE"))
    endpoint_id: Mapped[int] = mapped_column(ForeignKey("webhook_endpoints.id"))
    # Deliveries of one key go out in event order: `subscription:<id>`, else `organization:<id>`.
    ordering_key: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), server_default="pending")
    attempts: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    next_attempt_at: Mapped[datetime] = mapped_column(server_default=func.now())
    last_attempt_at: Mapped[datetime | None]
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    last_response: Mapped[str | None] = mapped_column(Text)
    last_error: Mapped[str | None] = mapped_column(Text)
    delivered_at: Mapped[datetime | None]
